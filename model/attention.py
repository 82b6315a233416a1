"""One attention entry point; the backend and its mask are chosen once per batch.

Masks come from two optional per-token tensors so packed documents and padded prompts share one code
path: `doc_ids` (B, L) lets a token attend only within its own document, `key_padding` (B, L, True for
real tokens) hides padding. `causal` adds the autoregressive triangle.

`AttentionBatch.build(...)` runs once per forward (in Transformer.hidden) and every layer, and every
activation-checkpoint recompute, reuses what it built:
- nothing to mask (no padding, every row one document): no mask at all, the fastest SDPA kernels;
- sdpa: a dense (B, 1, L, L) mask (CPU, and the fallback), additive in the compute dtype when it is known;
- flex: a FlexAttention BlockMask (block-sparse; blocks inside one document run unmasked);
- flash: flash-attn varlen, `cu_seqlens` and the gather index computed here, so no layer syncs with the host.
`auto` picks flash (installed, CUDA, half precision) > flex (CUDA) > sdpa for masked batches on CUDA, and
sdpa on CPU (FlexAttention has no CPU backward in torch 2.13).

Compiled FlexAttention (CUDA) and one week of random lengths. Eager flex is torch's unfused reference (it
materializes the B x H x L x L scores), so flex must stay compiled whatever length a batch has. `_FLEX`
(`torch.compile(flex_attention)`) and `_BLOCK_MASK` (`torch.compile(create_block_mask)`) are made once, on
first use (making them at import would cost every `import model` the compiler's own import). The full
training length is compiled static (the fastest kernels, tiles known to divide it); a length that is not a
multiple of the flex tile (a random-length step) has its length dimensions marked dynamic, so the first such
step compiles one dynamic-length graph and every later length reuses it. Dynamo's exclusion guard (where
torch has it) keeps the static graph for the full length once the dynamic one exists. A length of one tile
or less takes SDPA with the dense mask (a one-tile block mask would be specialised into a third graph). So
each code object holds at most two graphs per grad mode, far below dynamo's recompile limit, after which it
would fall back to eager flex.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash")

FLEX_BLOCK = 128  # FlexAttention's default tile (queries and keys): block masks count in these

# Where flex and create_block_mask run compiled, and with which backend (tests: "cpu" and "eager" or
# "aot_eager", which trace and guard exactly as inductor does without generating code; FlexAttention
# has no CPU backward, and inductor's CPU flex template fails to build dynamic shapes in torch 2.13).
COMPILED_ON = ("cuda",)
COMPILE_BACKEND = "inductor"


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

    def __init__(self, backend: str, causal: bool, mask=None, block_mask=None, varlen=None, tiles=None):
        self.backend, self.causal = backend, causal
        self.mask, self.block_mask, self.varlen = mask, block_mask, varlen
        self.tiles = tiles  # SDPA by query tiles over the keys each tile may see (sparse_tiles)

    @classmethod
    def build(cls, doc_ids, key_padding, *, causal: bool, backend: str, seq_len: int, device,
              dtype=None, mask_known: bool = False) -> "AttentionBatch":
        """mask_known: the caller checked on the host that doc_ids / key_padding, when given, do mask something,
        so the device-side check (a host sync) is skipped."""
        given = doc_ids is not None or key_padding is not None
        masked = given and (mask_known or needs_mask(doc_ids, key_padding))
        name = resolve_backend(backend, device, masked, dtype)
        if not masked:
            if name == "flex":  # flex without a mask is plain attention: take SDPA's kernels
                name = "sdpa"
            return cls(name, causal)
        if name == "flex" and seq_len <= FLEX_BLOCK and _device_type(device) in COMPILED_ON:
            name = "sdpa"  # one tile: the dense mask is tiny, and compiled flex would specialise a graph for it
        if name == "sdpa":
            mask = build_mask(doc_ids, key_padding, causal, seq_len, seq_len, device)
            return cls(name, causal, mask=additive_mask(mask, dtype))
        if name == "flex":
            return cls(name, causal, block_mask=flex_block_mask(doc_ids, key_padding, causal, seq_len, device))
        return cls(name, causal, varlen=varlen_metadata(doc_ids, key_padding, seq_len, device))

    def for_dtype(self, dtype) -> "AttentionBatch":
        """This batch with a dense boolean mask made additive in the compute dtype (a caller's prebuilt mask,
        e.g. block diffusion's: the forward calls this once); itself when there is nothing to convert."""
        if dtype is None or not dtype.is_floating_point:
            return self
        if self.tiles is not None:
            if all(t.mask.dtype != torch.bool for t in self.tiles):
                return self
            return AttentionBatch(self.backend, self.causal, tiles=[
                MaskTile(t.start, t.stop, t.keys, additive_mask(t.mask, dtype)) for t in self.tiles])
        if self.mask is None or self.mask.dtype != torch.bool:
            return self
        return AttentionBatch(self.backend, self.causal, mask=additive_mask(self.mask, dtype),
                              block_mask=self.block_mask, varlen=self.varlen)


class MaskTile(NamedTuple):
    """Query rows start:stop attend the key positions `keys` (ascending; a slice when they are contiguous)
    under `mask` (B or 1, 1, stop - start, len(keys))."""
    start: int
    stop: int
    keys: Union[slice, torch.Tensor]
    mask: torch.Tensor


def sparse_tiles(mask: torch.Tensor, structure: torch.Tensor, rows: int) -> list:
    """A dense (B or 1, 1, N, N) boolean mask as query tiles of `rows` rows, each over only the key columns
    that `structure` (N, N) (a superset of `mask` that depends on no batch: the same tiles every step, so a
    compiled graph is not re-specialised) allows to some row of the tile. The same attention as the dense
    mask, row for row (the dropped columns are masked for every row of the tile); on CPU, SDPA over the 2L
    block-diffusion mask keeps ~36% of the score work this way (benchmarks/block_tiles.py).
    A tile whose rows see no key keeps one column, so fully masked rows stay what dense SDPA makes of them."""
    N = mask.shape[-1]
    if bool((mask & ~structure).any()):
        raise ValueError("sparse_tiles: `structure` must allow every pair the mask allows")
    tiles = []
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        cols = structure[start:stop].any(0).nonzero().flatten()
        if cols.numel() == 0:
            cols = torch.tensor([start], device=mask.device)
        first, last = int(cols[0]), int(cols[-1])
        keys = slice(first, last + 1) if last - first + 1 == cols.numel() else cols
        sub = mask[:, :, start:stop]
        sub = sub[..., keys] if isinstance(keys, slice) else sub.index_select(-1, cols)
        tiles.append(MaskTile(start, stop, keys, sub))
    return tiles


def _tiled(q, k, v, tiles, gqa: bool):
    outs = []
    for t in tiles:
        if isinstance(t.keys, slice):
            kk, vv = k[:, :, t.keys], v[:, :, t.keys]
        else:
            kk, vv = k.index_select(2, t.keys), v.index_select(2, t.keys)
        outs.append(F.scaled_dot_product_attention(q[:, :, t.start:t.stop], kk, vv, attn_mask=t.mask,
                                                   enable_gqa=gqa))
    return torch.cat(outs, 2)


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """SDPA turns a boolean mask into an additive one (0 / -inf, the query's dtype) in every call: once per
    batch instead of in every layer, and every layer's backward shares this one tensor. Unchanged when the
    compute dtype is not known."""
    if dtype is None or not dtype.is_floating_point:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _device_type(device) -> str:
    return torch.device(device).type


def _mask_mod(doc: torch.Tensor, keep: Optional[torch.Tensor], causal: bool):
    """The mask_mod of one batch, specialised: training batches (no padding) load no padding tensor."""
    if keep is None and not causal:
        def same_document(b, h, q, kv):
            return doc[b, q] == doc[b, kv]
        return same_document
    if keep is None:
        def same_document_causal(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (q >= kv)
        return same_document_causal
    if not causal:
        def same_document_kept(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & keep[b, kv]
        return same_document_kept

    def same_document_kept_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & keep[b, kv] & (q >= kv)
    return same_document_kept_causal


_BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                       "q_indices", "full_q_num_blocks", "full_q_indices")


def flex_block_mask(doc_ids, key_padding, causal: bool, seq_len: int, device):
    """The batch's BlockMask of documents, padding and the causal triangle (make_block_mask)."""
    B = (doc_ids if doc_ids is not None else key_padding).shape[0]
    doc = doc_ids if doc_ids is not None else torch.zeros(B, seq_len, dtype=torch.long, device=device)
    keep = key_padding.bool() if key_padding is not None else None
    return make_block_mask(_mask_mod(doc, keep, causal), B, seq_len, device, positional=((doc, 1), (keep, 1)))


def make_block_mask(mask_mod, B: Optional[int], seq_len: int, device, *, positional=()):
    """A (seq_len x seq_len) BlockMask of `mask_mod`, tiles of FLEX_BLOCK: the process's compiled
    create_block_mask on CUDA (eager, create_block_mask materializes (B, L, L) intermediates), eager elsewhere.
    positional: (tensor, dim) pairs, the tensors mask_mod reads with `dim` indexing the position; a length that
    is not a multiple of the tile gets those dimensions marked dynamic (module docstring), so one graph serves
    every such length. mask_mod must read lengths from such tensors, never from Python numbers it closes over
    (dynamo would specialise a graph per value). A compiler failure warns once and builds masks eagerly."""
    from torch.nn.attention.flex_attention import create_block_mask
    global _COMPILED_MASKS
    compiled = _device_type(device) in COMPILED_ON and not torch.compiler.is_compiling()
    ragged = compiled and seq_len % FLEX_BLOCK != 0  # (eager callers need no marks)
    if ragged:
        for t, dim in positional:
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, dim)
    block_mask = None
    if compiled and _COMPILED_MASKS:
        try:
            with _keep_static_graphs():
                block_mask = compiled_create_block_mask()(mask_mod, B, None, seq_len, seq_len, device=device,
                                                          BLOCK_SIZE=FLEX_BLOCK)
        except Exception as e:  # noqa: BLE001  (re-raised unless the compiler itself failed)
            if not is_compile_error(e):
                raise
            warnings.warn(f"compiled create_block_mask failed ({type(e).__name__}: {str(e)[:300]}); building "
                          f"block masks eagerly from now on (slower, (B, L, L) intermediates)")
            _COMPILED_MASKS = False
    if block_mask is None:
        block_mask = create_block_mask(mask_mod, B, None, seq_len, seq_len, device=device, BLOCK_SIZE=FLEX_BLOCK)
    if ragged:
        for name in _BLOCK_MASK_TENSORS:
            t = getattr(block_mask, name, None)
            if isinstance(t, torch.Tensor):
                for dim in range(2, t.dim()):  # (B, H, q blocks[, kv blocks]): the block counts
                    torch._dynamo.maybe_mark_dynamic(t, dim)
    return block_mask


_COMPILED_MASKS = True
_FLEX = None  # torch.compile(flex_attention), made once by compiled_flex()
_BLOCK_MASK = None  # torch.compile(create_block_mask), made once by compiled_create_block_mask()


def _compile_options(backend) -> dict:
    """Inductor options for compiled flex: wrap the compiled region in the `inductor_compiled_code` HOP, so
    op-level selective activation checkpointing sees it (and saves it: flex_sac_ops) when the blocks around
    it run eagerly; without it the region is opaque and its forward is recomputed in backward."""
    if backend != "inductor":
        return {}
    from torch._inductor import config as inductor_config
    return {"wrap_inductor_compiled_regions": True} if hasattr(inductor_config, "wrap_inductor_compiled_regions") \
        else {}


def compiled_flex():
    """The one compiled flex_attention of this process (dynamic lengths: see the module docstring)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        options = _compile_options(COMPILE_BACKEND)
        _FLEX = torch.compile(flex_attention, backend=COMPILE_BACKEND, **({"options": options} if options else {}))
    return _FLEX


def compiled_create_block_mask():
    """The one compiled create_block_mask of this process (replaces the deprecated `_compile=True`)."""
    global _BLOCK_MASK
    if _BLOCK_MASK is None:
        from torch.nn.attention.flex_attention import create_block_mask
        _BLOCK_MASK = torch.compile(create_block_mask, backend=COMPILE_BACKEND)
    return _BLOCK_MASK


@contextlib.contextmanager
def _keep_static_graphs():
    """While dynamo compiles here, a graph made dynamic by a new length excludes the lengths its static
    predecessor was compiled for, so the full training length keeps its static kernels (torch >= 2.13's
    automatic_dynamic_exclusion_guard; a no-op where torch lacks it). Set and restored per call: cheap."""
    config = torch._dynamo.config
    if not hasattr(config, "automatic_dynamic_exclusion_guard"):
        yield
        return
    previous = config.automatic_dynamic_exclusion_guard
    config.automatic_dynamic_exclusion_guard = True
    try:
        yield
    finally:
        config.automatic_dynamic_exclusion_guard = previous


_DEVICE_ERROR_TEXT = ("CUDA error", "CUDA driver error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert",
                      "illegal memory access", "out of memory", "NCCL error")


def is_compile_error(e: BaseException) -> bool:
    """Whether `e` is the compiler failing (dynamo, AOT autograd, inductor, Triton's build), so that running the
    same work eagerly is a sound fallback. A device error (a CUDA error, an out-of-memory, anything in the
    exception's chain that says so) is never one, even when the compiler wrapped it: the context it leaves
    behind is not fit to continue on."""
    from torch._dynamo.exc import TorchDynamoException
    if not isinstance(e, TorchDynamoException):
        return False
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))):
            return False
        if any(text in str(x) for text in _DEVICE_ERROR_TEXT):
            return False
        x = getattr(x, "inner_exception", None) or x.__cause__ or x.__context__
    return True


def flex_sac_ops() -> set:
    """The ops an op-level selective-activation-checkpointing policy must save so FlexAttention's forward is not
    recomputed in backward: the flex HOP (what a compiled block's trace shows) and, for eager blocks around
    the separately compiled flex, the `inductor_compiled_code` HOP its compiled region runs in (compiled_flex
    asks inductor to wrap it). Those present in this torch."""
    ops = set()
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
        ops.add(flex_hop)
    except ImportError:
        pass
    try:
        from torch._higher_order_ops.wrap import inductor_compiled_code
        ops.add(inductor_compiled_code)
    except ImportError:
        pass
    return ops


def flex_visible_to_sac() -> bool:
    """Whether op-level SAC around *eager* blocks can save the compiled flex: inductor wraps compiled regions
    for dispatch modes (wrap_inductor_compiled_regions) and dynamo compiles under SAC's modes
    (ignore_compile_internals). Where it cannot, eager blocks with op AC recompute flex's forward in backward
    (older torch even runs flex eagerly under the mode): compile the blocks (parallel.compile=true) instead."""
    try:
        from torch._higher_order_ops.wrap import inductor_compiled_code  # noqa: F401
        from torch._inductor import config as inductor_config
        from torch.utils.checkpoint import _CachingTorchDispatchMode
    except ImportError:
        return False
    return (hasattr(inductor_config, "wrap_inductor_compiled_regions")
            and hasattr(_CachingTorchDispatchMode, "ignore_compile_internals"))


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
    if batch.tiles is not None:
        return _tiled(q, k, v, batch.tiles, gqa)
    if batch.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=batch.causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, enable_gqa=gqa)


def _flex(q, k, v, *, block_mask, enable_gqa: bool):
    """FlexAttention: the process's compiled flex on CUDA (eager flex is a slow reference that materializes the
    scores); eager on CPU (forward only); inside a compiled block, traced into the block's own graph."""
    from torch.nn.attention.flex_attention import flex_attention
    if torch.compiler.is_compiling() or q.device.type not in COMPILED_ON:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if q.shape[2] % FLEX_BLOCK:  # a random length: one dynamic-length graph serves them all
        for t in (q, k, v):
            torch._dynamo.maybe_mark_dynamic(t, 2)
    with _keep_static_graphs():
        return compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


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


def prefix_mask(n: int, block_size: int, key_padding: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Dense bool (B or 1, 1, n, n) block-causal mask of one sequence [x_0^{<b}, x^b] (its last block may be
    noisy): a token sees every token of its own and earlier blocks. The per-block forward of the reference
    and of generation without a cache."""
    idx = torch.arange(n, device=device) // block_size
    mask = (idx[None, :] <= idx[:, None])[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, None, :]
    return mask
