"""Attention backends against the dense-mask reference; the per-batch mask; chunked cross-entropy; op-level
activation checkpointing (CPU)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.attention as attn
from model import ModelConfig, Transformer
from model.attention import AttentionBatch, attention, build_mask, varlen_metadata
from pretrain.engines.parallel import apply_ac

B, H, L, D = 3, 4, 16, 8


def batches():
    """Packed documents, right padding, left padding (with documents), and one-document rows."""
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 9 + [4] * 7, [5] * 16])
    right = torch.ones(B, L, dtype=torch.bool)
    right[0, 12:] = False
    right[2, 10:] = False
    left = torch.ones(B, L, dtype=torch.bool)
    left[1, :6] = False
    left[2, :3] = False
    return {"packed": (docs, None), "padded": (None, right), "left_padded": (docs, left),
            "left_padded_no_docs": (None, left)}


def qkv(kv_heads=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def reference(q, k, v, doc, keep, causal):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = build_mask(doc, keep, causal, L, L, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def real_queries(keep):
    return keep if keep is not None else torch.ones(B, L, dtype=torch.bool)


def varlen_emulation(q, k, v, meta, causal):
    """What flash_attn_varlen_func computes from the metadata, in plain PyTorch: attention inside each segment."""
    idx, cu = meta["index"], meta["cu_seqlens"].tolist()
    flat = [x.transpose(1, 2).reshape(B * L, x.shape[1], D)[idx] for x in (q, k, v)]
    rep = q.shape[1] // k.shape[1]
    out = torch.zeros(B * L, H, D, dtype=q.dtype)
    parts = []
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in flat)
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
    out = out.index_copy(0, idx, torch.cat(parts))
    return out.view(B, L, H, D).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [H, 2])
@pytest.mark.parametrize("name", list(batches()))
def test_sdpa_and_varlen_segments_match_dense_reference_forward_and_backward(name, kv_heads, causal):
    doc, keep = batches()[name]
    rows = real_queries(keep)
    q, k, v = qkv(kv_heads)
    ref = reference(q, k, v, doc, keep, causal)
    g_ref = torch.autograd.grad(ref.transpose(1, 2)[rows].sum(), (q, k, v))  # padding queries: ignored
    for backend in ("sdpa", "auto"):
        out = attention(q, k, v, causal=causal, backend=backend, doc_ids=doc, key_padding=keep)
        assert torch.allclose(out.transpose(1, 2)[rows], ref.transpose(1, 2)[rows], atol=1e-12), backend
        grads = torch.autograd.grad(out.transpose(1, 2)[rows].sum(), (q, k, v))
        for a, b in zip(grads, g_ref):
            assert torch.allclose(a, b, atol=1e-12), backend
    # flash-attn varlen runs on CUDA only; its inputs (segments, gather index) are checked here by
    # computing exactly what the kernel computes from them.
    meta = varlen_metadata(doc, keep, L, torch.device("cpu"))
    emu = varlen_emulation(q, k, v, meta, causal)
    assert torch.allclose(emu.transpose(1, 2)[rows], ref.transpose(1, 2)[rows], atol=1e-12)
    grads = torch.autograd.grad(emu.transpose(1, 2)[rows].sum(), (q, k, v))
    for a, b in zip(grads, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_varlen_segments_never_glue_a_left_padded_row_to_the_previous_row():
    # Row 1 is one document, left-padded: its first real token must start a new segment. (The old code
    # started segments only where the document id changed, so row 1 continued row 0's last segment.)
    doc = torch.zeros(2, 8, dtype=torch.long)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :3] = False
    meta = varlen_metadata(doc, keep, 8, torch.device("cpu"))
    assert meta["cu_seqlens"].tolist() == [0, 8, 13]
    assert meta["max_seqlen"] == 8
    # Padding inside a row splits it too (the kept tokens either side are not contiguous in attention).
    keep2 = torch.ones(1, 8, dtype=torch.bool)
    keep2[0, 3] = False
    assert varlen_metadata(None, keep2, 8, torch.device("cpu"))["cu_seqlens"].tolist() == [0, 3, 7]


@pytest.mark.parametrize("name", list(batches()))
def test_flex_attention_forward_matches_dense_reference_on_cpu(name):
    # FlexAttention has a CPU forward but no CPU backward in torch 2.13: the forward is checked here, the
    # backward by benchmarks/gpu_check.py on CUDA.
    pytest.importorskip("torch.nn.attention.flex_attention")
    doc, keep = batches()[name]
    rows = real_queries(keep)
    q, k, v = (x.detach().float() for x in qkv(2))
    ref = reference(q, k, v, doc, keep, causal=False)
    out = attention(q, k, v, causal=False, backend="flex", doc_ids=doc, key_padding=keep)
    assert torch.allclose(out.transpose(1, 2)[rows], ref.transpose(1, 2)[rows], atol=1e-5)


def test_one_document_rows_take_the_unmasked_path_and_auto_is_sdpa_on_cpu():
    doc = torch.tensor([[7] * L, [2] * L])
    b = AttentionBatch.build(doc, torch.ones(2, L, dtype=torch.bool), causal=False, backend="auto", seq_len=L,
                             device=torch.device("cpu"))
    assert b.backend == "sdpa" and b.mask is None
    packed = AttentionBatch.build(torch.tensor([[0] * 8 + [1] * 8]), None, causal=False, backend="auto",
                                  seq_len=L, device=torch.device("cpu"))
    assert packed.backend == "sdpa" and packed.mask is not None and packed.mask.shape == (1, 1, L, L)
    with pytest.raises(ValueError, match="choices"):
        AttentionBatch.build(None, None, causal=False, backend="xformers", seq_len=L, device=torch.device("cpu"))


def tiny(n_layers=3, **kw):
    cfg = ModelConfig(dim=32, n_layers=n_layers, n_heads=4, ffn_dim=64, vocab_size=50, mask_id=49, max_seq_len=32,
                      **kw)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    return m


def test_mask_is_built_once_per_batch_even_with_activation_checkpoint_recompute(monkeypatch):
    m = tiny()
    apply_ac(m, "full")
    calls = []
    real = attn.build_mask
    monkeypatch.setattr(attn, "build_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randint(0, 49, (2, 16))
    doc = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    m(x, doc_ids=doc).sum().backward()
    assert len(calls) == 1  # one forward, three layers, three recomputes


def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients():
    m = tiny()
    x = torch.randint(0, 49, (4, 16))
    at = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) < 0.6
    target = x[at]
    plain = F.cross_entropy(m(x, logits_at=at).float(), target, reduction="none")
    g_plain = torch.autograd.grad(plain.sum(), list(m.parameters()))
    chunked = m(x, logits_at=at, targets=target, ce_chunk=5)  # several chunks, a ragged last one
    assert at.sum() > 10
    assert torch.allclose(chunked, plain, atol=1e-6)
    g_chunked = torch.autograd.grad(chunked.sum(), list(m.parameters()))
    for a, b in zip(g_chunked, g_plain):
        assert torch.allclose(a, b, atol=1e-6)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["full", "op", "selective"])
def test_activation_checkpointing_keeps_gradients_and_op_level_recomputes_no_matmul(mode):
    x = torch.randint(0, 49, (2, 16))
    base = tiny()
    g_base = torch.autograd.grad(base(x).float().pow(2).mean(), list(base.parameters()))
    with CountMatmuls() as plain:
        base(x).float().pow(2).mean().backward()
    m = tiny()
    apply_ac(m, mode, every=2)
    g = torch.autograd.grad(m(x).float().pow(2).mean(), list(m.parameters()))
    for a, b in zip(g, g_base):
        assert torch.allclose(a, b, atol=1e-6)
    with CountMatmuls() as counted:
        m(x).float().pow(2).mean().backward()
    extra = counted.n - plain.n  # matmuls recomputed in backward
    # wq, wk, wv, wo, w1, w3 (the recompute stops early: w2's output is not needed by any backward)
    per_block = 6
    assert extra == {"full": 3 * per_block, "op": 0, "selective": per_block}[mode], (mode, extra)


def test_rope_table_survives_dtype_casts_of_the_model():
    m = tiny(n_layers=1)
    fresh = m.rope.clone()
    x = torch.randint(0, 49, (2, 16))
    for dtype in (torch.bfloat16, torch.float64, torch.float32):
        m.to(dtype)
        assert m.rope.dtype == torch.complex64 and torch.equal(m.rope, fresh), dtype
        assert m.tok_embeddings.weight.dtype == dtype
        assert m(x).dtype == dtype
    m.half().float()
    assert torch.equal(m.rope, fresh)
    with torch.device("meta"):
        meta = Transformer(m.cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=0)
    assert meta.rope.dtype == torch.complex64 and torch.equal(meta.rope, fresh)
