"""One attention entry point; the backend and its mask are chosen once per batch.

Masks come from two optional per-token tensors so packed documents and padded prompts share one code
path: `doc_ids` (B, L) lets a token attend only within its own document, `key_padding` (B, L, True for
real tokens) hides padding. `causal` adds the autoregressive triangle.

`AttentionBatch.build(...)` runs once per forward (in Transformer.hidden) and every layer, and every
activation-checkpoint recompute, reuses what it built:
- nothing to mask (no padding, every row one document): no mask at all, the fastest SDPA kernels;
- sdpa: a dense boolean (B, 1, L, L) mask (CPU, and the fallback);
- flex: a FlexAttention BlockMask (block-sparse; blocks inside one document run unmasked);
- flash: flash-attn varlen, `cu_seqlens` and the gather index computed here, so no layer syncs with the host.
`auto` picks flash (installed, CUDA, half precision) > flex (CUDA) > sdpa for masked batches on CUDA, and
sdpa on CPU (FlexAttention has no CPU backward in torch 2.13).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash")


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


def flash_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flex_available(device: torch.device) -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda"


def needs_mask(doc_ids: Optional[torch.Tensor], key_padding: Optional[torch.Tensor]) -> bool:
    """One host sync per batch: whether any row has padding or more than one document."""
    if key_padding is not None and not bool(key_padding.all()):
        return True
    return doc_ids is not None and not bool((doc_ids == doc_ids[:, :1]).all())


def resolve_backend(backend: str, device: torch.device, masked: bool, dtype=None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choices: {', '.join(BACKENDS)}")
    if backend == "flash" and not flash_available(device):
        raise RuntimeError("model.attn_backend=flash needs a CUDA device and the flash-attn package "
                           "(pip install 'unmask[gpu]'); use model.attn_backend=sdpa (or auto) otherwise")
    if backend != "auto":
        return backend
    if not masked or device.type != "cuda":
        return "sdpa"
    if flash_available(device) and dtype in (None, torch.float16, torch.bfloat16):
        return "flash"
    return "flex" if flex_available(device) else "sdpa"


class AttentionBatch:
    """What every layer's attention needs for one batch (a plain class: FSDP's input cast leaves it alone)."""

    def __init__(self, backend: str, causal: bool, mask=None, block_mask=None, varlen=None):
        self.backend, self.causal = backend, causal
        self.mask, self.block_mask, self.varlen = mask, block_mask, varlen

    @classmethod
    def build(cls, doc_ids, key_padding, *, causal: bool, backend: str, seq_len: int, device,
              dtype=None) -> "AttentionBatch":
        masked = (doc_ids is not None or key_padding is not None) and needs_mask(doc_ids, key_padding)
        name = resolve_backend(backend, device, masked, dtype)
        if not masked:
            if name == "flex":  # flex without a mask is plain attention: take SDPA's kernels
                name = "sdpa"
            return cls(name, causal)
        if name == "sdpa":
            return cls(name, causal, mask=build_mask(doc_ids, key_padding, causal, seq_len, seq_len, device))
        if name == "flex":
            return cls(name, causal, block_mask=flex_block_mask(doc_ids, key_padding, causal, seq_len, device))
        return cls(name, causal, varlen=varlen_metadata(doc_ids, key_padding, seq_len, device))


def flex_block_mask(doc_ids, key_padding, causal: bool, seq_len: int, device):
    from torch.nn.attention.flex_attention import create_block_mask
    B = (doc_ids if doc_ids is not None else key_padding).shape[0]
    doc = doc_ids if doc_ids is not None else torch.zeros(B, seq_len, dtype=torch.long, device=device)
    keep = (key_padding.bool() if key_padding is not None
            else torch.ones(B, seq_len, dtype=torch.bool, device=device))

    def mask_mod(b, h, q, kv):
        ok = (doc[b, q] == doc[b, kv]) & keep[b, kv]
        return ok & (q >= kv) if causal else ok
    global _COMPILED_MASKS
    if device.type == "cuda" and _COMPILED_MASKS:
        # Compiled, the block mask is built tile by tile; eager, it materializes (B, L, L) int64 intermediates.
        try:
            return create_block_mask(mask_mod, B, None, seq_len, seq_len, device=device, _compile=True)
        except Exception as e:  # noqa: BLE001  (an older or unusual torch: build it eagerly from now on)
            import warnings
            warnings.warn(f"compiled create_block_mask failed ({type(e).__name__}: {e}); building block masks "
                          f"eagerly")
            _COMPILED_MASKS = False
    return create_block_mask(mask_mod, B, None, seq_len, seq_len, device=device)


_COMPILED_MASKS = True


def varlen_metadata(doc_ids, key_padding, seq_len: int, device) -> dict:
    """Segments for flash-attn varlen: every maximal run of kept tokens of one document within one row.
    A segment starts at a row's first position, where the document changes, or right after a padding token
    (so a left-padded row never continues the previous row's last segment)."""
    B = (doc_ids if doc_ids is not None else key_padding).shape[0]
    seg = doc_ids if doc_ids is not None else torch.zeros(B, seq_len, dtype=torch.long, device=device)
    keep = (key_padding.bool() if key_padding is not None
            else torch.ones(B, seq_len, dtype=torch.bool, device=device))
    start = torch.ones(B, seq_len, dtype=torch.bool, device=device)
    start[:, 1:] = (seg[:, 1:] != seg[:, :-1]) | ~keep[:, :-1]
    flat_keep = keep.flatten()
    index = flat_keep.nonzero().flatten()  # kept tokens, row-major
    starts = (start & keep).flatten()[index].nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([index.numel()])]).to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    # The only host syncs: here, once per batch (flash-attn takes max_seqlen as a Python int).
    return {"index": index, "cu_seqlens": cu, "max_seqlen": int(lengths.max()), "total": B * seq_len}


def attention(q, k, v, *, causal: bool, backend: str = "sdpa", doc_ids=None, key_padding=None,
              batch: Optional[AttentionBatch] = None, kv_cache=None):
    """q: (B, Hq, L, D), k/v: (B, Hkv, L, D). Returns (B, Hq, L, D). `batch` (built once per forward) wins;
    without it one is built here from doc_ids / key_padding (one-off callers). `kv_cache` (a
    model.kvcache.LayerCache): stores k/v; when it returns a mask, attend over its cached keys with SDPA."""
    gqa = q.shape[1] != k.shape[1]
    if kv_cache is not None:
        k, v, cache_mask = kv_cache.update(k, v)
        if cache_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, enable_gqa=gqa)
    if batch is None:
        batch = AttentionBatch.build(doc_ids, key_padding, causal=causal, backend=backend, seq_len=q.shape[2],
                                     device=q.device, dtype=q.dtype)
    if batch.backend == "flash":
        return _flash(q, k, v, batch)
    if batch.backend == "flex":
        return _flex(q, k, v, block_mask=batch.block_mask, enable_gqa=gqa)
    if batch.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=batch.causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, enable_gqa=gqa)


_FLEX = None


def _flex(q, k, v, *, block_mask, enable_gqa: bool):
    """FlexAttention, compiled once on CUDA (eager flex is a slow reference); eager on CPU (forward only)."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if q.is_cuda:
        if _FLEX is None:
            _FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX
    else:
        fn = flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _flash(q, k, v, batch: AttentionBatch):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    b, hq, L, d = q.shape
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # flash kernels take half precision only
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, L, H, D); flash-attn handles grouped KV heads
    if batch.varlen is None:
        return flash_attn_func(q, k, v, causal=batch.causal).transpose(1, 2).to(dtype)
    meta = batch.varlen
    index = meta["index"]
    qf, kf, vf = (x.reshape(b * L, x.shape[2], d).index_select(0, index) for x in (q, k, v))
    out = flash_attn_varlen_func(qf, kf, vf, meta["cu_seqlens"], meta["cu_seqlens"], meta["max_seqlen"],
                                 meta["max_seqlen"], causal=batch.causal)
    full = out.new_zeros(b * L, hq, d).index_copy(0, index, out)  # padding positions: zeros
    return full.view(b, L, hq, d).transpose(1, 2).to(dtype)
