"""Block-diffusion generation (model/block_sample.py): the exact KV cache gives the no-cache output token for
token; with the true conditionals of the synthetic language, samples follow the true joint (chi-square, with a
power check that the test rejects a sampler that ignores dependencies inside a block)."""
import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from data.synthetic import MarkovLanguage
from model import ModelConfig, Transformer
from model.objectives import DiffusionConfig, build_objective
from model.sample import generate

from test_ppl_oracle import MarkovOracle

V, MASK = 11, 10


def tiny(max_len=64, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=V, mask_id=MASK,
                                max_seq_len=max_len, attn_backend="sdpa"))
    m.init_weights(seed)
    return m.eval()


def block_obj(bs, vocab=V, mask=MASK):
    return build_objective(DiffusionConfig(objective="block", block_size=bs), mask_id=mask, vocab_size=vocab)


@pytest.mark.parametrize("kw", [dict(decode="fixed"), dict(decode="threshold", threshold=0.3),
                                dict(sampler="mdlm"), dict(decode="factor", factor=1.0)])
def test_cache_equals_no_cache_token_for_token(kw):
    model, obj = tiny(), block_obj(4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]  # ragged: left padding, and a prompt tail inside a block
    outs, stats = [], []
    for cache in ("none", "prefix"):
        st = {}
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        outs.append(generate(model, prompts, mask_id=MASK, gen_length=24, steps=24, temperature=1.0,
                             generator=gens, objective=obj, kv_cache=cache, stats=st, pad_id=0, **kw))
        stats.append(st)
    assert torch.equal(outs[0], outs[1])
    assert not bool((outs[0] == MASK).any())
    assert stats[1]["forward_tokens"] < stats[0]["forward_tokens"]


def test_sliding_window_and_eos_stop():
    """Output longer than the context (sliding by whole blocks), cache == no cache; EOS stops a row."""
    model, obj = tiny(max_len=16), block_obj(4)
    outs = []
    for cache in ("none", "prefix"):
        outs.append(generate(model, None, batch_size=2, mask_id=MASK, gen_length=40, steps=40, temperature=1.0,
                             generator=torch.Generator().manual_seed(3), objective=obj, kv_cache=cache))
    assert outs[0].shape == (2, 40) and torch.equal(outs[0], outs[1])
    out = generate(model, None, batch_size=3, mask_id=MASK, gen_length=40, steps=40, temperature=1.0,
                   generator=torch.Generator().manual_seed(4), objective=obj, kv_cache="prefix", eos_id=2,
                   stop_at_eos=True)
    for row in out.tolist():
        if 2 in row:
            assert all(v == 2 for v in row[row.index(2):])
    assert not bool((out == MASK).any())


class Oracle(MarkovOracle):
    """The true conditionals, called as the block sampler calls a model (its mask and positions are implied:
    without a cache the input is exactly [clean blocks, current block], and the chain ignores the rest)."""

    def __init__(self, lang):
        super().__init__(lang)
        self.cfg = ModelConfig(vocab_size=lang.num_symbols + 1, mask_id=lang.num_symbols, max_seq_len=64)

    def forward(self, tokens, attn=None, positions=None, logits_at=None, **kw):
        return super().forward(tokens, logits_at=logits_at)


def joint_counts(lang, out):
    S, L = lang.num_symbols, out.shape[1]
    codes = (out.numpy() * (S ** np.arange(L)[::-1])).sum(1)
    obs = np.bincount(codes, minlength=S ** L)
    exp = np.array([lang.pi[s[0]] * np.prod([lang.P[a, b] for a, b in zip(s, s[1:])])
                    for s in itertools.product(range(S), repeat=L)])
    return obs, exp * len(out)


def test_samples_match_the_true_joint_and_the_test_has_power():
    lang = MarkovLanguage(num_symbols=3, branching=2, concentration=0.4, seed=2)
    S = lang.num_symbols
    oracle, obj = Oracle(lang), block_obj(2, vocab=S + 1, mask=S)
    N, L = 3000, 4
    common = dict(batch_size=N, mask_id=S, gen_length=L, temperature=1.0, objective=obj, kv_cache="none")
    # one uniformly random position per step, its token from the exact conditional: exact joint samples
    good = generate(oracle, None, steps=L, remasking="random", generator=torch.Generator().manual_seed(0), **common)
    obs, exp = joint_counts(lang, good)
    keep = exp > 0
    assert obs[~keep].sum() == 0
    p_good = chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    assert p_good > 1e-3
    # power: one step per block unmasks both tokens of a block independently (ignores their dependence)
    bad = generate(oracle, None, steps=L // 2, sampler="mdlm", generator=torch.Generator().manual_seed(0), **common)
    obs_b, _ = joint_counts(lang, bad)
    obs_b = obs_b[keep]
    p_bad = chisquare(obs_b, exp[keep] * obs_b.sum() / exp[keep].sum()).pvalue if obs_b.sum() else 0.0
    assert p_bad < 1e-6


# ------------------------------------------------------------------------------- ReMDM within the block
def ancestral_reference(model, obj, B, L, per_block, seed, t_min=1e-5):
    """Block ancestral sampling written out: per block, the objective's reverse step on ReMDM's time grid
    (model/remdm.py time_grid), each position drawn by inverse CDF from one uniform of one shared generator,
    the argmax where masks remain; the network sees [clean blocks, current block] (no cache)."""
    from model.attention import AttentionBatch
    from model.objectives.block import prefix_mask
    from model.remdm import draw, time_grid
    g = torch.Generator().manual_seed(seed)
    bs = obj.block_size
    x = torch.full((B, L), MASK)
    for a in range(0, L, bs):
        e = a + bs

        def probs():
            logits = model(x[:, :e], attn=AttentionBatch("sdpa", False, mask=prefix_mask(e, bs)))[:, a:].double()
            logits[..., MASK] = float("-inf")
            return logits.softmax(-1)
        for t, s in time_grid(per_block, t_min):
            step = obj.reverse_step(probs().reshape(-1, V), x[:, a:e].reshape(-1), t, s)
            u = torch.rand((B, bs), generator=g, dtype=torch.float64)
            x[:, a:e] = draw(step, u.reshape(-1)).view(B, bs)
        left = x[:, a:e] == MASK
        if bool(left.any()):
            x[:, a:e] = torch.where(left, probs().argmax(-1), x[:, a:e])
    return x


def test_remdm_eta_zero_is_block_ancestral_sampling_and_the_cache_stays_exact():
    from model.remdm import ReMDMConfig
    model, obj = tiny(), block_obj(4)
    B, L, per_block = 3, 16, 6
    kw = dict(batch_size=B, mask_id=MASK, gen_length=L, steps=per_block * L // 4, temperature=1.0, objective=obj,
              sampler="remdm")
    for cache in ("none", "prefix"):
        out = generate(model, None, generator=torch.Generator().manual_seed(5), kv_cache=cache,
                       remdm=ReMDMConfig("rescale", eta=0.0, top_p=1.0), **kw)
        assert torch.equal(out, ancestral_reference(model, obj, B, L, per_block, seed=5)), cache
    # re-masking (eta > 0, every strategy) never reaches a finished block: with the cache == without, ragged
    # prompts with their tail inside a block included
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    for cfg in (ReMDMConfig("rescale", 0.3), ReMDMConfig("conf"), ReMDMConfig("loop", 0.05)):
        outs = [generate(model, prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                         kv_cache=cache, remdm=cfg, pad_id=0, **{**kw, "batch_size": 2, "gen_length": 24})
                for cache in ("none", "prefix")]
        assert torch.equal(outs[0], outs[1]) and not bool((outs[0] == MASK).any()), cfg.strategy
        assert torch.equal(outs[0][:, :6], torch.tensor([[0, 0, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]))


def test_remdm_in_blocks_samples_the_true_joint():
    """A perfect model, ReMDM re-masking within each block (rescale, eta 0.3, no nucleus): still the joint. A
    full-support chain: two positions of a block unmasked in the same step (probability ~ 1 / steps) are drawn
    independently, which a chain with forbidden transitions would show as impossible pairs."""
    from model.remdm import ReMDMConfig
    lang = MarkovLanguage(num_symbols=3, branching=3, concentration=0.4, seed=2)
    S = lang.num_symbols
    oracle, obj = Oracle(lang), block_obj(2, vocab=S + 1, mask=S)
    N, L = 3000, 4
    p = {}
    for per_block in (128, 1):  # power: one step per block draws both tokens of a block independently
        out = generate(oracle, None, batch_size=N, mask_id=S, gen_length=L, steps=per_block * L // 2,
                       temperature=1.0, objective=obj, kv_cache="none", sampler="remdm",
                       remdm=ReMDMConfig("rescale", 0.3, top_p=1.0), generator=torch.Generator().manual_seed(0))
        obs, exp = joint_counts(lang, out)
        p[per_block] = chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert p[128] > 1e-3 and p[1] < 1e-6, p
