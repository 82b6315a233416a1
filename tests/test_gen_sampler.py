"""The diffusion / AR samplers of model/sample.py on small random-weight models."""
import pytest
import torch

from model.sample import generate, generate_many, left_pad, render, strip_after_eos, topk_mask, transfer_schedule
from helpers_downstream import masks_per_step, one_thread, seeded, tiny_model

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

MASK, EOS = 39, 0


@pytest.fixture(scope="module")
def model():
    return tiny_model()


SAMPLERS = [("llada", "low_confidence"), ("llada", "random"), ("mdlm", "low_confidence")]


@pytest.mark.parametrize("sampler,remasking", SAMPLERS)
@pytest.mark.parametrize("block", [None, 4])
def test_no_masks_left_and_prompts_kept(model, sampler, remasking, block):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    out = generate(model, prompts, mask_id=MASK, gen_length=12, steps=6, block_length=block, temperature=1.0,
                   remasking=remasking, sampler=sampler, generator=seeded(0), pad_id=EOS)
    assert out.shape == (3, 6 + 12)
    assert not (out == MASK).any()
    ids, real = left_pad(prompts, EOS)
    assert torch.equal(out[:, :6][real], ids[real])  # every prompt token is where it was
    assert (out[:, :6][~real] == EOS).all()  # padding stays padding


@pytest.mark.parametrize("sampler,remasking", SAMPLERS)
def test_deterministic_with_seed(model, sampler, remasking):
    kw = dict(mask_id=MASK, gen_length=16, steps=8, block_length=8, temperature=1.0, remasking=remasking,
              sampler=sampler, batch_size=3)
    a = generate(model, None, generator=seeded(123), **kw)
    b = generate(model, None, generator=seeded(123), **kw)
    c = generate(model, None, generator=seeded(124), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed matters at temperature 1


@pytest.mark.parametrize("block", [None, 4])
def test_one_token_per_step_when_steps_equal_length(model, block):
    G = 12
    counts = masks_per_step(model, mask_id=MASK, gen_length=G, steps=G, block_length=block, batch_size=2,
                            remasking="low_confidence")
    assert len(counts) == G
    assert counts == [[G - s - 1] * 2 for s in range(G)]


def test_llada_even_split_schedule(model):
    # 10 tokens in 4 steps: LLaDA's plan is 3, 3, 2, 2 (remainder first)
    counts = masks_per_step(model, mask_id=MASK, gen_length=10, steps=4, batch_size=1)
    assert [10 - c[0] for c in counts] == [3, 6, 8, 10]
    assert transfer_schedule(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]


def test_semi_autoregressive_blocks_fill_in_order(model):
    G, blk = 12, 4
    snaps = []
    generate(model, [[1, 2]], mask_id=MASK, gen_length=G, steps=6, block_length=blk,
             callback=lambda s, x: snaps.append(x[0, 2:].clone()))
    for x in snaps:
        filled = (x != MASK).tolist()
        # a later block never has a token before every earlier block is complete
        for b in range(1, G // blk):
            if any(filled[b * blk:(b + 1) * blk]):
                assert all(filled[:b * blk])


def test_batched_prompts_equal_one_at_a_time(model):
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    kw = dict(mask_id=MASK, gen_length=8, steps=8, block_length=4, temperature=0.0, pad_id=EOS)
    batched = generate(model, prompts, **kw)[:, -8:]
    for i, p in enumerate(prompts):
        single = generate(model, torch.tensor([p]), **kw)[:, -8:]
        assert torch.equal(batched[i], single[0]), i


def test_generate_many_buckets_by_length_and_keeps_order(model):
    prompts = [[3] * 20, [4, 5, 11], [6] * 19, [7, 8, 9], [10, 12, 13]]
    kw = dict(mask_id=MASK, gen_length=4, steps=4, temperature=0.0, pad_id=EOS)
    calls = []

    def spy(g):
        calls.append(g.shape[0])
        return torch.zeros(g.shape[0], dtype=torch.bool)
    got = generate_many(model, prompts, batch_size=8, stop_fn=spy, block_length=2, **kw)
    assert sorted(calls) == [2, 3]  # rows of 24/23 together, the three of 7 together (no row padded by > 10%)
    for p, g in zip(prompts, got):
        assert g == generate(model, [p], block_length=2, **kw)[0, -4:].tolist()


def test_topk_mask_matches_per_row_loop():
    g = seeded(0)
    scores = torch.rand(6, 10, generator=g)
    k = torch.tensor([0, 1, 3, 10, 2, 5])
    got = topk_mask(scores, k)
    for b in range(6):
        want = torch.zeros(10, dtype=torch.bool)
        if k[b]:
            want[scores[b].topk(int(k[b])).indices] = True
        assert torch.equal(got[b], want)


def test_cfg_matches_hand_computed_guidance(model):
    p, w = [3, 4, 5, 6], 1.5
    out = generate(model, [p], mask_id=MASK, gen_length=1, steps=1, cfg_scale=w)
    cond = model(torch.tensor([p + [MASK]]))[0, -1]
    unc = model(torch.tensor([[MASK] * 4 + [MASK]]))[0, -1]
    guided = unc + (w + 1) * (cond - unc)
    guided[MASK] = float("-inf")
    assert int(out[0, -1]) == int(guided.argmax())
    # and the guidance changes the answer somewhere for a strong w (it is not a no-op)
    outs = {int(generate(model, [q], mask_id=MASK, gen_length=1, steps=1, cfg_scale=5.0)[0, -1]) ==
            int(generate(model, [q], mask_id=MASK, gen_length=1, steps=1)[0, -1]) for q in
            ([3, 4], [5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15, 16, 17])}
    assert False in outs


class EosLover(torch.nn.Module):
    """A model whose EOS logit is raised by a constant: it would write EOS nearly everywhere."""

    def __init__(self, inner, boost=100.0):
        super().__init__()
        self.inner, self.cfg, self.boost = inner, inner.cfg, boost

    def forward(self, tokens, doc_ids=None, key_padding=None, logits_at=None):
        out = self.inner(tokens, doc_ids=doc_ids, key_padding=key_padding, logits_at=logits_at).clone()
        out[..., EOS] += self.boost
        return out


@pytest.fixture(scope="module")
def eos_model():
    return EosLover(tiny_model(seed=3))


def test_min_new_tokens_forbids_early_eos(eos_model):
    free = generate(eos_model, [[4, 5]], mask_id=MASK, gen_length=10, steps=10)
    assert (free[0, 2:] == EOS).sum() > 5  # the rigged model loves EOS
    out = generate(eos_model, [[4, 5]], mask_id=MASK, gen_length=10, steps=10, eos_id=EOS, min_new_tokens=6)
    assert not (out[0, 2:8] == EOS).any()


def test_stop_at_eos_fills_the_tail(eos_model):
    stats = {}
    out = generate(eos_model, [[4, 5], [6]], mask_id=MASK, gen_length=16, steps=16, block_length=4, eos_id=EOS,
                   min_new_tokens=2, stop_at_eos=True, stats=stats)
    gen = out[:, -16:]
    for row in gen.tolist():
        first = row.index(EOS)
        assert all(t == EOS for t in row[first:])
    # filled positions need no steps: far fewer forwards than the 16 planned
    assert stats["forwards"] < 16


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mdlm_caching_saves_forwards_not_quality(model, temperature):
    kw = dict(mask_id=MASK, gen_length=6, steps=48, temperature=temperature, sampler="mdlm", batch_size=2)
    s_cache, s_plain = {}, {}
    a = generate(model, None, generator=seeded(5), stats=s_cache, **kw)
    b = generate(model, None, generator=seeded(5), stats=s_plain, cache=False, **kw)
    assert torch.equal(a, b)  # reusing an unchanged row's prediction is exact
    assert s_plain["forwards"] >= 40  # one per step until the last mask goes (the loop ends when none is left)
    assert s_cache["forward_rows"] <= 2 * 7  # at most one recompute per unmasking event (+1 initial) per row
    assert not (a == MASK).any()


def test_stop_fn_finishes_rows_after_a_block(model):
    out = generate(model, [[1, 2], [3]], mask_id=MASK, gen_length=12, steps=12, block_length=4, pad_id=EOS,
                   stop_fn=lambda g: torch.tensor([True, False]))
    assert (out[0, -8:] == EOS).all()  # row 0 stopped after its first block
    assert not (out[1, -8:] == MASK).any()


def test_train_call_signature(model):
    # pretrain/loop/train.py samples this way at the end of training
    out = generate(model, None, mask_id=MASK, gen_length=16, steps=8, batch_size=2, generator=seeded(0),
                   temperature=1.0)
    assert out.shape == (2, 16) and not (out == MASK).any()


def test_ar_checkpoint_decodes_left_to_right():
    ar = tiny_model(causal=True, seed=1)
    snaps = []
    prompts = [[3, 4, 5], [6]]
    out = generate(ar, prompts, mask_id=MASK, gen_length=5, steps=5, pad_id=EOS,
                   callback=lambda s, x: snaps.append(x.shape[1]))
    assert snaps == [4, 5, 6, 7, 8]  # one new token per step, appended on the right
    assert not (out == MASK).any()
    # greedy AR continuation equals a hand-rolled argmax loop, padded or not
    for i, p in enumerate(prompts):
        x = torch.tensor([p])
        for _ in range(5):
            logits = ar(x)[0, -1]
            logits[MASK] = float("-inf")
            x = torch.cat([x, logits.argmax().view(1, 1)], 1)
        assert torch.equal(out[i, -5:], x[0, -5:])


def test_render_and_strip():
    class Tok:
        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)
    assert render(Tok(), [0, MASK, 1, 2, MASK], MASK) == "a░bc░"
    assert strip_after_eos([5, 6, EOS, 7], EOS) == [5, 6]
    assert strip_after_eos([5, 6], None) == [5, 6]


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="multiple"):
        generate(model, None, mask_id=MASK, gen_length=10, steps=4, block_length=4)
    with pytest.raises(ValueError, match="remasking"):
        generate(model, None, mask_id=MASK, gen_length=4, steps=4, remasking="topk")
    with pytest.raises(ValueError, match="pad_id"):
        generate(model, [[1]], mask_id=MASK, gen_length=4, steps=4, pad_id=MASK)
