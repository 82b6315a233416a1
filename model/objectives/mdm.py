"""Masked diffusion (LLaDA / MDLM / MD4): the absorbing forward process and its continuous-time bound.

Forward process: each token is replaced by the mask token independently with probability 1 - alpha(t), at
the noise level t = (1 - eps) u + eps, u ~ U(0, 1] (LLaDA keeps t off zero this way).
Loss (LLaDA, exactly, for the linear schedule):
    sum over masked positions of CE(logits, x0) * w(t)  /  (batch * length),   w(t) = -alpha'(t) / (1 - alpha(t))
(w = 1 / t for the linear schedule). Its expectation over u and the masks is the continuous-time negative ELBO
per token (exact for eps = 0, within O(eps) otherwise), an upper bound on -log p(x0) / L.

Evaluation estimators (eval.elbo), each an unbiased per-sequence estimate:
  - "count": a masked count l stratified over {1..n} (LLaDA), a uniformly random subset of size l masked,
             weight n / l; its expectation is the NELBO exactly (no eps);
  - "t":     t stratified over the K samples of a sequence, weight 1 / t;
  - "mdlm":  one t per sequence, u low-discrepancy over a group of consecutive sequences (MDLM's antithetic
             sampling), weight 1 / t.
Randomness of sequence b, sample k is a pure function of (seed, b, k). At evaluation the mask token's logit
is set to -inf (MDLM's SUBS), so the model's distribution is over real tokens only.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import EvalDraw, Noised, Objective, StepNoise, noise_level, pad, register
from .schedules import Schedule, get_schedule

_TAG_GROUP, _TAG_T, _TAG_COUNT, _TAG_POS = 1, 2, 3, 4  # stream names for the evaluation noise generators


def eval_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one named noise stream; SeedSequence mixes (seed, keys) into independent states."""
    words = np.random.SeedSequence([int(seed) % 2**32, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & 0x7FFF_FFFF_FFFF_FFFF)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (fp16 overflows in these models), plain fp32 elsewhere (evaluation, sampling)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- training loss
def mask_batch(x0: torch.Tensor, u: torch.Tensor, mask_uniform: torch.Tensor, *, mask_id: int,
               schedule: Schedule, eps: float, doc_ids: Optional[torch.Tensor] = None) -> Noised:
    """The absorbing forward process for a batch: x0 (B, L), u (B,) in (0, 1], mask_uniform (B, L) in [0, 1)."""
    B, L = x0.shape
    t = noise_level(u, eps)
    masked = mask_uniform < schedule.mask_prob(t)[:, None]
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    weights = schedule.weight(t)[:, None].expand(B, L)[masked]
    return Noised(x0=x0, xt=xt, t=t, at=masked, targets=x0[masked], weights=weights, doc_ids=doc_ids)


def masked_loss(model, batch: Noised, *, ce_chunk: int = 0, time_conditioned: bool = False
                ) -> tuple[torch.Tensor, dict]:
    """Sum of weighted CE over the masked positions / (B * L). The model returns the fp32 cross-entropy at the
    masked positions itself (`targets=`), `ce_chunk` rows of logits at a time (0: all at once), so the
    (N_masked, V) logits need never exist whole."""
    B, L = batch.x0.shape
    kw = {"t": batch.t} if time_conditioned else {}
    ce = model(batch.xt, doc_ids=batch.doc_ids, logits_at=batch.selected(), targets=batch.targets, ce_chunk=ce_chunk,
               mask_known=batch.mask_known, **kw)
    loss = (ce * batch.weights).sum() / (B * L)
    return loss, {"masked_frac": batch.at.float().mean().detach(),
                  "ce_masked": ce.detach().mean() if ce.numel() else torch.zeros((), device=batch.x0.device)}


def mdm_loss(model, x0: torch.Tensor, u: torch.Tensor, mask_uniform: torch.Tensor, *, mask_id: int,
             schedule: Schedule, eps: float, doc_ids: Optional[torch.Tensor] = None, ce_chunk: int = 0,
             ) -> tuple[torch.Tensor, dict]:
    """LLaDA's loss for one (micro-)batch: mask_batch then masked_loss."""
    batch = mask_batch(x0, u, mask_uniform, mask_id=mask_id, schedule=schedule, eps=eps, doc_ids=doc_ids)
    return masked_loss(model, batch, ce_chunk=ce_chunk)


# ------------------------------------------------------------------------------------------ the bound
def draw_mask(method: str, *, seed: int, seq: int, sample: int, samples: int, maskable: torch.Tensor,
              eps: float = 1e-3, group: int = 32) -> tuple[torch.Tensor, float]:
    """Masked positions (bool, like `maskable`) and the estimator weight for sample `sample` of sequence `seq`.

    `maskable` marks the positions that may be masked and are scored; n = maskable.sum() >= 1."""
    L = maskable.numel()
    n = int(maskable.sum())
    if n == 0:
        raise ValueError("a sequence with no scored positions has nothing to estimate")
    pos = torch.rand(L, generator=eval_generator(seed, _TAG_POS, seq, sample), dtype=torch.float64)
    if method == "count":
        v0 = torch.rand(1, generator=eval_generator(seed, _TAG_COUNT, seq), dtype=torch.float64).item()
        # Stratified over the K samples of this sequence; each l is still marginally uniform on {1..n}.
        l = min(n, 1 + int(((v0 + sample / samples) % 1.0) * n))
        pos = pos.masked_fill(~maskable, 2.0)  # never chosen: the l smallest scores are real candidates
        masked = torch.zeros(L, dtype=torch.bool)
        masked[pos.argsort()[:l]] = True
        return masked, n / l
    if method == "mdlm":
        # Low-discrepancy u over a group of consecutive sequences (MDLM's antithetic t over the batch); the
        # group is fixed by sequence index, not by the batch, so ranks and batch sizes see the same noise.
        g = eval_generator(seed, _TAG_GROUP, seq // group, sample)
        u0 = torch.rand(1, generator=g, dtype=torch.float64).item()
        slot = int(torch.randperm(group, generator=g)[seq % group])
        u = 1.0 - ((u0 + slot / group) % 1.0)
    elif method == "t":
        u0 = torch.rand(1, generator=eval_generator(seed, _TAG_T, seq), dtype=torch.float64).item()
        u = 1.0 - ((u0 + sample / samples) % 1.0)
    else:
        raise ValueError(f"unknown estimator {method!r} for masked diffusion; choices: count, t, mdlm")
    t = (1.0 - eps) * u + eps
    return (pos < t) & maskable, 1.0 / t


def masked_ce_sums(model, x0: torch.Tensor, masked: torch.Tensor, *, mask_id: int,
                   key_padding: Optional[torch.Tensor] = None, subs: bool = True, **model_kw) -> torch.Tensor:
    """(R,) float64: per row, sum over masked positions of -log p(x0_i | x0 with `masked` replaced by the mask)."""
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    if key_padding is not None and bool(key_padding.all()):
        key_padding = None  # the unmasked attention path is faster
    with autocast_for(x0.device):
        logits = model(xt, key_padding=key_padding, logits_at=masked, **model_kw)
    logits = logits.float()
    if subs:
        logits[:, mask_id] = float("-inf")
    ce = F.cross_entropy(logits, x0[masked], reduction="none")
    rows = masked.nonzero()[:, 0]  # boolean indexing is row-major, so rows line up with `ce`
    return torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device).index_add_(0, rows, ce.double())


def subset_nelbo(costs: dict[tuple, float], n: int) -> float:
    """The continuous-time NELBO from per-subset costs C(S) = sum_{i in S} -log p(x_i | x with S masked):
    sum_{l=1..n} (1/l) mean_{|S|=l} C(S) (t integrated out exactly)."""
    return sum(np.mean([c for S, c in costs.items() if len(S) == l]) / l for l in range(1, n + 1))


@register
class MaskedDiffusion(Objective):
    """mdm: every schedule of model/objectives/schedules.py, LLaDA's weighting, global stratified t."""
    name = "mdm"
    title = "masked diffusion"
    eval_methods = ("mdlm", "t", "count")  # the first is eval.ppl's default (MDLM's protocol)
    summary = "absorbing noise; CE at masked positions weighted by -alpha'/(1-alpha)"

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        self.schedule = get_schedule(dcfg.schedule, dcfg.poly_exponent)
        self.eps = dcfg.eps

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        return mask_batch(x0, noise.u, noise.mask_uniform, mask_id=self.mask_id, schedule=self.schedule,
                          eps=self.eps, doc_ids=doc_ids)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        return masked_loss(model, batch, ce_chunk=ce_chunk, time_conditioned=self._conditioned(model))

    @staticmethod
    def _conditioned(model) -> bool:
        cfg = getattr(model, "cfg", None)
        return getattr(cfg, "time_conditioning", "none") != "none"

    def logit_fraction(self, seq_len: int, points: int = 100_000) -> float:
        """The mean masked fraction E_t[1 - alpha(t)] (midpoint rule; exact for linear: (1 - eps) / 2 + eps)."""
        u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
        return float(self.schedule.mask_prob(noise_level(u, self.eps)).mean())

    def eval_draw(self, method, *, seed, seq, sample, samples, maskable, eps, group) -> EvalDraw:
        masked, weight = draw_mask(method, seed=seed, seq=seq, sample=sample, samples=samples, maskable=maskable,
                                   eps=eps, group=group)
        return EvalDraw(masked, weight)

    def eval_sums(self, model, x0, draws, *, keep, subs=True):
        masked, _ = pad([d.noise for d in draws], False, x0.device, length=x0.shape[1])
        sums = masked_ce_sums(model, x0, masked, mask_id=self.mask_id, key_padding=keep, subs=subs)
        return sums.cpu() * torch.tensor([d.weight for d in draws], dtype=torch.float64)

    def exact_nelbo(self, cond_logprobs, x0) -> float:
        L = x0.numel()
        costs = {}
        for r in range(1, L + 1):
            for S in itertools.combinations(range(L), r):
                xt = x0.clone()
                xt[list(S)] = self.mask_id
                logp = cond_logprobs(xt)
                costs[S] = float(sum(-logp[i, x0[i]] for i in S))
        return subset_nelbo(costs, L)

    def unmask_prob(self, t: float, s: float) -> float:
        return self.schedule.unmask_prob(t, s)

    def reverse_step(self, p_x0, z_t, t, s):
        """Absorbing posterior: a masked position becomes x with probability unmask_prob(t, s) p_x0(x) and stays
        masked otherwise; a clean position stays as it is."""
        p = self.unmask_prob(t, s)
        out = p_x0.double() * p
        out[:, self.mask_id] = 1.0 - p
        clean = z_t != self.mask_id
        out[clean] = F.one_hot(z_t[clean], out.shape[-1]).double()
        return out

