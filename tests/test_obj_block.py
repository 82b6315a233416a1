"""Block diffusion (model/objectives/block.py): exactness of the loss, the mask and the bound.

- block size L is masked diffusion (same draw, same loss) and block size 1 the AR chain rule;
- the vectorised 2L forward equals one forward per block, in logits and gradients, packed documents too;
- the dense mask, the flex mask_mod and FlexAttention's BlockMask (L not a multiple of 128) equal a brute force;
- the estimator's expectation equals the block NELBO by enumeration, which equals -log p(x) for an oracle.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from data.synthetic import MarkovLanguage
from model import ModelConfig, Transformer
from model.objectives import DiffusionConfig, build_objective
from model.attention import AttentionBatch
from model.objectives.block import (flex_training_mask, pair_allowed, per_block_logits, prefix_mask, training_mask,
                                    two_l_forward)

V, MASK = 11, 10


def tiny(seed=0, vocab=V, mask=MASK, dtype=torch.float64, L=32):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=vocab, mask_id=mask, max_seq_len=L,
                      attn_backend="sdpa")
    m = Transformer(cfg)
    m.init_weights(seed)
    return m.to(dtype)


def block_obj(bs, **kw):
    return build_objective(DiffusionConfig(objective="block", block_size=bs, **kw), mask_id=MASK, vocab_size=V)


def brute_mask(L, bs):
    out = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qn, kn = q < L, k < L
            qb, kb = (q % L) // bs, (k % L) // bs
            if qn and kn:
                out[q, k] = qb == kb
            elif qn:
                out[q, k] = kb < qb
            elif not kn:
                out[q, k] = kb <= qb
    return out


@pytest.mark.parametrize("L,bs", [(8, 2), (12, 4), (6, 1), (6, 6), (10, 3)])
def test_mask_equals_brute_force(L, bs):
    assert torch.equal(training_mask(L, bs)[0, 0], brute_mask(L, bs))


def test_flex_block_mask_equals_brute_force_off_the_tile():
    """L = 70 (2L = 140, not a multiple of the 128 tile), packed documents: FlexAttention (eager, CPU
    forward) under the BlockMask equals SDPA under the dense mask, and mask_mod equals the brute force."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention
    L, bs = 70, 4
    idx = torch.arange(2 * L)
    assert torch.equal(pair_allowed(idx[:, None], idx[None, :], L, bs), brute_mask(L, bs))
    doc = torch.tensor([[0] * 37 + [1] * 33, [0] * 70])
    bm = flex_training_mask(L, bs, doc, None, "cpu")
    dense = training_mask(L, bs, doc)
    q, k, v = (torch.randn(2, 2, 2 * L, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    out = flex_attention(q, k, v, block_mask=bm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_compiled_block_masks_serve_every_length_with_two_graphs(monkeypatch):
    """The GPU path on CPU: flex_training_mask through the process's compiled create_block_mask
    (model.attention.make_block_mask). The full length compiles one static graph and every other length, of
    any block size, one shared dynamic graph (the mask reads L and the block size from tensors); the masks
    equal the dense one."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    import model.attention as attn
    from test_gpu_compile import Counting, packed
    backend = Counting()
    torch._dynamo.reset()
    for name, value in (("COMPILED_ON", ("cuda", "cpu")), ("_BLOCK_MASK", None), ("_COMPILED_MASKS", True),
                        ("COMPILE_BACKEND", backend)):
        monkeypatch.setattr(attn, name, value)
    g = torch.Generator().manual_seed(0)
    try:
        with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
            for L, bs in ((128, 4), (100, 4), (200, 8), (72, 2), (128, 4)):
                doc = packed(2, L, mean=29)
                q, k, v = (torch.randn(2, 2, 2 * L, 16, generator=g) for _ in range(3))
                out = flex_attention(q, k, v, block_mask=flex_training_mask(L, bs, doc, None, "cpu"))
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=training_mask(L, bs, doc))
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
    assert backend.graphs == ["mask", "mask"], backend.graphs


def _draw(obj, x0, seed=3):
    return obj.draw(seed, 0, x0.shape[0], x0.shape[1])


def test_block_size_L_is_masked_diffusion():
    model = tiny(dtype=torch.float32)
    x0 = torch.randint(0, MASK, (4, 16))
    mdm = build_objective(DiffusionConfig(objective="mdm"), mask_id=MASK, vocab_size=V)
    blk = block_obj(16)
    n_m, n_b = mdm.draw(3, 0, 4, 16), blk.draw(3, 0, 4, 16)
    assert torch.equal(n_m.u, n_b.u.view(-1)) and torch.equal(n_m.mask_uniform, n_b.mask_uniform)
    bm, bb = mdm.noise(x0, n_m), blk.noise(x0, n_b)
    assert torch.equal(bm.xt, bb.xt) and torch.allclose(bm.weights, bb.weights)
    lm, _ = mdm.loss(model, bm)
    lb, _ = blk.loss(model, bb)
    torch.testing.assert_close(lb, lm, atol=1e-6, rtol=1e-6)
    # the bound: the same masks and weights give the same sums
    maskable = torch.ones(16, dtype=torch.bool)
    for k in range(3):
        d = blk.eval_draw("t", seed=1, seq=0, sample=k, samples=3, maskable=maskable, eps=1e-3, group=1)
        masked, w = d.noise
        from model.objectives.base import EvalDraw
        em = mdm.eval_sums(model, x0[:1], [EvalDraw(masked, float(w[masked][0]))], keep=maskable[None])
        eb = blk.eval_sums(model, x0[:1], [d], keep=maskable[None])
        torch.testing.assert_close(eb, em, atol=1e-5, rtol=1e-6)


def ar_chain_nll(model, x0):
    """The network read as a next-token model: -log p(x_i | x_<i) from input [x_<i, MASK] (block size 1)."""
    B, L = x0.shape
    out = torch.zeros(B, dtype=torch.float64)
    for i in range(L):
        inp = torch.cat([x0[:, :i], torch.full((B, 1), MASK)], 1)
        causal = AttentionBatch("sdpa", False, mask=prefix_mask(i + 1, 1))  # the clean past never sees the mask
        logp = model(inp, attn=causal)[:, -1].double().log_softmax(-1)
        out += -logp.gather(1, x0[:, i:i + 1]).squeeze(1)
    return out


def test_block_size_1_is_the_ar_chain_rule():
    model = tiny()
    x0 = torch.randint(0, MASK, (3, 8))
    blk = block_obj(1)
    batch = blk.noise(x0, _draw(blk, x0))
    assert bool(batch.at.all()) and bool((batch.weights == 1).all())
    loss, _ = blk.loss(model, batch, ce_chunk=0)
    ref = ar_chain_nll(model, x0)
    torch.testing.assert_close(loss.double(), ref.sum() / x0.numel(), atol=1e-6, rtol=1e-6)  # fp32 CE
    # the bound is exact (no Monte Carlo) and equals it per sequence, subs off (the head may put mass on MASK)
    maskable = torch.ones(8, dtype=torch.bool)
    d = [blk.eval_draw("count", seed=0, seq=i, sample=0, samples=1, maskable=maskable, eps=1e-3, group=1)
         for i in range(3)]
    sums = blk.eval_sums(model, x0, d, keep=torch.ones_like(x0, dtype=torch.bool), subs=False)
    torch.testing.assert_close(sums, ref, atol=1e-5, rtol=1e-6)  # fp32 logits


@pytest.mark.parametrize("L,bs", [(12, 4), (144, 16)])  # 2L = 288 runs SDPA by query tiles (TILE_ROWS)
@pytest.mark.parametrize("packed", [False, True])
def test_vectorised_forward_equals_per_block_forwards(packed, L, bs):
    model = tiny(L=L)
    x0 = torch.randint(0, MASK, (2, L))
    doc = torch.tensor([[0] * 5 + [1] * (L - 5), [0] * (L - 3) + [1] * 3]) if packed else None
    blk = block_obj(bs)
    b = blk.noise(x0, _draw(blk, x0), doc)
    every = torch.ones_like(x0, dtype=torch.bool)
    vec = two_l_forward(model, b.xt, x0, every, bs, doc_ids=doc).view(2, L, V)
    ref = per_block_logits(model, b.xt, x0, bs, doc_ids=doc)
    torch.testing.assert_close(vec, ref, atol=1e-10, rtol=1e-10)
    # gradients of a weighted loss over the masked positions
    g = torch.randn(2, L, V, dtype=torch.float64)
    grads = []
    for fn in (lambda: two_l_forward(model, b.xt, x0, every, bs, doc_ids=doc).view(2, L, V),
               lambda: per_block_logits(model, b.xt, x0, bs, doc_ids=doc)):
        model.zero_grad()
        (fn() * g).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-8, rtol=1e-6)  # RoPE runs in fp32


def test_training_loss_gradient_matches_per_block_loss():
    """The objective's chunked loss (targets, ce_chunk) has the gradient of the per-block reference loss."""
    L, bs = 8, 2
    model = tiny()
    x0 = torch.randint(0, MASK, (3, L))
    blk = block_obj(bs)
    b = blk.noise(x0, _draw(blk, x0))
    model.zero_grad()
    loss, _ = blk.loss(model, b, ce_chunk=5)
    loss.backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = per_block_logits(model, b.xt, x0, bs)[b.at]
    ref = (torch.nn.functional.cross_entropy(logits, b.targets, reduction="none") * b.weights).sum() / x0.numel()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.double(), atol=1e-6, rtol=1e-6)  # the head's CE is fp32
    for a, c in zip(g1, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, c, atol=1e-7, rtol=1e-5)
    # the trainer's path: flat positions computed on the host (Noised.to), mapped into the 2L input
    moved = b.to("cpu")
    assert moved.index is not None
    assert torch.equal(blk.loss(model, moved, ce_chunk=5)[0], loss)


def test_draw_is_stratified_over_batch_and_blocks_and_pure():
    blk = block_obj(4)
    n1, n2 = blk.draw(5, 7, 8, 16), blk.draw(5, 7, 8, 16)
    assert torch.equal(n1.u, n2.u) and n1.u.shape == (8, 4)
    # stratified: the 32 draws hit each of 32 equal strata once
    strata = torch.sort(((1 - n1.u.double().flatten()) * 32).floor()).values
    assert torch.equal(strata, torch.arange(32, dtype=torch.float64))
    # micro-batch slicing sees the same rows
    sub = n1.rows(slice(2, 4))
    assert torch.equal(sub.u, n1.u[2:4])


def test_block_size_must_divide_seq_len_and_be_set():
    with pytest.raises(ValueError, match="block_size"):
        block_obj(0)
    with pytest.raises(ValueError, match="must divide data.seq_len"):
        block_obj(5).draw(0, 0, 2, 16)
    with pytest.raises(ValueError, match="time_conditioning"):
        block_obj(4).check_model(ModelConfig(vocab_size=V, mask_id=MASK, time_conditioning="adaln"))


def test_keep_first_never_masks_bos_and_clip_keeps_the_weight():
    blk = block_obj(4, block_keep_first=True, block_t_min=0.6, block_t_max=0.9)
    x0 = torch.randint(0, MASK, (64, 16))
    b = blk.noise(x0, _draw(blk, x0))
    assert not bool(b.at[:, 0].any())
    # weight 1/t with t in [0.6, 0.9] (BD3-LM would have dropped it to 1 here: t_min > 0.5)
    assert float(b.weights.min()) >= 1 / 0.9 - 1e-6 and float(b.weights.max()) <= 1 / 0.6 + 1e-6


def test_clip_search_picks_the_least_variance_interval():
    from model.objectives.block import clip_candidates, clip_search
    cands = clip_candidates()
    assert (1e-3, 1.0) in cands and (0.5, 1.0) in cands and all(b - a >= 0.5 - 2e-3 for a, b in cands)
    variances = {c: 2.0 if c == (1e-3, 1.0) else 1.0 + abs(c[0] - 0.2) for c in cands}
    assert clip_search(variances) == (0.2, 1.0)  # every interval from 0.2 ties: the widest
    assert clip_search({(0.1, 0.6): 1.0, (0.1, 0.9): 1.0, (1e-3, 1.0): 3.0}) == (0.1, 0.9)  # ties: the wider


# ------------------------------------------------------------------------------------- the bound, exactly
def enumerate_estimator(obj, model, x0, maskable):
    """E over the 'count' estimator's draw distribution, exactly: per block, l uniform on {1..n}, then a uniform
    subset of size l, weight n/l; blocks independent, so the expectation is the sum over blocks."""
    L = x0.numel()
    total = 0.0
    from model.objectives.base import EvalDraw
    for start in range(0, L, obj.block_size):
        cand = [i for i in range(start, min(L, start + obj.block_size)) if maskable[i]]
        n = len(cand)
        for l in range(1, n + 1):
            subsets = list(itertools.combinations(cand, l))
            for S in subsets:
                m = torch.zeros(L, dtype=torch.bool)
                m[list(S)] = True
                d = EvalDraw((m, m.double() * n / l), 1.0)
                v = obj.eval_sums(model, x0[None], [d], keep=torch.ones(1, L, dtype=torch.bool), subs=False)
                total += float(v) / n / len(subsets)
    return total


def test_estimator_expectation_is_the_enumerated_block_nelbo():
    L, bs = 6, 3
    model = tiny()
    obj = block_obj(bs)
    x0 = torch.randint(0, MASK, (L,))

    def cond_logprobs(xt):  # [x_0^{<b}, x_t^b]: the per-block forward, block-causal over the given prefix
        return per_block_logits(model, xt[None], xt[None], bs)[0].double().log_softmax(-1)
    exact = obj.exact_nelbo(cond_logprobs, x0)
    est = enumerate_estimator(obj, model, x0, torch.ones(L, dtype=torch.bool))
    assert est == pytest.approx(exact, rel=1e-6)  # eval_sums' logits are fp32


def test_monte_carlo_draws_average_to_the_nelbo():
    """The implemented eval_draw ('count' and 't') averages to the enumerated bound within its error."""
    L, bs = 6, 3
    model = tiny()
    obj = block_obj(bs)
    x0 = torch.randint(0, MASK, (L,))
    exact = obj.exact_nelbo(lambda xt: per_block_logits(model, xt[None], xt[None], bs)[0].double().log_softmax(-1),
                            x0)
    maskable = torch.ones(L, dtype=torch.bool)
    for method in ("count", "t"):
        K = 600
        draws = [obj.eval_draw(method, seed=s, seq=0, sample=k, samples=K, maskable=maskable, eps=1e-4, group=1)
                 for s in range(2) for k in range(K)]
        vals = obj.eval_sums(model, x0[None].expand(len(draws), L), draws,
                             keep=torch.ones(len(draws), L, dtype=torch.bool), subs=False)
        err = float(vals.std()) / math.sqrt(len(draws) / 8)  # stratified draws: a conservative error
        assert abs(float(vals.mean()) - exact) < 4 * err + 1e-3 * exact, method


def markov_logprobs(lang, xt):
    """Exact log p(x_i | visible tokens of xt) under a Markov chain (positions >= S are invisible), by
    enumerating every completion: tiny S and length only."""
    S = lang.num_symbols
    e = xt.numel()
    out = torch.full((e, S + 1), -math.inf, dtype=torch.float64)
    probs = np.zeros((e, S))
    for seq in itertools.product(range(S), repeat=e):
        if any(int(xt[i]) < S and int(xt[i]) != seq[i] for i in range(e)):
            continue
        p = lang.pi[seq[0]] * np.prod([lang.P[a, b] for a, b in zip(seq, seq[1:])])
        for i in range(e):
            probs[i, seq[i]] += p
    probs /= probs.sum(1, keepdims=True)
    out[:, :S] = torch.from_numpy(np.log(np.maximum(probs, 1e-300)))
    return out


@pytest.mark.parametrize("bs", [1, 2, 4])
def test_exact_oracle_makes_the_block_nelbo_the_log_likelihood(bs):
    lang = MarkovLanguage(num_symbols=3, branching=2, concentration=0.7, seed=1)
    obj = build_objective(DiffusionConfig(objective="block", block_size=bs), mask_id=3, vocab_size=4)
    for x in ([0, 1, 2, 0], [2, 0, 1, 1]):
        x0 = torch.tensor(x)
        logp = math.log(lang.pi[x[0]]) + sum(math.log(lang.P[a, b]) for a, b in zip(x, x[1:]))
        if not math.isfinite(logp):
            continue
        assert obj.exact_nelbo(lambda xt: markov_logprobs(lang, xt), x0) == pytest.approx(-logp, abs=1e-10)


def test_eval_ppl_bound_at_block_size_1_is_exact():
    """Through eval.elbo (what eval.ppl runs): block size 1 has no Monte Carlo error and is the chain rule."""
    from eval.elbo import evaluate_blocks
    model = tiny()
    x = torch.randint(0, MASK, (3, 8))
    est = evaluate_blocks(model, x, method="count", samples=2, seed=0, mask_id=MASK, objective=block_obj(1),
                          subs=False)
    assert est.stderr == 0.0
    with torch.no_grad():
        ref = ar_chain_nll(model, x)
    assert est.nelbo == pytest.approx(float(ref.sum()) / x.numel(), rel=1e-6)


def test_sparse_tiles_are_the_dense_mask():
    """Any mask under a batch-free structure, tile rows not dividing N, a fully masked row, a tile whose keys
    are not contiguous: attention by tiles equals dense SDPA (whatever its kernel makes of a row that sees
    nothing) in output and in every input gradient, and each tile keeps only the columns the structure allows
    it."""
    from model.attention import attention, sparse_tiles
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 3, 37, 8
    structure = torch.rand(N, N, generator=g) < 0.4
    structure[:10, 20:] = False  # the first tile sees keys 0..19 at most
    structure[10:20, 5:15] = False  # the second tile's keys are not contiguous
    mask = (structure & (torch.rand(B, 1, N, N, generator=g) < 0.7))
    mask[0, 0, 3] = False  # a row that sees nothing: NaN both ways
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    tiles = sparse_tiles(mask, structure, 10)
    assert [(t.start, t.stop) for t in tiles] == [(0, 10), (10, 20), (20, 30), (30, 37)]
    assert isinstance(tiles[1].keys, torch.Tensor)
    for t in tiles:
        cols = torch.arange(N)[t.keys]
        assert torch.equal(torch.zeros(N, dtype=torch.bool).index_fill(0, cols, True), structure[t.start:t.stop].any(0))
    outs, grads = [], []
    for batch in (AttentionBatch("sdpa", False, mask=mask).for_dtype(torch.float64),
                  AttentionBatch("sdpa", False, tiles=tiles).for_dtype(torch.float64)):
        out = attention(q, k, v, causal=False, batch=batch)
        outs.append(out)
        grads.append(torch.autograd.grad(out.nan_to_num().pow(2).sum(), (q, k, v)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12, equal_nan=True)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match="structure"):
        sparse_tiles(mask | ~structure, structure, 10)


# ------------------------------------------------------------------------ conditional likelihood (downstream)
def test_conditional_loglikelihood_of_a_block_model_is_its_block_bound():
    """eval.likelihood with a block objective: block size 1 gives the exact chain rule of the block-causal
    model (answer spanning blocks, one sample); block size 4 gives an unbiased estimate of the answer's block
    NELBO enumerated over every masked subset (context ending inside the answer's block); greedy fill at block
    size 1 is the greedy chain."""
    from eval.likelihood import conditional_loglikelihood, greedy_fill
    torch.manual_seed(0)
    model = tiny(L=16).eval()
    ctx, ans = [3, 1, 4, 1, 5], [9, 2, 6]
    x0 = torch.tensor([ctx + ans])
    n0 = len(ctx)
    with torch.no_grad():
        # block size 1: -log p(ans | ctx) = sum_i -log p(x_i | x_<i), each from its own block's forward
        lg = per_block_logits(model, torch.full_like(x0, MASK), x0, 1)[0].double()
        lg[:, MASK] = float("-inf")
        exact = float(lg.log_softmax(-1)[torch.arange(n0, 8), x0[0, n0:]].sum())
        got = conditional_loglikelihood(model, [ctx], [ans], mask_id=MASK, mc_samples=4, objective=block_obj(1))[0]
        assert got.samples == 1 and got.stderr == 0.0 and got.logprob == pytest.approx(exact, rel=1e-6)  # fp32 CE
        # block size 4: positions 4..7 form one block (4 is context); enumerate the subsets of {5, 6, 7}
        nelbo = 0.0
        for l in range(1, 4):
            subsets = list(itertools.combinations(range(n0, 8), l))
            for S in subsets:
                xt = x0.clone()
                xt[0, list(S)] = MASK
                lg = per_block_logits(model, xt, x0, 4)[0].double()
                lg[:, MASK] = float("-inf")
                ce = -lg.log_softmax(-1)[list(S), x0[0, list(S)]].sum()
                nelbo += (1 / 3) * (3 / l) * float(ce) / len(subsets)
        est = conditional_loglikelihood(model, [ctx], [ans], mask_id=MASK, mc_samples=600, objective=block_obj(4),
                                        batch_size=64)[0]
        assert est.samples == 600 and abs(est.logprob + nelbo) < 4.5 * est.stderr, (est, -nelbo)
        # greedy at block size 1: the greedy chain
        seq = list(ctx)
        for _ in range(3):
            cur = torch.tensor([seq + [MASK]])
            lg = per_block_logits(model, cur, cur, 1)[0, -1]
            lg[MASK] = float("-inf")
            seq.append(int(lg.argmax()))
        assert greedy_fill(model, [ctx], [3], mask_id=MASK, objective=block_obj(1)) == [seq[n0:]]
