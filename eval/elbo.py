"""Negative-ELBO estimators for masked diffusion LMs (perplexity *bounds*), and exact AR likelihoods.

For a sequence x0 whose scored ("maskable") positions number n, the continuous-time negative ELBO is

    NELBO(x0) = int_0^1 (1/t) E_{S ~ q_t} [ sum_{i in S} -log p(x0_i | x0 with S masked) ] dt
              = sum_{l=1..n} (1/l) E_{|S| = l} [ sum_{i in S} -log p(x0_i | x0 with S masked) ]

(S: the set of masked positions; each position is masked with probability t under q_t; the second line
integrates t out exactly and equals the expected negative log-likelihood of the any-order autoregressive
model, so NELBO(x0) >= -log p_mix(x0) for the normalized mixture p_mix over decoding orders.)

Estimators, each an unbiased per-sequence estimate repeated `samples` (K) times:
  - "mdlm":  one t per sequence, t = (1 - eps) u + eps, u low-discrepancy over a group of consecutive
             sequences (MDLM's antithetic sampling); estimate (1/t) * sum of CE over masked positions. Its
             expectation is (1/(1-eps)) int_eps^1 ... dt, the NELBO up to O(eps) (MDLM's convention).
  - "t":     K values of t per sequence, stratified over the K samples; same weight 1/t.
  - "count": K masked counts l per sequence, stratified over {1..n} (LLaDA); a uniformly random subset of
             size l is masked, weight n / l. Its expectation is the NELBO above *exactly* (no eps).
  - "ar":    exact next-token NLL of a causal checkpoint (no Monte Carlo).

All randomness of sequence b, sample k is a pure function of (seed, b, k), so results do not depend on the
batch size or on how many data-parallel ranks split the sequences.

The model follows MDLM's SUBS parameterization at evaluation: the mask token's logit is set to -inf, so the
model's distribution is over real tokens only (it never has to put mass on the mask).

Public API used by other modules:
    rolling_nelbo(model, token_ids, *, mask_id, window, samples=16, seed=0, bos_id=None, eos_id=None,
                  method="count", batch_size=16, ar=None, eps=1e-3) -> RollingNelbo(total_nats, n_tokens, stderr)
        (lm-eval's rolling windows, each conditioned on the text before it)
    evaluate_blocks(model, blocks, *, method, samples, seed, mask_id, ...) -> Estimate
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

METHODS = ("mdlm", "t", "count", "ar")
_TAG_GROUP, _TAG_T, _TAG_COUNT, _TAG_POS = 1, 2, 3, 4  # stream names for the noise generators
Z95 = 1.959963984540054


def _gen(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one named noise stream; SeedSequence mixes (seed, keys) into independent states."""
    words = np.random.SeedSequence([int(seed) % 2**32, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & 0x7FFF_FFFF_FFFF_FFFF)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (fp16 overflows in these models), plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def draw_mask(method: str, *, seed: int, seq: int, sample: int, samples: int, maskable: torch.Tensor,
              eps: float = 1e-3, group: int = 32) -> tuple[torch.Tensor, float]:
    """Masked positions (bool, like `maskable`) and the estimator weight for sample `sample` of sequence `seq`.

    `maskable` marks the positions that may be masked and are scored; n = maskable.sum() >= 1."""
    L = maskable.numel()
    n = int(maskable.sum())
    if n == 0:
        raise ValueError("a sequence with no scored positions has nothing to estimate")
    pos = torch.rand(L, generator=_gen(seed, _TAG_POS, seq, sample), dtype=torch.float64)
    if method == "count":
        v0 = torch.rand(1, generator=_gen(seed, _TAG_COUNT, seq), dtype=torch.float64).item()
        # Stratified over the K samples of this sequence; each l is still marginally uniform on {1..n}.
        l = min(n, 1 + int(((v0 + sample / samples) % 1.0) * n))
        pos = pos.masked_fill(~maskable, 2.0)  # never chosen: the l smallest scores are real candidates
        masked = torch.zeros(L, dtype=torch.bool)
        masked[pos.argsort()[:l]] = True
        return masked, n / l
    if method == "mdlm":
        # Low-discrepancy u over a group of consecutive sequences (MDLM's antithetic t over the batch); the
        # group is fixed by sequence index, not by the batch, so ranks and batch sizes see the same noise.
        g = _gen(seed, _TAG_GROUP, seq // group, sample)
        u0 = torch.rand(1, generator=g, dtype=torch.float64).item()
        slot = int(torch.randperm(group, generator=g)[seq % group])
        u = 1.0 - ((u0 + slot / group) % 1.0)
    elif method == "t":
        u0 = torch.rand(1, generator=_gen(seed, _TAG_T, seq), dtype=torch.float64).item()
        u = 1.0 - ((u0 + sample / samples) % 1.0)
    else:
        raise ValueError(f"unknown estimator {method!r}; choices: {', '.join(METHODS)}")
    t = (1.0 - eps) * u + eps
    return (pos < t) & maskable, 1.0 / t


def masked_ce_sums(model, x0: torch.Tensor, masked: torch.Tensor, *, mask_id: int,
                   key_padding: Optional[torch.Tensor] = None, subs: bool = True) -> torch.Tensor:
    """(R,) float64: per row, sum over masked positions of -log p(x0_i | x0 with `masked` replaced by the mask)."""
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    if key_padding is not None and bool(key_padding.all()):
        key_padding = None  # the unmasked attention path is faster
    with autocast_for(x0.device):
        logits = model(xt, key_padding=key_padding, logits_at=masked)
    logits = logits.float()
    if subs:
        logits[:, mask_id] = float("-inf")
    ce = F.cross_entropy(logits, x0[masked], reduction="none")
    rows = masked.nonzero()[:, 0]  # boolean indexing is row-major, so rows line up with `ce`
    return torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device).index_add_(0, rows, ce.double())


def ar_nll_sums(model, x: torch.Tensor, scored: torch.Tensor, *, mask_id: Optional[int] = None,
                key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R,) float64: sum over positions i >= 1 with scored[:, i] of -log p(x_i | x_<i) under a causal model."""
    if key_padding is not None and bool(key_padding.all()):
        key_padding = None
    with autocast_for(x.device):
        logits = model(x, key_padding=key_padding)
    logits = logits[:, :-1].float()
    if mask_id is not None and mask_id < logits.shape[-1]:
        logits[..., mask_id] = float("-inf")  # the mask id never occurs in text
    ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (R, L-1)
    return (ce.double() * scored[:, 1:]).sum(1)


@dataclass
class Estimate:
    """A bound (or exact AR value) on the negative log-likelihood of a set of sequences."""
    method: str
    total_nats: float  # summed over all scored tokens
    n_tokens: int  # scored tokens
    n_sequences: int
    samples: int  # Monte Carlo samples per sequence (0 for the exact AR value)
    seed: int
    stderr_nats: float  # standard error of total_nats
    stderr_kind: str  # "monte-carlo" | "between-sequence (conservative)" | "exact"
    eps: float
    stderr_data_nats: float = float("nan")  # spread between sequences: the error if they were a random sample

    @property
    def nelbo(self) -> float:
        """Per-token bound in nats."""
        return self.total_nats / self.n_tokens

    @property
    def stderr(self) -> float:
        return self.stderr_nats / self.n_tokens

    @property
    def ci95(self) -> tuple[float, float]:
        return self.nelbo - Z95 * self.stderr, self.nelbo + Z95 * self.stderr

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nelbo, 700.0))

    @property
    def ppl_ci95(self) -> tuple[float, float]:
        lo, hi = self.ci95
        return math.exp(min(lo, 700.0)), math.exp(min(hi, 700.0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(nelbo=self.nelbo, stderr=self.stderr, ci95=list(self.ci95), ppl=self.ppl,
                 ppl_ci95=list(self.ppl_ci95), bound=self.method != "ar")
        return d


def _as_rows(seqs) -> list[torch.Tensor]:
    if isinstance(seqs, torch.Tensor):
        if seqs.ndim != 2:
            raise ValueError(f"expected (N, L) token ids, got shape {tuple(seqs.shape)}")
        return list(seqs)
    return [torch.as_tensor(s, dtype=torch.long) for s in seqs]


def _pad(rows: list[torch.Tensor], fill: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(r.numel() for r in rows)
    out = torch.full((len(rows), L), fill, dtype=rows[0].dtype)
    keep = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
        keep[i, :r.numel()] = True
    return out.to(device), keep.to(device)


@torch.no_grad()
def sequence_samples(model, seqs, *, method: str, samples: int, seed: int, mask_id: int,
                     maskable=None, seq_ids: Optional[Sequence[int]] = None, eps: float = 1e-3,
                     batch_size: int = 16, group: int = 32, subs: bool = True, progress=None) -> torch.Tensor:
    """(N, K) float64: K unbiased estimates of each sequence's NELBO (nats, summed over its scored positions).

    seqs: (N, L) tensor or a list of 1-D id sequences (padded per batch); maskable: matching bool masks
    (default: every position); seq_ids: the global index of each sequence, which names its noise."""
    rows = _as_rows(seqs)
    maskable = [torch.ones(r.numel(), dtype=torch.bool) for r in rows] if maskable is None \
        else [torch.as_tensor(m, dtype=torch.bool).cpu() for m in _as_rows(maskable)]
    seq_ids = list(range(len(rows))) if seq_ids is None else list(seq_ids)
    device = next(model.parameters()).device
    out = torch.zeros(len(rows), samples, dtype=torch.float64)
    jobs = [(i, k) for i in range(len(rows)) for k in range(samples)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        masks, weights = [], []
        for i, k in chunk:
            m, w = draw_mask(method, seed=seed, seq=seq_ids[i], sample=k, samples=samples, maskable=maskable[i],
                             eps=eps, group=group)
            masks.append(m)
            weights.append(w)
        x0, keep = _pad([rows[i] for i, _ in chunk], mask_id, device)
        masked, _ = _pad(masks, False, device)
        sums = masked_ce_sums(model, x0, masked.bool(), mask_id=mask_id, key_padding=keep, subs=subs).cpu()
        for (i, k), s, w in zip(chunk, sums.tolist(), weights):
            out[i, k] = s * w
        if progress is not None:
            progress.update(sum(int(maskable[i].sum()) for i, _ in chunk) / samples)
    return out


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce(values: list[float], device) -> list[float]:
    """Sum a few float64 statistics over all ranks (gloo on CPU, nccl on CUDA)."""
    _, world = _world()
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        t = t.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.cpu().tolist()


@torch.no_grad()
def evaluate_blocks(model, blocks, *, method: str, samples: int = 1, seed: int = 0, mask_id: int,
                    maskable=None, eps: float = 1e-3, batch_size: int = 16, group: int = 32, subs: bool = True,
                    progress: bool = False, desc: str = "eval") -> Estimate:
    """Bound (or exact AR NLL) of a set of sequences, data-parallel over the ranks of an initialized process group.

    Each rank takes a contiguous slice of the sequences; sums are all-reduced, so every rank returns the same
    Estimate. For "ar", positions 1..L-1 that are `maskable` are scored (the first token has no context)."""
    rows = _as_rows(blocks)
    masks = None if maskable is None else _as_rows(maskable)
    rank, world = _world()
    lo, hi = (len(rows) * rank) // world, (len(rows) * (rank + 1)) // world
    device = next(model.parameters()).device
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        total = sum(int(m.sum()) for m in masks[lo:hi]) if masks is not None else sum(r.numel() for r in rows[lo:hi])
        bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, leave=False,
                   disable=None)  # off when stderr is not a terminal
    local = rows[lo:hi]
    local_masks = masks[lo:hi] if masks is not None else [torch.ones(r.numel(), dtype=torch.bool) for r in local]
    if method == "ar":
        total = 0.0
        n_tok = 0
        for s in range(0, len(local), batch_size):
            x, keep = _pad(local[s:s + batch_size], 0, device)
            sc, _ = _pad(local_masks[s:s + batch_size], False, device)
            total += float(ar_nll_sums(model, x, sc.bool() & keep, mask_id=mask_id, key_padding=keep).sum())
            n_tok += int(sc[:, 1:].sum())
            if bar is not None:
                bar.update(int(sc.sum()))
        if bar is not None:
            bar.close()
        total, n_tok, n_seq = _reduce([total, n_tok, len(local)], device)
        return Estimate("ar", total, int(n_tok), int(n_seq), 0, seed, 0.0, "exact", 0.0, 0.0)
    est = (sequence_samples(model, local, method=method, samples=samples, seed=seed, mask_id=mask_id,
                            maskable=local_masks, seq_ids=range(lo, hi), eps=eps, batch_size=batch_size,
                            group=group, subs=subs, progress=bar)
           if local else torch.zeros(0, samples, dtype=torch.float64))
    if bar is not None:
        bar.close()
    means = est.mean(1)
    within = est.var(1, unbiased=True).sum().item() / samples if samples > 1 else 0.0
    n_tok = sum(int(m.sum()) for m in local_masks)
    s1, s2, wv, n_seq, n_tok = _reduce([means.sum().item(), (means ** 2).sum().item(), within, len(local), n_tok],
                                       device)
    n_seq = int(n_seq)
    # Spread of per-sequence estimates: var_b(mean_b) = (spread of true NELBOs) + (Monte Carlo noise), so
    # n * var_b is the standard error if the sequences were a random sample, and bounds the MC error from above.
    between = n_seq * max(s2 / n_seq - (s1 / n_seq) ** 2, 0.0) * n_seq / max(n_seq - 1, 1) if n_seq else 0.0
    if samples > 1:
        # Sample variance over stratified samples overstates the true variance of their mean: conservative.
        se, kind = math.sqrt(wv), "monte-carlo"
    else:
        se, kind = math.sqrt(between), "between-sequence (conservative)"
    return Estimate(method, s1, int(n_tok), n_seq, samples, seed, se, kind, eps if method != "count" else 0.0,
                    math.sqrt(between))


class RollingNelbo(NamedTuple):
    total_nats: float  # bound on -log p(text tokens), summed (exact for AR)
    n_tokens: int
    stderr: float  # standard error of total_nats (0 for the exact AR value)


def rolling_windows(n: int, max_len: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows (`get_rolling_token_windows` with context_len=1, then `make_disjoint_window`)
    as (context start, first scored, end) over token positions 0..n: every token is scored exactly once, and
    each window is conditioned on the text before it so that context + scored tokens = max_len + 1 (the first
    window's context is the prefix token alone, start -1). An AR model sees max_len inputs per window."""
    if max_len < 1:
        raise ValueError(f"a rolling window needs max_len >= 1, got {max_len}")
    if n == 0:
        return []
    first = min(max_len, n)
    out = [(-1, 0, first)]
    done = first
    while done < n:
        end = done + min(n - done, max_len)
        out.append((end - max_len - 1, done, end))
        done = end
    return out


def document_key(seed: int, ids: Sequence[int]) -> int:
    """A 62-bit name for a document's noise: its Monte Carlo draws depend on its tokens, so documents do not
    share draws (they would if every document restarted at window 0)."""
    words = np.random.SeedSequence([int(seed) % 2**32, len(ids), *[int(t) % 2**32 for t in ids]]).generate_state(2, np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) >> 2


@torch.no_grad()
def rolling_nelbo(model, token_ids: Sequence[int], *, mask_id: int, window: int, samples: int = 16, seed: int = 0,
                  bos_id: Optional[int] = None, eos_id: Optional[int] = None, method: str = "count",
                  batch_size: int = 16, ar: Optional[bool] = None, eps: float = 1e-3) -> RollingNelbo:
    """-log p(token_ids) for a text of any length, lm-eval's `loglikelihood_rolling` (return -total_nats):
    exact for AR checkpoints, an upper bound (NELBO) for masked diffusion.

    The text is cut as lm-eval's HF model cuts it (`rolling_windows`), bos_id serving as its prefix token, and
    each window is conditioned on the text before it: the context stays visible, only the window's own tokens
    are masked and scored. For AR that gives lm-eval's numbers. For a diffusion model each window's NELBO
    bounds -log p(window | context), so by the chain rule the sum bounds -log of one normalized model of the
    text, more tightly than independent windows. A diffusion window holds `window` positions (context + scored);
    an AR window `window` inputs. Monte Carlo draws (method "count" by default, "t" or "mdlm"; `samples` per
    window) are keyed on (seed, the document's tokens, window index). Without bos_id, AR charges the first
    token log(vocab - 1) nats (a uniform code: it has no context). eos_id is not used (kept for callers).
    Run it in one process: it ignores any process group. Returns RollingNelbo(total_nats, n_tokens, stderr)."""
    ids = [int(t) for t in token_ids]
    if not ids:
        return RollingNelbo(0.0, 0, 0.0)
    if method == "ar":
        ar = True
    if ar is None:
        ar = bool(getattr(getattr(model, "cfg", None), "causal", False))
    device = next(model.parameters()).device
    pre = [bos_id] if bos_id is not None else []
    if ar:
        return _rolling_ar(model, ids, mask_id=mask_id, window=window, pre=pre, batch_size=batch_size,
                           device=device)
    seqs, masks = [], []
    for c, s, e in rolling_windows(len(ids), window - 1):
        ctx = pre if c < 0 else ids[max(c, 0):s]
        seqs.append(torch.tensor(ctx + ids[s:e]))
        masks.append(torch.tensor([False] * len(ctx) + [True] * (e - s)))
    key = document_key(seed, ids)
    est = sequence_samples(model, seqs, method=method, samples=samples, seed=seed, mask_id=mask_id,
                           maskable=masks, seq_ids=[key * 4096 + k for k in range(len(seqs))], eps=eps,
                           batch_size=batch_size)
    total = float(est.mean(1).sum())
    if samples > 1:
        se = math.sqrt(float(est.var(1, unbiased=True).sum()) / samples)
    else:
        se = float("nan")  # one sample per window: no Monte Carlo error estimate
    return RollingNelbo(total, len(ids), se)


def _rolling_ar(model, ids, *, mask_id, window, pre, batch_size, device) -> RollingNelbo:
    total = 0.0
    seqs, scored = [], []
    for c, s, e in rolling_windows(len(ids), window):
        ctx = pre if c < 0 else ids[c:s]
        seq = ctx + ids[s:e]
        if not ctx:  # no prefix token: the first token has no context; a uniform code over real tokens
            total += math.log(model.cfg.vocab_size - 1)
        seqs.append(torch.tensor(seq))
        scored.append(torch.tensor([False] * len(ctx) + [True] * (e - s)))
    for b in range(0, len(seqs), batch_size):
        x, keep = _pad(seqs[b:b + batch_size], 0, device)
        sc, _ = _pad(scored[b:b + batch_size], False, device)
        # The last token is only a target: the model sees at most `window` inputs, as lm-eval feeds it.
        inputs, kp = x[:, :-1], keep[:, :-1]
        with autocast_for(x.device):
            logits = model(inputs, key_padding=None if bool(kp.all()) else kp)
        logits = logits.float()
        if mask_id < logits.shape[-1]:
            logits[..., mask_id] = float("-inf")  # the mask id never occurs in text
        ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += float((ce.double() * (sc[:, 1:] & keep[:, 1:])).sum())
    return RollingNelbo(total, len(ids), 0.0)
