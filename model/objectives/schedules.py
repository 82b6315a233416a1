"""Masking schedules of the absorbing (masked) forward process: alpha(t), the probability that a token is still
clean at time t, and the ELBO weight -alpha'(t) / (1 - alpha(t)). Shared by every masked objective (mdm, and
the masked parts of the others) and by the samplers that step the reverse process.
"""
from __future__ import annotations

import abc
import math

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

    def unmask_prob(self, t: float, s: float) -> float:
        """P(a token masked at time t is clean at time s < t) = (alpha(s) - alpha(t)) / (1 - alpha(t)): the
        reverse step of the absorbing process (1 at s = 0 when alpha(0) = 1)."""
        a_t, a_s = (float(self.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
        return (a_s - a_t) / (1.0 - a_t)


class LinearSchedule(Schedule):
    """alpha = 1 - t: p_mask = t, weight 1 / t (LLaDA, SMDM; MDLM's log-linear schedule in effect)."""
    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def weight(self, t):
        return 1.0 / t

    def unmask_prob(self, t: float, s: float) -> float:
        return (t - s) / t  # the closed form, exactly as the MDLM sampler has always computed it


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
