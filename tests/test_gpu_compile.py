"""Compiled FlexAttention as the GPU path runs it, exercised on CPU: a bounded number of graphs whatever the
lengths (no recompile storm, no fallback to eager flex), SAC can see the compiled region, and only compiler
failures fall back to eager block masks. Compiling costs tens of seconds here: keep these few and small."""
import pytest
import torch
import torch.nn.functional as F

import model.attention as attn
from model.attention import AttentionBatch, attention, build_mask

pytest.importorskip("torch.nn.attention.flex_attention")


def packed(B, L, mean=37):
    """Document ids of rows packed with documents of varying lengths (different in each row)."""
    doc = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        doc[b] = torch.arange(L) // (mean + 11 * b) + 100 * b
    return doc


def reference(q, k, v, doc):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=build_mask(doc, None, False, q.shape[2], q.shape[2],
                                                                         q.device))


class Counting:
    """A dynamo backend that runs graphs eagerly and records each graph and each call of it."""

    def __init__(self):
        from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
        self.flex_hop = flex_hop
        self.graphs = []  # "flex" or "mask", in compile order
        self.calls = []  # (kind, index among graphs of that kind)

    def __call__(self, gm, example_inputs):
        kind = "flex" if any(n.target is self.flex_hop for n in gm.graph.nodes) else "mask"
        index = self.graphs.count(kind)
        self.graphs.append(kind)

        def run(*args):
            self.calls.append((kind, index))
            return gm.forward(*args)
        return run


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """Let the compiled flex path run on CPU with a fresh compiler state (restored afterwards)."""
    torch._dynamo.reset()
    monkeypatch.setattr(attn, "COMPILED_ON", ("cuda", "cpu"))
    monkeypatch.setattr(attn, "_FLEX", None)
    monkeypatch.setattr(attn, "_BLOCK_MASK", None)
    monkeypatch.setattr(attn, "_COMPILED_MASKS", True)
    yield
    torch._dynamo.reset()


def test_twelve_lengths_compile_two_graphs_and_never_fall_back_to_eager_flex(compiled_on_cpu, monkeypatch):
    backend = Counting()
    monkeypatch.setattr(attn, "COMPILE_BACKEND", backend)
    B, H, D = 2, 2, 16
    # The full length first (static), then random lengths: ragged, one tile or less, other multiples of 128.
    lengths = [256, 200, 77, 300, 1000, 129, 640, 384, 33, 250, 512, 1023]
    assert len(set(lengths)) == 12
    g = torch.Generator().manual_seed(0)
    # A low limit that fails loudly instead of silently running eager flex (what happens once it is reached).
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for L in lengths + [256]:
            doc = packed(B, L)
            q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
            batch = AttentionBatch.build(doc, None, causal=False, backend="flex", seq_len=L, device="cpu")
            assert batch.backend == ("sdpa" if L <= attn.FLEX_BLOCK else "flex"), L
            out = attention(q, k, v, causal=False, batch=batch)
            assert torch.allclose(out, reference(q, k, v, doc), atol=1e-5), L
    # One static graph for the full length, one dynamic-length graph for every other length: each of flex and
    # create_block_mask.
    assert backend.graphs.count("flex") == 2 and backend.graphs.count("mask") == 2, backend.graphs
    flex_calls = [c for c in backend.calls if c[0] == "flex"]
    assert len(flex_calls) == sum(L > attn.FLEX_BLOCK for L in lengths) + 1
    assert flex_calls[0] == ("flex", 0) and flex_calls[1] == ("flex", 1)
    if hasattr(torch._dynamo.config, "automatic_dynamic_exclusion_guard"):
        assert flex_calls[-1] == ("flex", 0)  # back at the full length: its static graph, not the dynamic one


def test_compiled_flex_region_is_visible_to_selective_activation_checkpointing(compiled_on_cpu):
    # Inductor on CPU, forward only (FlexAttention has no CPU backward); static shapes. With eager blocks the
    # SAC policy must see the compiled flex as one op it can save: `inductor_compiled_code`.
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    if not attn.flex_visible_to_sac():
        pytest.skip("this torch cannot show compiled regions to SAC")
    B, H, L, D = 2, 2, 256, 16
    doc = packed(B, L)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    seen = []

    def policy(ctx, op, *args, **kwargs):
        seen.append(op)
        return CheckpointPolicy.MUST_SAVE if op in attn.flex_sac_ops() else CheckpointPolicy.PREFER_RECOMPUTE

    def block(q):
        batch = AttentionBatch.build(doc, None, causal=False, backend="flex", seq_len=L, device="cpu")
        return attention(q, k, v, causal=False, batch=batch) * 1.0
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        out = checkpoint(block, q, use_reentrant=False,
                         context_fn=lambda: create_selective_checkpoint_contexts(policy))
    assert torch.allclose(out, reference(q, k, v, doc), atol=1e-5)
    names = [str(op) for op in seen]
    assert "inductor_compiled_code" in names, names
    assert not any("flex_attention" in n for n in names), names  # not eager flex under the mode
    assert torch.ops.higher_order.flex_attention in attn.flex_sac_ops()


def test_only_compiler_failures_fall_back_to_eager_block_masks(compiled_on_cpu, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError
    B, L = 2, 256
    doc = packed(B, L)

    def failing(exc):
        def compiled():
            def create(*args, **kwargs):
                raise exc
            return create
        return compiled

    # A device error, bare or wrapped by the compiler, is never swallowed.
    cuda_error = RuntimeError("CUDA error: an illegal memory access was encountered")
    for exc in (cuda_error, BackendCompilerFailed("inductor", cuda_error, None),
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        assert not attn.is_compile_error(exc)
        monkeypatch.setattr(attn, "compiled_create_block_mask", failing(exc))
        with pytest.raises(type(exc)):
            attn.flex_block_mask(doc, None, False, L, torch.device("cpu"))
        assert attn._COMPILED_MASKS
    # The compiler failing (here: Triton's build without a C compiler) warns once and builds masks eagerly.
    broken = InductorError(RuntimeError("Failed to find C compiler. Please specify via CC environment variable"),
                           None)
    assert attn.is_compile_error(broken)
    monkeypatch.setattr(attn, "compiled_create_block_mask", failing(broken))
    with pytest.warns(UserWarning, match="building block masks eagerly"):
        mask = attn.flex_block_mask(doc, None, False, L, torch.device("cpu"))
    assert not attn._COMPILED_MASKS
    monkeypatch.setattr(attn, "COMPILED_ON", ("cuda",))
    expected = attn.flex_block_mask(doc, None, False, L, torch.device("cpu"))
    assert torch.equal(mask.kv_num_blocks, expected.kv_num_blocks) and torch.equal(mask.kv_indices,
                                                                                    expected.kv_indices)
