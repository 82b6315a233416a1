"""Conditional log-likelihood log p(continuation | context) for downstream tasks (science.md, section 5).

Masked diffusion LMs have no exact likelihood; LLaDA's estimator bounds it from below. For a continuation of
n tokens, one Monte Carlo sample draws a masked count l in {1..n}, masks a uniformly random subset of l
continuation positions (the context stays clean), and scores

    - (n / l) * sum_{i masked} -log p(c_i | context, continuation with the subset masked)

Its expectation over l ~ U{1..n} and the subset is minus the NELBO of the continuation given the context,
a lower bound on log p(continuation | context). The K samples of an example use counts stratified over the
K samples (l_j = 1 + floor(((u + j / K) mod 1) * n)): each l_j is still uniform, so the mean stays unbiased,
and its variance drops. A one-token continuation is scored exactly with one sample.

Batching: every (example, sample) pair is one row; rows of different examples share a forward pass, padded
on the right and hidden with key_padding; the output head runs only at the masked positions (`logits_at`).
Examples are sorted by length so a batch holds similar lengths. The noise of sample j of an example is a
counter-based hash of (seed, the example's tokens, j, position), never of the batch: batched results equal
one-at-a-time results, the same pair always gets the same estimate, and candidates can be compared with
common random numbers. Early stop: samples are drawn in rounds of
`round_size`; after each round an example whose standard error is below `stderr_tol` stops.

Classifier-free guidance (LLaDA, optional): logits = uncond + (w + 1) * (cond - uncond) with the context
masked in the unconditional pass; the result is a guided score, no longer a bound.

AR checkpoints (model.cfg.causal) get the exact log-likelihood from one teacher-forced pass.

`greedy_fill` decodes the continuation jointly by greedy iterative unmasking (most confident position first,
one per step) from a fully masked continuation of the right length: the diffusion analogue of "is the
continuation the greedy decode", lm-eval's `is_greedy` (LAMBADA accuracy).

Block diffusion (`objective=` a block objective): the estimator above would run plain bidirectional attention,
letting the clean context see the masked answer, which a block model never does. Its conditional bound is
instead eval.elbo's block estimator over [context, answer] with only the answer scored (each answer block's
diffusion bound given the clean blocks before it; exact for block size 1), and its greedy fill is the block
sampler at temperature 0, one token per step.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from model.sample import length_batches  # rows of similar length share a batch (little padding)


@dataclass
class LogLik:
    logprob: float  # estimate of log p(continuation | context) (a lower bound in expectation for diffusion)
    stderr: float  # Monte Carlo standard error of `logprob` (0: exact; conservative under stratification)
    samples: int  # Monte Carlo samples used (0: exact AR value)
    n_tokens: int  # continuation tokens


def _is_causal(model) -> bool:
    return bool(getattr(getattr(model, "cfg", None), "causal", False))


def _device(model):
    return next(model.parameters()).device


_M64 = 1 << 64


def _s64(c: int) -> int:
    return c - _M64 if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (multiplication wraps modulo 2^64)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def hash_uniform(*keys: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1) from int64 keys (broadcast together): a pure function of the keys."""
    h = torch.zeros((), dtype=torch.long)
    for k in keys:
        h = _splitmix(h ^ k.long())
    return _shr(h, 11).double() * 2.0 ** -53


def pair_key(seed: int, ctx: Sequence[int], cont: Sequence[int]) -> int:
    """63-bit key naming an example's noise: its tokens and the seed, nothing about the batch."""
    data = ",".join(map(str, [seed, len(ctx), *ctx, -1, *cont])).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


_TAG_COUNT, _TAG_POS = 1, 2


def _check(contexts, continuations, max_length: Optional[int]):
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    ctx = [list(map(int, c)) for c in contexts]
    cont = [list(map(int, c)) for c in continuations]
    if max_length is not None:
        for i in range(len(ctx)):
            if len(cont[i]) > max_length:
                raise ValueError(f"continuation {i} has {len(cont[i])} tokens, more than max_length={max_length}")
            keep = max_length - len(cont[i])
            ctx[i] = ctx[i][len(ctx[i]) - keep:] if keep < len(ctx[i]) else ctx[i]  # drop the oldest context
    return ctx, cont


def _right_pad(seqs: list[list[int]], fill: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    x = torch.full((len(seqs), L), fill, dtype=torch.long)
    real = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        real[i, :len(s)] = True
    return x.to(device), real.to(device)


def _masked_logits(model, x: torch.Tensor, real: torch.Tensor, masked: torch.Tensor, ctx_cols: torch.Tensor,
                   mask_id: int, cfg_scale: float) -> torch.Tensor:
    """(N, V) float32 logits at the `masked` positions of x (already holding mask ids there)."""
    kp = None if bool(real.all()) else real
    if cfg_scale:
        unc = torch.where(ctx_cols, torch.full_like(x, mask_id), x)
        out = model(torch.cat([x, unc]), key_padding=None if kp is None else torch.cat([kp, kp]),
                    logits_at=torch.cat([masked, masked])).float()
        cond, uncond = out.chunk(2)
        logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
    else:
        logits = model(x, key_padding=kp, logits_at=masked).float()
    logits[:, mask_id] = float("-inf")  # SUBS: the mask is never a prediction
    return logits


def stratified_counts(n: torch.Tensor, j: torch.Tensor, k: int, u: torch.Tensor) -> torch.Tensor:
    """Masked counts l in {1..n} for sample j of k, offset u in [0, 1): stratified over the k samples."""
    frac = (u + j.double() / k) % 1.0
    return torch.minimum(1 + (frac * n.double()).long(), n)


@torch.no_grad()
def _mc_rows(model, seqs: list[list[int]], ctx_len: list[int], counts: list[int], keys: list[int],
             sample_ids: list[int], *, mask_id: int, cfg_scale: float) -> torch.Tensor:
    """One forward pass over rows (sequence, masked count, noise key, sample index): returns (R,) float64
    weighted scores -(n / l) * sum CE over l random continuation positions."""
    device = _device(model)
    x0, real = _right_pad(seqs, mask_id, device)
    R, L = x0.shape
    cols = torch.arange(L, device=device)[None, :]
    start = torch.tensor(ctx_len, device=device)[:, None]
    n = torch.tensor([len(s) for s in seqs], device=device)[:, None] - start
    is_cont = (cols >= start) & real
    l = torch.tensor(counts, device=device)
    # A uniformly random subset of size l: the l smallest of iid uniforms over the continuation positions.
    score = hash_uniform(torch.tensor(keys)[:, None], torch.tensor(sample_ids)[:, None],
                         torch.tensor(_TAG_POS), torch.arange(L)[None, :]).to(device)
    score = score.masked_fill(~is_cont, 2.0)
    rank = score.argsort(1).argsort(1)
    masked = rank < l[:, None]
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    ctx_cols = (cols < start) & real
    logits = _masked_logits(model, xt, real, masked, ctx_cols, mask_id, cfg_scale)
    ce = F.cross_entropy(logits, x0[masked], reduction="none").double()
    rows = masked.nonzero()[:, 0]  # boolean indexing is row-major: rows line up with `ce`
    sums = torch.zeros(R, dtype=torch.float64, device=device).index_add_(0, rows, ce)
    return (-sums * n.squeeze(1).double() / l.double()).cpu()


@torch.no_grad()
def _ar_loglik(model, ctx: list[list[int]], cont: list[list[int]], batch_size: int,
               mask_id: Optional[int]) -> list[LogLik]:
    """Exact log p(cont | ctx) under a causal model; the context must be non-empty (the first continuation
    token needs something to be predicted from)."""
    device = _device(model)
    out: list[Optional[LogLik]] = [None] * len(ctx)
    for idx in length_batches([len(c) + len(x) for c, x in zip(ctx, cont)], batch_size):
        for i in idx:
            if not ctx[i] and cont[i]:
                raise ValueError("an autoregressive model needs a non-empty context (e.g. BOS) to score the "
                                 "first continuation token")
        seqs = [ctx[i] + cont[i] for i in idx]
        x, real = _right_pad(seqs, 0, device)
        kp = None if bool(real.all()) else real
        logp = torch.log_softmax(_ar_logits(model, x, kp, mask_id), -1)
        tgt = logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1).double()
        for r, i in enumerate(idx):
            s, e = len(ctx[i]), len(ctx[i]) + len(cont[i])
            out[i] = LogLik(float(tgt[r, s - 1:e - 1].sum()) if e > s else 0.0, 0.0, 0, len(cont[i]))
    return out  # type: ignore[return-value]


def _ar_logits(model, x, kp, mask_id):
    logits = model(x, key_padding=kp).float()
    if mask_id is not None and mask_id < logits.shape[-1]:
        logits[..., mask_id] = float("-inf")  # the mask never occurs in text
    return logits


@torch.no_grad()
def conditional_loglikelihood(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
                              mask_id: int, mc_samples: int = 128, batch_size: int = 64, cfg_scale: float = 0.0,
                              stderr_tol: Optional[float] = None, round_size: Optional[int] = None,
                              seed: int = 0, max_length: Optional[int] = None, progress=None,
                              objective=None) -> list[LogLik]:
    """log p(continuation | context) for every pair, batched across examples and Monte Carlo samples.

    mc_samples: K samples per example (one for a single-token continuation, whose estimate is exact).
    batch_size: rows (example, sample pairs) per forward pass. stderr_tol: stop an example early once its
    standard error (nats) is at most this, checked after every round of `round_size` samples (default: K
    without early stop, else min(K, 16)). seed: names the Monte Carlo noise (with each example's tokens).
    max_length: truncate contexts from the left to fit.
    progress: optional callable(n_rows_done) for a progress bar.
    objective: the checkpoint's objective; a block objective takes the block bound (module docstring)."""
    ctx, cont = _check(contexts, continuations, max_length)
    if _is_causal(model):
        if cfg_scale:
            raise ValueError("classifier-free guidance is defined for diffusion models only")
        return _ar_loglik(model, ctx, cont, batch_size, mask_id)
    if _is_block(objective):
        if cfg_scale:
            raise ValueError("classifier-free guidance is not defined for block diffusion here")
        return _block_loglik(model, ctx, cont, objective, mask_id=mask_id, mc_samples=mc_samples,
                             batch_size=batch_size, seed=seed, progress=progress)
    if mc_samples < 1:
        raise ValueError("mc_samples must be >= 1")
    N = len(ctx)
    round_size = round_size or (mc_samples if stderr_tol is None else min(mc_samples, 16))
    target = [0 if not c else (1 if len(c) == 1 else mc_samples) for c in cont]
    draws: list[list[float]] = [[] for _ in range(N)]
    keys = [pair_key(seed, c, x) for c, x in zip(ctx, cont)]
    # One stratification offset per example and round: each round is its own stratified set of counts.
    active = [i for i in range(N) if target[i] > 0]
    rnd = 0
    while active:
        jobs = []  # (example, count, sample index)
        for i in active:
            k = min(round_size, target[i] - len(draws[i]))
            n = len(cont[i])
            u = hash_uniform(torch.tensor(keys[i]), torch.tensor(_TAG_COUNT), torch.tensor(rnd))
            ls = stratified_counts(torch.tensor(n), torch.arange(k), k, u)
            first = len(draws[i])
            jobs += [(i, int(l), first + j) for j, l in enumerate(ls)]
        rnd += 1
        # Rows of similar length share a batch: little padding (see length_batches).
        for rows in length_batches([len(ctx[i]) + len(cont[i]) for i, _, _ in jobs], batch_size):
            chunk = [jobs[r] for r in rows]
            vals = _mc_rows(model, [ctx[i] + cont[i] for i, _, _ in chunk], [len(ctx[i]) for i, _, _ in chunk],
                            [l for _, l, _ in chunk], [keys[i] for i, _, _ in chunk], [j for _, _, j in chunk],
                            mask_id=mask_id, cfg_scale=cfg_scale)
            for (i, _, _), v in zip(chunk, vals.tolist()):
                draws[i].append(v)
            if progress is not None:
                progress(len(chunk))
        nxt = []
        for i in active:
            if len(draws[i]) >= target[i]:
                continue
            if stderr_tol is not None and len(draws[i]) >= 2 and _stderr(draws[i]) <= stderr_tol:
                continue
            nxt.append(i)
        active = nxt
    out = []
    for i in range(N):
        d = draws[i]
        if not d:
            out.append(LogLik(0.0, 0.0, 0, 0))
        else:
            out.append(LogLik(sum(d) / len(d), _stderr(d) if len(cont[i]) > 1 else 0.0, len(d), len(cont[i])))
    return out


def _is_block(objective) -> bool:
    return getattr(objective, "name", None) == "block"


def _block_loglik(model, ctx, cont, objective, *, mask_id: int, mc_samples: int, batch_size: int, seed: int,
                  progress=None) -> list[LogLik]:
    """Minus eval.elbo's block `count` estimate of the answer's NELBO given the context, K samples per example
    (one when every answer block holds a single answer token: then it is exact), keyed on the example."""
    from .elbo import sequence_samples
    out = []
    for c, x in zip(ctx, cont):
        if not x:
            out.append(LogLik(0.0, 0.0, 0, 0))
            continue
        bs = objective.block_size
        cols = range(len(c), len(c) + len(x))
        exact = all(sum(1 for j in cols if j // bs == b) == 1 for b in {j // bs for j in cols})
        k = 1 if exact else mc_samples
        est = sequence_samples(model, [c + x], method="count", samples=k, seed=seed, mask_id=mask_id,
                               maskable=[[False] * len(c) + [True] * len(x)], seq_ids=[pair_key(seed, c, x)],
                               batch_size=batch_size, objective=objective)[0]
        out.append(LogLik(-float(est.mean()), 0.0 if exact else _stderr((-est).tolist()), k, len(x)))
        if progress is not None:
            progress(k)
    return out


def encode_pair(tok, context: str, continuation: str, prefix_id: Optional[int] = None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the way lm-eval's HF model makes them: trailing spaces of the
    context move to the continuation, and the continuation is what encoding the whole string adds after the
    context (so a BPE merge across the seam is scored as part of the continuation). An empty context becomes
    [prefix_id] (BOS or EOS) when given."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    ctx = tok.encode(context) if context else []
    whole = tok.encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx):]
    else:  # the seam merged into a context token: score the continuation on its own
        cont = tok.encode(continuation)
    if not ctx and prefix_id is not None:
        ctx = [prefix_id]
    return ctx, cont


def _stderr(d: list[float]) -> float:
    """Standard error of the mean of d. With stratified counts the samples are not independent; this iid
    formula overstates the error of their mean (conservative), which is the safe side for early stopping."""
    k = len(d)
    if k < 2:
        return float("inf")
    m = sum(d) / k
    return math.sqrt(sum((v - m) ** 2 for v in d) / (k - 1) / k)


@torch.no_grad()
def greedy_fill(model, contexts: Sequence[Sequence[int]], lengths: Sequence[int], *, mask_id: int,
                batch_size: int = 64, max_length: Optional[int] = None, objective=None) -> list[list[int]]:
    """Greedy joint prediction of `lengths[i]` tokens after each context.

    Diffusion: start with the continuation fully masked; each step predicts every masked position and
    unmasks the single most confident one (LLaDA's low-confidence remasking, one token per step), so the
    tokens are predicted jointly, each conditioned on those already chosen. AR: greedy left-to-right decode.
    Batched: rows with shorter continuations finish early and leave the batch. Block diffusion: the block
    sampler at temperature 0 with one token per step (rows grouped by continuation length)."""
    ctx = [list(map(int, c)) for c in contexts]
    if max_length is not None:
        ctx = [c[len(c) - (max_length - n):] if len(c) + n > max_length else c for c, n in zip(ctx, lengths)]
    device = _device(model)
    out: list[list[int]] = [[] for _ in ctx]
    if _is_block(objective):
        from model.sample import generate
        for n in sorted({int(n) for n in lengths if n > 0}):
            idx = [i for i, m in enumerate(lengths) if m == n]
            for start in range(0, len(idx), batch_size):
                part = idx[start:start + batch_size]
                x = generate(model, [ctx[i] for i in part], mask_id=mask_id, gen_length=n, steps=n,
                             temperature=0.0, objective=objective, kv_cache="prefix", pad_id=0)
                for r, i in enumerate(part):
                    out[i] = x[r, x.shape[1] - n:].tolist()
        return out
    causal = _is_causal(model)
    for idx in length_batches([len(c) + n for c, n in zip(ctx, lengths)], batch_size):
        idx = [i for i in idx if lengths[i] > 0]
        if not idx:
            continue
        x, real = _right_pad([ctx[i] + [mask_id] * lengths[i] for i in idx], mask_id, device)
        if causal:
            _greedy_ar(model, x, real, [len(ctx[i]) for i in idx], mask_id)
        else:
            _greedy_diffusion(model, x, real, mask_id)
        for r, i in enumerate(idx):
            out[i] = x[r, len(ctx[i]):len(ctx[i]) + lengths[i]].tolist()
    return out


def _greedy_diffusion(model, x: torch.Tensor, real: torch.Tensor, mask_id: int) -> None:
    """In place: unmask the most confident masked position of every row, until none is left."""
    while True:
        is_mask = (x == mask_id) & real
        live = is_mask.any(1)
        if not bool(live.any()):
            return
        rows = live.nonzero().squeeze(1)
        xs, rs, ms = x[rows], real[rows], is_mask[rows]
        logits = _masked_logits(model, xs, rs, ms, torch.zeros_like(ms), mask_id, 0.0)  # (N, V)
        prob, tok = torch.softmax(logits, -1).max(-1)
        conf = torch.full(ms.shape, -1.0, device=x.device)
        conf[ms] = prob
        best = conf.argmax(1)
        pred = torch.zeros(ms.shape, dtype=torch.long, device=x.device)
        pred[ms] = tok
        x[rows, best] = pred[torch.arange(len(rows), device=x.device), best]


def _greedy_ar(model, x: torch.Tensor, real: torch.Tensor, ctx_len: list[int], mask_id: int) -> None:
    """In place: fill the masked tail of each (right-padded) row left to right with argmax tokens."""
    n = int(((x == mask_id) & real).sum(1).max())
    start = torch.tensor(ctx_len, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    for s in range(n):
        pos = start + s
        ok = (pos < x.shape[1]) & real[rows, pos.clamp(max=x.shape[1] - 1)]
        if not bool(ok.any()):
            return
        kp = None if bool(real.all()) else real
        logits = _ar_logits(model, x, kp, mask_id)
        nxt = logits[rows, (pos - 1).clamp(min=0)].argmax(-1)
        p = pos.clamp(max=x.shape[1] - 1)
        x[rows[ok], p[ok]] = nxt[ok]


def greedy_match(model, contexts, continuations, *, mask_id: int, batch_size: int = 64,
                 max_length: Optional[int] = None, objective=None) -> list[bool]:
    """Whether the greedy joint prediction (`greedy_fill`) reproduces each continuation exactly."""
    cont = [list(map(int, c)) for c in continuations]
    pred = greedy_fill(model, contexts, [len(c) for c in cont], mask_id=mask_id, batch_size=batch_size,
                       max_length=max_length, objective=objective)
    return [p == c for p, c in zip(pred, cont)]
