"""The autoregressive baseline: next-token cross-entropy with a causal model, and its exact likelihood.

Nothing is noised: the input is the clean sequence, attention is causal, and position i predicts token i + 1.
The bound is exact (-log p(x) by the chain rule), so evaluation has no Monte Carlo error.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Noised, Objective, StepNoise, register
from .mdm import autocast_for


def ar_loss(model, x0: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, ce_chunk: int = 0
            ) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy (the autoregressive baseline), mean over the B * (L - 1) predictions."""
    return _next_token_loss(model, next_token_batch(x0, doc_ids), ce_chunk=ce_chunk)


def next_token_batch(x0: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> Noised:
    # Every position but the last predicts the next token: a slice, not a boolean mask (no copy, no sync).
    return Noised(x0=x0, xt=x0, at=slice(0, -1), targets=x0[:, 1:].reshape(-1), doc_ids=doc_ids)


def _next_token_loss(model, batch: Noised, *, ce_chunk: int = 0):
    ce = model(batch.xt, doc_ids=batch.doc_ids, logits_at=batch.at, targets=batch.targets, ce_chunk=ce_chunk,
               mask_known=batch.mask_known)
    return ce.mean(), {}


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


@register
class Autoregressive(Objective):
    """ar: the baseline every scaling comparison needs, trained by the same loop."""
    name = "ar"
    title = "the autoregressive baseline"
    causal = True
    logits_at = "next"
    eval_methods = ("ar",)
    exact = True
    summary = "no noise; causal next-token CE; exact likelihood"

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        return next_token_batch(x0, doc_ids)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        return _next_token_loss(model, batch, ce_chunk=ce_chunk)

    def logit_fraction(self, seq_len: int) -> float:
        return 1.0  # counted over every input position (the last one's unused logits are 1/L of it)

    def exact_nelbo(self, cond_logprobs, x0) -> float:
        """-sum_{i>=1} log p(x_i | x_<i); cond_logprobs(x0)[i] is the next-token distribution after position i."""
        logp = cond_logprobs(x0)
        return float(sum(-logp[i - 1, x0[i]] for i in range(1, x0.numel())))

    def reverse_step(self, p_x0, z_t, t, s):
        return p_x0.double()  # one token at a time: the next-token distribution itself
