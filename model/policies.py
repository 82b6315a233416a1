"""Parallel decoding policies of the LLaDA sampler: which masked positions of the block to unmask this step.

Every policy gets `conf` (B, W): the confidence of each position's proposed token (-inf where the position is
not masked), `is_mask` (B, W) and `steps_left` (the steps this block still has, >= 1), and returns a bool
(B, W) of positions to unmask. Rows are independent: a row's choice reads only that row.

  - fixed: k = ceil(remaining / steps_left), the k most confident (LLaDA: an even split, remainder first);
  - threshold (Fast-dLLM, tau): every masked position with confidence > tau;
  - factor (Fast-dLLM's factor rule, f): with confidences sorted c_1 >= c_2 >= ..., the largest n such
    that c_i >= 1 - f / (i + 1) for every i <= n (parallel decoding is safe while (n + 1)(1 - c_n) < f).

threshold and factor never unmask fewer than `fixed` would: at least one per step, and the block always
completes within its steps. With steps = block length (the usual setting for these policies) that floor is
exactly one token per step, so threshold 1.0 (no probability exceeds it) is one-token-per-step decoding.
"""
from __future__ import annotations

import torch

POLICIES = ("fixed", "threshold", "factor")


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (B, W): True at the k[b] largest entries of row b. One batched topk with the largest k, then
    each row keeps its first k[b] picks (no Python loop over rows)."""
    kmax = int(k.max()) if k.numel() else 0
    out = torch.zeros_like(scores, dtype=torch.bool)
    if kmax == 0:
        return out
    idx = scores.topk(kmax, dim=-1).indices
    keep = torch.arange(kmax, device=scores.device)[None, :] < k[:, None]
    return out.scatter_(1, idx, keep)


def fixed_count(conf: torch.Tensor, is_mask: torch.Tensor, steps_left: int) -> torch.Tensor:
    remaining = is_mask.sum(1)
    k = (remaining + steps_left - 1) // steps_left  # ceil: LLaDA's even split, remainder first
    return topk_mask(conf, k) & is_mask


def confidence_threshold(conf: torch.Tensor, is_mask: torch.Tensor, steps_left: int, tau: float) -> torch.Tensor:
    return ((conf > tau) & is_mask) | fixed_count(conf, is_mask, steps_left)


def factor_rule(conf: torch.Tensor, is_mask: torch.Tensor, steps_left: int, factor: float) -> torch.Tensor:
    c = conf.sort(dim=1, descending=True).values  # masked positions first (the rest are -inf)
    rank = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=c.dtype)
    ok = c >= 1.0 - factor / (rank + 1.0)
    n = ok.long().cumprod(1).sum(1)  # length of the leading run that passes
    floor = (is_mask.sum(1) + steps_left - 1) // steps_left
    return topk_mask(conf, torch.maximum(n, floor)) & is_mask


def confidences(lg: torch.Tensor, picked: torch.Tensor, is_mask: torch.Tensor, remasking: str, noise) -> torch.Tensor:
    """(B, W) scores of the masked positions for `select` (-inf elsewhere): the probability of each position's
    proposed token (remasking="low_confidence"; lg (N, V) logits of the N masked positions, row-major) or a
    uniform draw (remasking="random", from model.sample.Noise)."""
    conf = torch.full(is_mask.shape, float("-inf"), device=is_mask.device)
    if remasking == "low_confidence":
        conf[is_mask] = torch.softmax(lg, -1).gather(-1, picked[:, None]).squeeze(-1)
    else:
        conf[is_mask] = noise.masked(is_mask).float()
    return conf


def select(policy: str, conf: torch.Tensor, is_mask: torch.Tensor, steps_left: int, *, threshold: float,
           factor: float) -> torch.Tensor:
    if policy == "fixed":
        return fixed_count(conf, is_mask, steps_left)
    if policy == "threshold":
        return confidence_threshold(conf, is_mask, steps_left, threshold)
    if policy == "factor":
        return factor_rule(conf, is_mask, steps_left, factor)
    raise ValueError(f"unknown decoding policy {policy!r}; choices: {', '.join(POLICIES)}")
