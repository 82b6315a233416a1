"""Conditional likelihood (LLaDA's Monte Carlo estimator) and greedy joint decoding, eval/likelihood.py."""
import itertools
import math

import pytest
import torch

from eval.likelihood import (conditional_loglikelihood, encode_pair, greedy_fill, greedy_match, hash_uniform,
                             stratified_counts)
from helpers_downstream import make_text_run, one_thread, tiny_model

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

V, MASK = 8, 7


@pytest.fixture(scope="module")
def toy():
    return tiny_model(vocab=V, mask_id=MASK, dim=16, n_heads=2, seed=11, init_std=0.5)


@torch.no_grad()
def exact_expectation(model, ctx, cont, weight=lambda n, l: n / l, cfg_scale=0.0):
    """E over l ~ U{1..n} and a uniform size-l subset S of -(weight) * sum_{i in S} CE_i, by enumeration."""
    n = len(cont)
    x0 = torch.tensor([ctx + cont])
    total = 0.0
    for l in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), l))
        acc = 0.0
        for S in subsets:
            xt = x0.clone()
            for i in S:
                xt[0, len(ctx) + i] = MASK
            logits = model(xt)[0]
            if cfg_scale:
                unc = xt.clone()
                unc[0, :len(ctx)] = MASK
                u = model(unc)[0]
                logits = u + (cfg_scale + 1) * (logits - u)
            logits[:, MASK] = float("-inf")
            logp = torch.log_softmax(logits.double(), -1)
            acc += weight(n, l) * sum(float(logp[len(ctx) + i, cont[i]]) for i in S)
        total += acc / len(subsets)
    return total / n


PAIRS = [([1, 2, 3], [4, 5]), ([6], [2, 3, 1]), ([5, 4, 3, 2], [1, 6, 0, 2])]


def test_mc_estimate_is_unbiased_against_enumeration(toy):
    K = 1500
    res = conditional_loglikelihood(toy, [c for c, _ in PAIRS], [x for _, x in PAIRS], mask_id=MASK,
                                    mc_samples=K, batch_size=1024, seed=3)
    for (ctx, cont), r in zip(PAIRS, res):
        exact = exact_expectation(toy, ctx, cont)
        wrong = exact_expectation(toy, ctx, cont, weight=lambda n, l: 1.0)  # forgetting the n / l weight
        assert r.samples == K and r.stderr > 0
        assert abs(r.logprob - exact) < 4 * r.stderr, (r, exact)
        # the test has power: a biased estimator's mean would be far outside the interval
        assert abs(wrong - exact) > 10 * r.stderr


@torch.no_grad()
def test_single_token_continuation_is_exact_with_one_sample(toy):
    r = conditional_loglikelihood(toy, [[1, 2, 3]], [[4]], mask_id=MASK, mc_samples=64)[0]
    logits = toy(torch.tensor([[1, 2, 3, MASK]]))[0, -1]
    logits[MASK] = float("-inf")
    assert r.samples == 1 and r.stderr == 0.0
    assert r.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[4]), abs=1e-5)


def test_batched_equals_one_at_a_time(toy):
    ctxs = [[1, 2, 3], [4], [5, 6, 1, 2, 3], [2, 2], [3, 1, 4, 1, 5, 0]]
    conts = [[4, 5, 6], [1, 2], [3], [0, 1, 2, 3, 4], [6, 6]]
    batched = conditional_loglikelihood(toy, ctxs, conts, mask_id=MASK, mc_samples=12, batch_size=7, seed=9)
    for c, x, b in zip(ctxs, conts, batched):
        one = conditional_loglikelihood(toy, [c], [x], mask_id=MASK, mc_samples=12, batch_size=1, seed=9)[0]
        assert one.samples == b.samples
        assert one.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert one.stderr == pytest.approx(b.stderr, abs=1e-5)
    other_seed = conditional_loglikelihood(toy, ctxs, conts, mask_id=MASK, mc_samples=12, seed=10)
    assert any(abs(a.logprob - b.logprob) > 1e-6 for a, b in zip(other_seed, batched) if a.n_tokens > 1)


def test_early_stop_on_standard_error(toy):
    ctxs, conts = [c for c, _ in PAIRS], [x for _, x in PAIRS]
    full = conditional_loglikelihood(toy, ctxs, conts, mask_id=MASK, mc_samples=512, seed=1)
    tol = 2 * max(f.stderr for f in full)  # reachable with about a quarter of the samples
    early = conditional_loglikelihood(toy, ctxs, conts, mask_id=MASK, mc_samples=512, seed=1, stderr_tol=tol,
                                      round_size=16)
    assert all(e.samples % 16 == 0 for e in early)
    assert any(e.samples < 512 for e in early)  # stopped early
    for e, f in zip(early, full):
        assert e.samples == 512 or e.stderr <= tol
        assert abs(e.logprob - f.logprob) < 5 * max(e.stderr, f.stderr) + 1e-9


def test_cfg_single_token_matches_hand_computation(toy):
    w = 0.7
    r = conditional_loglikelihood(toy, [[1, 2, 3]], [[4]], mask_id=MASK, cfg_scale=w)[0]
    assert r.logprob == pytest.approx(exact_expectation(toy, [1, 2, 3], [4], cfg_scale=w), abs=1e-5)
    # multi-token: the guided estimator is unbiased for its own (guided) expectation too
    rr = conditional_loglikelihood(toy, [[1, 2]], [[3, 5, 6]], mask_id=MASK, cfg_scale=w, mc_samples=800)[0]
    assert abs(rr.logprob - exact_expectation(toy, [1, 2], [3, 5, 6], cfg_scale=w)) < 4 * rr.stderr


@torch.no_grad()
def test_ar_checkpoint_exact_loglik():
    ar = tiny_model(vocab=V, mask_id=MASK, causal=True, dim=16, seed=4, init_std=0.5)
    ctxs, conts = [[1, 2], [3, 4, 5, 6]], [[3, 4, 0], [1]]
    res = conditional_loglikelihood(ar, ctxs, conts, mask_id=MASK)
    for c, x, r in zip(ctxs, conts, res):
        logits = ar(torch.tensor([c + x]))[0].double()
        logits[:, MASK] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[len(c) + i - 1, t]) for i, t in enumerate(x))
        assert r.samples == 0 and r.logprob == pytest.approx(want, abs=1e-5)


def test_context_truncated_from_the_left(toy):
    long_ctx = [1, 2, 3, 4, 5, 6, 1, 2]
    a = conditional_loglikelihood(toy, [long_ctx], [[3]], mask_id=MASK, max_length=5)[0]
    b = conditional_loglikelihood(toy, [long_ctx[-4:]], [[3]], mask_id=MASK)[0]
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


@torch.no_grad()
def naive_greedy(model, ctx, n):
    x = torch.tensor([ctx + [MASK] * n])
    for _ in range(n):
        logits = model(x)[0]
        logits[:, MASK] = float("-inf")
        prob, tok = torch.softmax(logits, -1).max(-1)
        prob[x[0] != MASK] = -1
        i = int(prob.argmax())
        x[0, i] = tok[i]
    return x[0, len(ctx):].tolist()


def test_greedy_fill_batched_equals_reference(toy):
    ctxs = [[1, 2, 3], [4], [5, 6, 1, 2, 3], [2, 2]]
    lengths = [3, 1, 4, 2]
    got = greedy_fill(toy, ctxs, lengths, mask_id=MASK, batch_size=3)
    assert got == [naive_greedy(toy, c, n) for c, n in zip(ctxs, lengths)]
    flags = greedy_match(toy, ctxs, got, mask_id=MASK)
    assert all(flags)
    wrong = [[(t + 1) % MASK for t in g] for g in got]
    assert not any(greedy_match(toy, ctxs, wrong, mask_id=MASK))


@torch.no_grad()
def test_greedy_fill_ar_is_left_to_right_argmax():
    ar = tiny_model(vocab=V, mask_id=MASK, causal=True, dim=16, seed=4, init_std=0.5)
    got = greedy_fill(ar, [[1, 2], [3, 4, 5]], [3, 2], mask_id=MASK)
    for c, g in zip([[1, 2], [3, 4, 5]], got):
        x = list(c)
        for _ in range(len(g)):
            logits = ar(torch.tensor([x]))[0, -1]
            logits[MASK] = float("-inf")
            x.append(int(logits.argmax()))
        assert g == x[len(c):]


def test_stratified_counts_cover_each_length_equally():
    n, k = torch.tensor(5), 10
    for u in (0.0, 0.37, 0.99):
        ls = stratified_counts(n, torch.arange(k), k, torch.tensor(u, dtype=torch.float64)).tolist()
        assert sorted(ls) == sorted([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])


def test_hash_uniform_is_uniform_and_keyed():
    u = hash_uniform(torch.tensor(7), torch.arange(20000))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    assert torch.equal(u, hash_uniform(torch.tensor(7), torch.arange(20000)))
    assert not torch.equal(u, hash_uniform(torch.tensor(8), torch.arange(20000)))


def test_encode_pair_moves_spaces_and_handles_seams(tmp_path):
    from eval.load import load
    tok = load(make_text_run(tmp_path / "run")).tokenizer
    ctx, cont = encode_pair(tok, "the cat sat", " on the mat")
    assert ctx == tok.encode("the cat sat") and tok.decode(cont) == " on the mat"
    ctx2, cont2 = encode_pair(tok, "the cat sat ", "on the mat")  # trailing space moves to the continuation
    assert (ctx2, cont2) == (ctx, cont)
    ctx3, cont3 = encode_pair(tok, "", "the cat", prefix_id=tok.eos_id)
    assert ctx3 == [tok.eos_id] and tok.decode(cont3) == "the cat"
    assert math.isfinite(len(cont3))
