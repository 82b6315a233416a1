"""Masked-diffusion objective (LLaDA / MDLM / MD4) and the autoregressive baseline.

Forward process: each token is replaced by the mask token independently with probability p_mask(t).
Noise level: t = (1 - eps) * u + eps with u ~ U(0, 1] (LLaDA keeps t off zero this way).
Loss (LLaDA, exactly, for the linear schedule):
    sum over masked positions of CE(logits, x0) * w(t)  /  (batch * length),   w(t) = 1 / p_mask(t)
Its expectation over u and the masks is the continuous-time negative ELBO per token (exact for eps = 0,
within O(eps) otherwise), an upper bound on -log p(x0) / L.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Optional

import torch


class Schedule(abc.ABC):
    """alpha(t) = probability that a token is still clean at time t; the ELBO weight is -alpha'(t) / (1 - alpha(t))."""
    name = "base"

    @abc.abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)

    @abc.abstractmethod
    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t))."""


class LinearSchedule(Schedule):
    """alpha = 1 - t: p_mask = t, weight 1 / t (LLaDA, SMDM; MDLM's log-linear schedule in effect)."""
    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def weight(self, t):
        return 1.0 / t


class MD4Schedule(Schedule):
    """MD4's schedules (google-deepmind/md4 `MaskingSchedule`): alpha = (1 - 2 eps) alpha0(t) + eps, a squeeze
    into [eps, 1 - eps] (MD4's eps = 1e-4) that keeps the weight finite at t -> 0 and leaves a little signal at
    t = 1; the weight is -alpha'(t) / (1 - alpha(t)) of the squeezed alpha."""
    squeeze = 1e-4

    @abc.abstractmethod
    def alpha0(self, t: torch.Tensor) -> torch.Tensor:
        """The unsqueezed schedule."""

    @abc.abstractmethod
    def dalpha0(self, t: torch.Tensor) -> torch.Tensor:
        """Its derivative in t."""

    def alpha(self, t):
        return (1.0 - 2 * self.squeeze) * self.alpha0(t) + self.squeeze

    def weight(self, t):
        return -(1.0 - 2 * self.squeeze) * self.dalpha0(t) / (1.0 - self.alpha(t))


class CosineSchedule(MD4Schedule):
    """MD4's cosine: alpha0 = 1 - cos(pi/2 (1 - t)), so p_mask = sin(pi t / 2) (mean masked fraction 2/pi)."""
    name = "cosine"

    def alpha0(self, t):
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))

    def dalpha0(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))


class PolySchedule(MD4Schedule):
    """MD4's poly-k: alpha0 = 1 - t^k (k = 1 is linear; larger k masks fewer tokens at small t)."""
    name = "poly"

    def __init__(self, exponent: float = 2.0):
        if not exponent > 0:
            raise ValueError(f"poly schedule exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)

    def alpha0(self, t):
        return 1.0 - t ** self.exponent

    def dalpha0(self, t):
        return -self.exponent * t ** (self.exponent - 1.0)


class CosAlphaSchedule(Schedule):
    """alpha = cos(pi t / 2), no squeeze: what this project called "cosine" before it followed MD4 (fewer tokens
    masked at small t than MD4's cosine)."""
    name = "cos_alpha"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def weight(self, t):
        half = 0.5 * math.pi * t
        return 0.5 * math.pi * torch.sin(half) / (1.0 - torch.cos(half))


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule, "poly": PolySchedule, "cos_alpha": CosAlphaSchedule}


def get_schedule(name: str, poly_exponent: float = 2.0) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown diffusion schedule {name!r}; choices: {', '.join(SCHEDULES)}")
    return PolySchedule(poly_exponent) if name == "poly" else SCHEDULES[name]()


def sample_u(n: int, generator: torch.Generator, stratified: bool, device=None) -> torch.Tensor:
    """n draws of u in (0, 1]. Stratified: u_j = 1 - ((u0 + j / n) mod 1), shuffled, so the n draws cover
    (0, 1] evenly (low-discrepancy sampling; MDLM/MD4/SMDM do it per rank, here it spans the global batch)."""
    if stratified:
        u0 = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
        grid = (u0 + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
        u = 1.0 - grid[torch.randperm(n, generator=generator, device=device)]
    else:
        u = 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return u.float()


def noise_level(u: torch.Tensor, eps: float) -> torch.Tensor:
    return (1.0 - eps) * u + eps


@dataclass
class StepNoise:
    """All randomness of one optimizer step, drawn for the *global* batch so every layout sees the same noise."""
    u: torch.Tensor  # (G,)
    mask_uniform: torch.Tensor  # (G, L)
    length: int  # sequence length for this step (random-length option)


def draw_step_noise(seed: int, step: int, global_batch: int, seq_len: int, *, stratified: bool,
                    random_length_prob: float, device) -> StepNoise:
    """A pure function of (seed, step): resuming, or changing the parallel layout, reproduces it exactly."""
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    u = sample_u(global_batch, gen, stratified, device)
    mask_uniform = torch.rand(global_batch, seq_len, generator=gen, device=device)
    coin, frac = torch.rand(2, generator=gen, device=device, dtype=torch.float64).tolist()
    length = seq_len
    if coin < random_length_prob:
        length = 1 + int(frac * seq_len)  # uniform in [1, seq_len]
    return StepNoise(u, mask_uniform, length)


def mdm_loss(model, x0: torch.Tensor, u: torch.Tensor, mask_uniform: torch.Tensor, *, mask_id: int,
             schedule: Schedule, eps: float, doc_ids: Optional[torch.Tensor] = None, ce_chunk: int = 0,
             ) -> tuple[torch.Tensor, dict]:
    """LLaDA's loss for one (micro-)batch. x0: (B, L); u: (B,) in (0, 1]; mask_uniform: (B, L) in [0, 1).

    The model returns the fp32 cross-entropy at the masked positions itself (`targets=`), `ce_chunk` rows of
    logits at a time (0: all at once), so the (N_masked, V) logits need never exist whole.
    Returns the loss (sum of weighted CE over masked positions / (B * L)) and statistics."""
    B, L = x0.shape
    t = noise_level(u, eps)
    p_mask = schedule.mask_prob(t)
    masked = mask_uniform < p_mask[:, None]
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    ce = model(xt, doc_ids=doc_ids, logits_at=masked, targets=x0[masked], ce_chunk=ce_chunk)  # (N_masked,)
    w = schedule.weight(t)[:, None].expand(B, L)[masked]
    loss = (ce * w).sum() / (B * L)
    return loss, {"masked_frac": masked.float().mean().detach(), "ce_masked": ce.detach().mean() if ce.numel()
                  else torch.zeros((), device=x0.device)}


def ar_loss(model, x0: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, ce_chunk: int = 0
            ) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy (the autoregressive baseline), mean over the B * (L - 1) predictions."""
    predicts = torch.ones_like(x0, dtype=torch.bool)
    predicts[:, -1] = False  # the last position predicts nothing
    ce = model(x0, doc_ids=doc_ids, logits_at=predicts, targets=x0[:, 1:].reshape(-1), ce_chunk=ce_chunk)
    return ce.mean(), {}
