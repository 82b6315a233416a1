"""Fast generation (model/sample.py, model/policies.py, model/kvcache.py): parallel decoding policies, KV
caches, batch invariance, and the exactness anchors (chi-square on a toy joint, threshold 1.0, refresh 1)."""
import itertools
import types

import pytest
import torch

from helpers_downstream import one_thread, seeded, tiny_model
from model.policies import confidence_threshold, factor_rule, fixed_count
from model.sample import generate, generate_many, row_generators

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

MASK, EOS = 39, 0
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]  # mixed lengths: left padding


@pytest.fixture(scope="module")
def model():
    # a sharper model than the default (init 0.3) so threshold decoding unmasks several tokens per step
    return tiny_model(seed=2, init_std=0.6)


def gens(n, base=100):
    return row_generators([base + i for i in range(n)])


# ------------------------------------------------------------------ policies
def test_policies_per_row():
    g = seeded(0)
    conf = torch.rand(5, 8, generator=g)
    is_mask = torch.rand(5, 8, generator=g) < 0.7
    is_mask[4] = False  # a finished row takes nothing
    conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
    for steps_left in (1, 3, 8):
        fixed = fixed_count(conf, is_mask, steps_left)
        thr = confidence_threshold(conf, is_mask, steps_left, 0.6)
        fac = factor_rule(conf, is_mask, steps_left, 1.0)
        for b in range(5):
            m = is_mask[b]
            n = int(m.sum())
            k = -(-n // steps_left)
            assert int(fixed[b].sum()) == k and not (fixed[b] & ~m).any()
            # threshold: every position above tau, and at least fixed's count (>= 1 while any is masked)
            assert bool((thr[b] >= ((conf[b] > 0.6) & m)).all()) and int(thr[b].sum()) >= max(k, min(n, 1))
            assert not (thr[b] & ~m).any()
            # factor rule by hand: leading run of sorted confidences with c_i >= 1 - f / (i + 1)
            c = sorted(conf[b][m].tolist(), reverse=True)
            run = 0
            while run < len(c) and c[run] >= 1 - 1.0 / (run + 2):
                run += 1
            want = max(run, k)
            assert int(fac[b].sum()) == want
            if want:  # and they are the most confident ones
                assert float(conf[b][fac[b]].min()) >= c[want - 1]


# ------------------------------------------------------------------ exactness anchors
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("block", [None, 4])
def test_threshold_one_is_one_token_per_step(model, temperature, block):
    kw = dict(mask_id=MASK, gen_length=12, steps=12, block_length=block, temperature=temperature, pad_id=EOS)
    ref = generate(model, PROMPTS, generator=gens(3), **kw)
    counts = []
    got = generate(model, PROMPTS, generator=gens(3), decode="threshold", threshold=1.0,
                   callback=lambda s, x: counts.append(int((x[:, -12:] == MASK).sum())), **kw)
    assert torch.equal(got, ref)
    assert counts == [3 * (12 - s - 1) for s in range(12)]  # exactly one token per row per step


def test_threshold_and_factor_decode_in_fewer_steps(model):
    kw = dict(mask_id=MASK, gen_length=16, steps=16, block_length=8, pad_id=EOS)
    for decode in ("threshold", "factor"):
        st_fix, st_fast = {}, {}
        a = generate(model, PROMPTS, stats=st_fix, **kw)
        b = generate(model, PROMPTS, stats=st_fast, decode=decode, threshold=0.5, factor=2.0, **kw)
        assert not (b == MASK).any() and b.shape == a.shape
        assert st_fast["forwards"] < st_fix["forwards"]  # several tokens per step somewhere
        # rows finish their blocks at different steps: finished rows leave the forward
        assert st_fast["forward_rows"] < 3 * st_fast["forwards"]


SETTINGS = [("llada", "low_confidence", "fixed"), ("llada", "random", "fixed"), ("llada", "low_confidence",
            "threshold"), ("llada", "low_confidence", "factor"), ("mdlm", "low_confidence", "fixed")]


@pytest.mark.parametrize("sampler,remasking,decode", SETTINGS)
@pytest.mark.parametrize("kv", ["prefix", "dual"])
def test_cache_refreshed_every_step_is_exact(model, sampler, remasking, decode, kv):
    kw = dict(mask_id=MASK, gen_length=12, steps=12, block_length=4, temperature=1.0, pad_id=EOS,
              sampler=sampler, remasking=remasking, decode=decode, threshold=0.5)
    ref = generate(model, PROMPTS, generator=gens(3), **kw)
    got = generate(model, PROMPTS, generator=gens(3), kv_cache=kv, refresh_every=1, **kw)
    assert torch.equal(got, ref)


def test_cache_with_cfg_refreshed_every_step_is_exact(model):
    kw = dict(mask_id=MASK, gen_length=8, steps=8, block_length=4, cfg_scale=1.0, pad_id=EOS)
    ref = generate(model, PROMPTS, **kw)
    for kv in ("prefix", "dual"):
        assert torch.equal(generate(model, PROMPTS, kv_cache=kv, refresh_every=1, **kw), ref)
        out = generate(model, PROMPTS, kv_cache=kv, **kw)  # the approximate cache with CFG runs and completes
        assert not (out == MASK).any()


def test_cache_reuse_computes_less_and_stays_close(model):
    kw = dict(mask_id=MASK, gen_length=16, steps=16, block_length=4, pad_id=EOS)
    st = {k: {} for k in ("none", "prefix", "dual")}
    outs = {k: generate(model, PROMPTS, kv_cache=k, stats=st[k], **kw) for k in st}
    assert st["dual"]["forward_tokens"] < st["prefix"]["forward_tokens"] < st["none"]["forward_tokens"]
    for k in ("prefix", "dual"):
        assert st[k]["forwards"] == st["none"]["forwards"]
        assert not (outs[k] == MASK).any()


def test_reuse_forward_matches_full_forward_on_a_fresh_cache(model):
    # Right after a fill, nothing is stale: a dual/prefix reuse forward must give the full forward's logits.
    from model.kvcache import KVCache
    x = torch.tensor([[EOS, EOS, 3, 4, 5, MASK, MASK, MASK, MASK, MASK], [6, 7, 8, 9, 1, MASK, MASK, 2, MASK, MASK]])
    real = torch.ones_like(x, dtype=torch.bool)
    real[0, :2] = False
    full = model(x, key_padding=real)
    cache = KVCache(model.cfg.n_layers, 2, x.shape[1], causal=False, key_real=real)
    model(x, key_padding=real, kv_cache=cache.fill())
    dual = model(x[:, 5:8], kv_cache=cache.reuse(5))
    torch.testing.assert_close(dual, full[:, 5:8], atol=1e-5, rtol=1e-5)
    prefix = model(x[:, 5:], kv_cache=cache.reuse(5))
    torch.testing.assert_close(prefix, full[:, 5:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ batch invariance
@pytest.mark.parametrize("sampler,remasking,decode", SETTINGS)
@pytest.mark.parametrize("kv", ["none", "prefix", "dual"])
def test_batch_invariance(model, sampler, remasking, decode, kv):
    kw = dict(mask_id=MASK, gen_length=8, steps=8, block_length=4, temperature=1.0, pad_id=EOS, sampler=sampler,
              remasking=remasking, decode=decode, threshold=0.5, kv_cache=kv)
    batched = generate(model, PROMPTS, generator=gens(3), **kw)[:, -8:]
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], generator=gens(1, base=100 + i), **kw)[:, -8:]
        assert torch.equal(batched[i], alone[0]), (i, batched[i], alone[0])
    # and in a different batch, in another position
    other = generate(model, [PROMPTS[2], [20, 21, 22, 23, 24, 25, 26, 27, 28]],
                     generator=row_generators([102, 7]), **kw)[:, -8:]
    assert torch.equal(other[0], batched[2])


def test_generate_many_with_seeds_is_batch_invariant(model):
    prompts = [[3] * 9, [4, 5, 11], [6] * 8, [7, 8, 9]]
    kw = dict(mask_id=MASK, gen_length=4, steps=4, temperature=1.0, pad_id=EOS, decode="threshold",
              threshold=0.5, kv_cache="dual", block_length=2)
    together = generate_many(model, prompts, batch_size=8, max_pad=1.0, seeds=[1, 2, 3, 4], **kw)
    apart = generate_many(model, prompts, batch_size=1, seeds=[1, 2, 3, 4], **kw)
    assert together == apart


# ------------------------------------------------------------------ AR: the exact KV cache
def test_ar_kv_cache_is_exact():
    ar = tiny_model(causal=True, seed=1)
    for temperature in (0.0, 1.0):
        kw = dict(mask_id=MASK, gen_length=10, steps=10, pad_id=EOS, temperature=temperature)
        s_plain, s_cache = {}, {}
        plain = generate(ar, PROMPTS, generator=gens(3), stats=s_plain, **kw)
        cached = generate(ar, PROMPTS, generator=gens(3), kv_cache="prefix", stats=s_cache, **kw)
        assert torch.equal(plain, cached)
        assert s_cache["forward_tokens"] < s_plain["forward_tokens"] / 3
    # logits agree too, not just the argmax
    from model.kvcache import KVCache
    x = torch.tensor([[3, 4, 5, 6, 7, 8]])
    full = ar(x)
    cache = KVCache(ar.cfg.n_layers, 1, 6, causal=True)
    ar(x[:, :3], kv_cache=cache.fill())
    steps = [ar(x[:, j:j + 1], kv_cache=cache.reuse(j))[:, 0] for j in range(3, 6)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the sampler draws from the model
class ToyJoint(torch.nn.Module):
    """A 'denoiser' that is exact for a known joint p(x1, x2, x3) over 3 symbols (not factorised): at every
    masked position it returns log p(x_i | unmasked positions), computed by enumerating the joint."""

    def __init__(self, joint: torch.Tensor):
        super().__init__()
        self.joint = joint  # (V, V, V), sums to 1
        self.V = joint.shape[0]
        self.cfg = types.SimpleNamespace(causal=False, n_layers=1)
        self._p = torch.nn.Parameter(torch.zeros(1))  # the sampler reads the device from the parameters
        self.outcomes = torch.tensor(list(itertools.product(range(self.V), repeat=3)))  # (27, 3)

    def forward(self, tokens, doc_ids=None, key_padding=None, logits_at=None):
        V, mask = self.V, self.V
        p = self.joint.flatten()  # same order as self.outcomes
        ok = ((tokens[:, None, :] == self.outcomes[None]) | (tokens[:, None, :] == mask)).all(-1)  # (B, 27)
        w = p[None] * ok  # posterior weight of each full outcome
        marg = torch.stack([torch.stack([(w * (self.outcomes[:, i] == v)).sum(1) for v in range(V)], -1)
                            for i in range(3)], 1)  # (B, 3, V)
        logits = torch.cat([marg.clamp_min(1e-30).log(), torch.full_like(marg[..., :1], -1e9)], -1)
        return logits[logits_at] if logits_at is not None else logits


@pytest.mark.parametrize("sampler,remasking,steps", [("mdlm", "low_confidence", 256), ("llada", "random", 3)])
def test_ancestral_samples_follow_the_joint(sampler, remasking, steps):
    """At temperature 1 the MDLM sampler with many steps (and LLaDA random remasking with one token per step)
    samples from the model's joint: chi-square goodness of fit over the 27 outcomes."""
    from scipy.stats import chisquare
    g = torch.Generator().manual_seed(0)
    joint = torch.rand(3, 3, 3, generator=g, dtype=torch.float64) ** 2 + 0.02
    joint /= joint.sum()
    toy = ToyJoint(joint)
    n = 3000
    out = generate(toy, None, mask_id=3, gen_length=3, steps=steps, temperature=1.0, sampler=sampler,
                   remasking=remasking, batch_size=n, generator=seeded(1), cache=False)
    idx = out[:, 0] * 9 + out[:, 1] * 3 + out[:, 2]
    counts = torch.bincount(idx, minlength=27).double()
    res = chisquare(counts.numpy(), (joint.flatten() * n).numpy())
    assert res.pvalue > 1e-3, res
    # the test has power: the product of the marginals (what one-step parallel decoding draws) fails it
    one_step = generate(toy, None, mask_id=3, gen_length=3, steps=1, temperature=1.0, sampler=sampler,
                        remasking=remasking, batch_size=n, generator=seeded(2))
    idx1 = one_step[:, 0] * 9 + one_step[:, 1] * 3 + one_step[:, 2]
    bad = chisquare(torch.bincount(idx1, minlength=27).double().numpy(), (joint.flatten() * n).numpy())
    assert bad.pvalue < 1e-6, bad


def test_bad_fast_options(model):
    kw = dict(mask_id=MASK, gen_length=4, steps=4)
    with pytest.raises(ValueError, match="decode"):
        generate(model, None, decode="greedy", **kw)
    with pytest.raises(ValueError, match="low_confidence"):
        generate(model, None, decode="threshold", sampler="mdlm", **kw)
    with pytest.raises(ValueError, match="threshold"):
        generate(model, None, decode="threshold", threshold=1.5, **kw)
    with pytest.raises(ValueError, match="kv_cache"):
        generate(model, None, kv_cache="triple", **kw)
    with pytest.raises(ValueError, match="refresh_every"):
        generate(model, None, kv_cache="dual", refresh_every=-1, **kw)
    with pytest.raises(ValueError, match="one per row"):
        generate(model, None, generator=gens(2), batch_size=3, **kw)


# ------------------------------------------------------------------ the oracle of benchmarks/sampling.py
def test_oracle_scores_are_exact():
    import math

    import numpy as np

    from benchmarks.sampling import oracle_scores
    from data.synthetic import MarkovLanguage
    lang = MarkovLanguage(8, 2, 0.5, seed=3)
    a = 0
    b = int(np.flatnonzero(lang.P[a])[0])
    c = int(np.flatnonzero(lang.P[b])[-1])
    forbidden = int(np.flatnonzero(lang.P[c] == 0)[0])
    prompts = np.array([[a], [a]])
    gen = np.array([[b, c], [b, forbidden]])
    s = oracle_scores(lang, prompts, gen)
    want = -(math.log(lang.P[a, b]) + math.log(lang.P[b, c])) / 2  # only the first sample is possible
    assert s["nll"] == pytest.approx(want, abs=1e-12)
    assert s["finite"] == 0.5 and s["valid"] == 0.75
    per_row = [0.0 if x == y else math.log(2) for x, y in gen.tolist()]  # two tokens: 0 or log 2 each
    assert s["unigram_entropy"] == pytest.approx(sum(per_row) / 2)
    # unconditional: the first token costs -log pi; real samples of the language score at its entropy
    u = oracle_scores(lang, np.zeros((1, 0), dtype=np.int64), np.array([[a, b]]))
    assert u["nll"] == pytest.approx(-(math.log(lang.pi[a]) + math.log(lang.P[a, b])) / 2)
    truth = lang.sample(np.random.default_rng(0).random((4000, 33)))
    r = oracle_scores(lang, truth[:, :1], truth[:, 1:])
    assert r["valid"] == 1.0 and abs(r["nll"] - lang.entropy_rate) < 4 * r["nll_se"] + 1e-3
