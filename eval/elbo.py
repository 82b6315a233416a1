"""Bound estimators for every objective (perplexity *bounds*), data-parallel, with error bars; exact AR values.

What is estimated comes from the checkpoint's objective (model/objectives): its `eval_methods`, the noise of
one Monte Carlo sample (`eval_draw`) and the weighted per-sequence sums (`eval_sums`). This module owns what
is common to all of them: padding and batching, the split of sequences over ranks, the all-reduce, standard
errors, and lm-eval's rolling windows. For masked diffusion the estimators are "count" (exact in
expectation), "t" and "mdlm" (model/objectives/mdm.py); "ar" is the exact next-token NLL of a causal
checkpoint.

All randomness of sequence b, sample k is a pure function of (seed, b, k), so results do not depend on the
batch size or on how many data-parallel ranks split the sequences.

Public API used by other modules:
    rolling_nelbo(model, token_ids, *, mask_id, window, samples=16, seed=0, bos_id=None, eos_id=None,
                  method="count", batch_size=16, ar=None, eps=1e-3, objective=None)
        -> RollingNelbo(total_nats, n_tokens, stderr)   (lm-eval's rolling windows, each conditioned on the
                                                          text before it)
    evaluate_blocks(model, blocks, *, method, samples, seed, mask_id, ..., objective=None) -> Estimate
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.dist import rank as process_rank, world_size
from model.objectives import DiffusionConfig, Objective, build_objective, pad
from model.objectives.ar import ar_nll_sums
from model.objectives.mdm import autocast_for

METHODS = ("mdlm", "t", "count", "ar")
Z95 = 1.959963984540054


def objective_for(method: str, mask_id: int, objective: Optional[Objective] = None) -> Objective:
    """The objective whose bound `method` estimates: the given one, or (callers that name only a method)
    masked diffusion for its estimators and the AR baseline for "ar"."""
    if objective is not None:
        if method not in objective.eval_methods:
            raise ValueError(f"estimator {method!r} does not fit objective {objective.name!r}; choices: "
                             f"{', '.join(objective.eval_methods)}")
        return objective
    if method not in METHODS:
        raise ValueError(f"unknown estimator {method!r}; choices: {', '.join(METHODS)}")
    return build_objective(DiffusionConfig(objective="ar" if method == "ar" else "mdm"), mask_id=mask_id)


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


@torch.no_grad()
def sequence_samples(model, seqs, *, method: str, samples: int, seed: int, mask_id: int,
                     maskable=None, seq_ids: Optional[Sequence[int]] = None, eps: float = 1e-3,
                     batch_size: int = 16, group: int = 32, subs: bool = True, progress=None,
                     objective: Optional[Objective] = None) -> torch.Tensor:
    """(N, K) float64: K unbiased estimates of each sequence's NELBO (nats, summed over its scored positions).

    seqs: (N, L) tensor or a list of 1-D id sequences (padded per batch); maskable: matching bool masks
    (default: every position); seq_ids: the global index of each sequence, which names its noise;
    objective: whose bound (default: masked diffusion; see objective_for)."""
    objective = objective_for(method, mask_id, objective)
    rows = _as_rows(seqs)
    maskable = [torch.ones(r.numel(), dtype=torch.bool) for r in rows] if maskable is None \
        else [torch.as_tensor(m, dtype=torch.bool).cpu() for m in _as_rows(maskable)]
    seq_ids = list(range(len(rows))) if seq_ids is None else list(seq_ids)
    device = next(model.parameters()).device
    out = torch.zeros(len(rows), samples, dtype=torch.float64)
    jobs = [(i, k) for i in range(len(rows)) for k in range(samples)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        draws = [objective.eval_draw(method, seed=seed, seq=seq_ids[i], sample=k, samples=samples,
                                     maskable=maskable[i], eps=eps, group=group) for i, k in chunk]
        x0, keep = pad([rows[i] for i, _ in chunk], mask_id, device)
        sums = objective.eval_sums(model, x0, draws, keep=keep, subs=subs)
        for (i, k), s in zip(chunk, sums.tolist()):
            out[i, k] = s
        if progress is not None:
            progress.update(sum(int(maskable[i].sum()) for i, _ in chunk) / samples)
    return out


def _reduce(values: list[float], device) -> list[float]:
    """Sum a few float64 statistics over all ranks (gloo on CPU, nccl on CUDA)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world_size() > 1:
        t = t.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.cpu().tolist()


@torch.no_grad()
def evaluate_blocks(model, blocks, *, method: str, samples: int = 1, seed: int = 0, mask_id: int,
                    maskable=None, eps: float = 1e-3, batch_size: int = 16, group: int = 32, subs: bool = True,
                    progress: bool = False, desc: str = "eval", objective: Optional[Objective] = None) -> Estimate:
    """Bound (or exact AR NLL) of a set of sequences, data-parallel over the ranks of an initialized process group.
    `objective`: the checkpoint's objective, whose bound `method` estimates (default: see objective_for).

    Each rank takes a contiguous slice of the sequences; sums are all-reduced, so every rank returns the same
    Estimate. For "ar", positions 1..L-1 that are `maskable` are scored (the first token has no context)."""
    rows = _as_rows(blocks)
    masks = None if maskable is None else _as_rows(maskable)
    rank, world = process_rank(), world_size()
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
    objective = objective_for(method, mask_id, objective)
    if objective.exact:
        total = 0.0
        n_tok = 0
        for s in range(0, len(local), batch_size):
            x, keep = pad(local[s:s + batch_size], 0, device)
            sc, _ = pad(local_masks[s:s + batch_size], False, device)
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
                            group=group, subs=subs, progress=bar, objective=objective)
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
                  batch_size: int = 16, ar: Optional[bool] = None, eps: float = 1e-3,
                  objective: Optional[Objective] = None) -> RollingNelbo:
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
                           batch_size=batch_size, objective=objective)
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
        x, keep = pad(seqs[b:b + batch_size], 0, device)
        sc, _ = pad(scored[b:b + batch_size], False, device)
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
