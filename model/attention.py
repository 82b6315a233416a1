"""One attention entry point with selectable backends.

Masks are built from two optional per-token tensors so packed documents and padded prompts share one
code path: `doc_ids` (B, L) lets a token attend only within its own document, `key_padding` (B, L, True
for real tokens) hides padding. `causal` adds the autoregressive triangle.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def build_mask(doc_ids: Optional[torch.Tensor], key_padding: Optional[torch.Tensor], causal: bool,
               q_len: int, k_len: int, device) -> Optional[torch.Tensor]:
    """Boolean (B or 1, 1, Lq, Lk) mask, True = may attend; None when nothing is masked."""
    mask = None
    if doc_ids is not None:
        mask = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    if key_padding is not None:
        kp = key_padding[:, None, None, :].bool()
        mask = kp if mask is None else mask & kp
    if causal:
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
        mask = tri if mask is None else mask & tri
    return mask


def _flash_available(q: torch.Tensor) -> bool:
    if not q.is_cuda:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention(q, k, v, *, causal: bool, backend: str = "sdpa", doc_ids=None, key_padding=None):
    """q: (B, Hq, L, D), k/v: (B, Hkv, L, D). Returns (B, Hq, L, D)."""
    if backend == "flash":
        if not _flash_available(q):
            raise RuntimeError("model.attn_backend=flash needs a CUDA device and the flash-attn package "
                               "(pip install 'unmask[gpu]'); use model.attn_backend=sdpa otherwise")
        return _flash(q, k, v, causal=causal, doc_ids=doc_ids, key_padding=key_padding)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choices: sdpa, flash")
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped KV heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if doc_ids is None and key_padding is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mask = build_mask(doc_ids, key_padding, causal, q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _flash(q, k, v, *, causal, doc_ids, key_padding):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    b, hq, L, d = q.shape
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # flash kernels take half precision only
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, L, H, D)
    if doc_ids is None and key_padding is None:
        return flash_attn_func(q, k, v, causal=causal).transpose(1, 2).to(dtype)
    # Variable-length path: every (row, document) segment becomes one sequence.
    seg = doc_ids if doc_ids is not None else torch.zeros(b, L, dtype=torch.long, device=q.device)
    keep = key_padding.bool() if key_padding is not None else torch.ones(b, L, dtype=torch.bool, device=q.device)
    boundary = torch.ones(b, L, dtype=torch.bool, device=q.device)
    boundary[:, 1:] = seg[:, 1:] != seg[:, :-1]
    flat_keep = keep.flatten()
    starts = (boundary & keep).flatten()[flat_keep]
    lengths = torch.diff(torch.nonzero(torch.cat([starts, starts.new_ones(1)])).flatten())
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=q.device)
    cu[1:] = lengths.cumsum(0)
    max_len = int(lengths.max())
    qf, kf, vf = (x.reshape(b * L, x.shape[2], d)[flat_keep] for x in (q, k, v))
    out = flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, causal=causal)
    full = out.new_zeros(b * L, hq, d)
    full[flat_keep] = out
    return full.view(b, L, hq, d).transpose(1, 2).to(dtype)
