"""The pieces every sampler shares (model/sample.py, model/remdm.py, model/block_sample.py, the objectives' own
samplers): per-row noise streams, Gumbel-max in float64, the logits of a window of the canvas with SUBS and
classifier-free guidance, and the EOS ban. Below every sampler, so none of them imports another for these."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .kvcache import KVCache

GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator]]


class Noise:
    """Uniform draws for a batch: from one shared generator, or from one generator per row (batch-invariant:
    row b's draws depend only on row b's own history)."""

    def __init__(self, generator: GeneratorLike, batch: int, device):
        self.per_row = isinstance(generator, (list, tuple))
        if self.per_row and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} rows (one per row)")
        self.generator, self.device = generator, device

    def masked(self, is_mask: torch.Tensor, *tail: int) -> torch.Tensor:
        """float64 uniforms (N, *tail) for the N True entries of is_mask (B, W), in row-major order."""
        if not self.per_row:
            return torch.rand((int(is_mask.sum()), *tail), generator=self.generator, device=self.device,
                              dtype=torch.float64)
        parts = [torch.rand((int(n), *tail), generator=self.generator[b], device=self.device, dtype=torch.float64)
                 for b, n in enumerate(is_mask.sum(1).tolist()) if n]
        return torch.cat(parts) if parts else torch.empty((0, *tail), device=self.device, dtype=torch.float64)

    def rows(self, active: torch.Tensor, width: int) -> torch.Tensor:
        """float64 uniforms (B, width); per-row generators draw only for active rows (the rest are 1)."""
        if not self.per_row:
            return torch.rand((active.shape[0], width), generator=self.generator, device=self.device,
                              dtype=torch.float64)
        out = torch.ones(active.shape[0], width, device=self.device, dtype=torch.float64)
        for b in active.nonzero().flatten().tolist():
            out[b] = torch.rand(width, generator=self.generator[b], device=self.device, dtype=torch.float64)
        return out


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator] = None,
                  u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """argmax of logits/temperature + Gumbel noise, in float64: a sample from softmax(logits / temperature).
    `u`: the uniforms to use (same shape as logits) instead of drawing them from `generator`.

    float64 matters: in low precision the noise is lumpy and ties between close logits are broken badly
    (LLaDA notes that fp16/bf16 Gumbel sampling lowers quality)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.double()
    if u is None:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits / temperature + gumbel).argmax(-1)


def forward_logits(model, x: torch.Tensor, real: Optional[torch.Tensor], start: int, end: int, *,
                   mask_id: int, prompt_len: int, cfg_scale: float, kv_cache: Optional[KVCache] = None,
                   offset: int = 0) -> torch.Tensor:
    """float32 logits (B, end - start, V) for canvas columns [start, end), with optional CFG. x holds canvas
    columns [offset, offset + x.shape[1]) (offset > 0 only for a cache-reuse forward).

    Only those columns go through the output head (`logits_at`): for large vocabularies the head is the
    biggest matmul, and no other column's prediction is ever used."""
    B = x.shape[0]
    W = end - start
    at = torch.zeros_like(x, dtype=torch.bool)
    at[:, start - offset:end - offset] = True
    kp = real if real is not None and not bool(real.all()) else None  # unmasked attention is faster
    extra = {} if kv_cache is None else {"kv_cache": kv_cache}
    if cfg_scale:
        uncond = x.clone()
        prompt_cols = torch.zeros_like(x, dtype=torch.bool)
        prompt_cols[:, :max(prompt_len - offset, 0)] = True
        if real is not None:
            prompt_cols &= real  # padding stays padding (hidden); only real prompt tokens are masked
        uncond[prompt_cols] = mask_id
        both = torch.cat([x, uncond])
        out = model(both, key_padding=None if kp is None else torch.cat([kp, kp]),
                    logits_at=torch.cat([at, at]), **extra).float().view(2, B, W, -1)
        cond, unc = out[0], out[1]
        logits = unc + (cfg_scale + 1.0) * (cond - unc)
    else:
        logits = model(x, key_padding=kp, logits_at=at, **extra).float().view(B, W, -1)
    logits[..., mask_id] = float("-inf")  # SUBS: the model never predicts the mask itself
    return logits


def ban_eos(logits: torch.Tensor, eos_id: Optional[int], first_col: int, min_new_tokens: int,
            cols: Optional[torch.Tensor] = None) -> None:
    """Forbid EOS at generated positions < min_new_tokens; logits (B, W, V) cover generated columns first_col..,
    or, with `cols`, logits (N, V) are N scattered columns, row n at generated column first_col + cols[n]."""
    if eos_id is None or min_new_tokens <= 0:
        return
    if cols is not None:
        logits[first_col + cols < min_new_tokens, eos_id] = float("-inf")
        return
    n = min(max(min_new_tokens - first_col, 0), logits.shape[1])
    if n:
        logits[:, :n, eos_id] = float("-inf")
