"""Time conditioning (model.time_conditioning=adaln, model/transformer.py): adaLN-zero is an exact no-op at
initialisation, `none` is the model without the option, the noise level t reaches the logits once the
modulation is non-zero, through the KV cache, the activation-checkpoint and compile wrappers, and every
parallel layout (DP2 x TP2 against one process, tests/dist_worker.py scenario `time_cond`)."""
import dataclasses

import pytest
import torch

from dist_launch import check_equivalence, load, objective_scenarios
from model import ModelConfig, Transformer, count_params
from model.params import conditioning_params, flops_by_term
from model.transformer import is_conditioning, timestep_features

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=50, mask_id=49, max_seq_len=64,
                  cond_dim=16)


def build(seed: int = 0, **kw) -> Transformer:
    m = Transformer(dataclasses.replace(CFG, **kw))
    m.init_weights(seed=seed)
    return m


@torch.no_grad()
def perturb(m: Transformer, seed: int = 7, std: float = 0.2) -> Transformer:
    """Make the zero-initialised modulation non-zero (and the time embedding larger), as training would."""
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        if is_conditioning(name):
            p.normal_(0.0, std, generator=g)
    return m


def batch(B=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 49, (B, L), generator=g)
    doc = torch.tensor([[0] * 6 + [1] * 10, [0] * 16, [2] * 9 + [3] * 7])[:B, :L]
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, :4] = False
    return x, doc, pad


# ----------------------------------------------------------------------------- none: today's model

def test_none_builds_exactly_the_unconditioned_model():
    none, adaln = build(seed=3), build(seed=3, time_conditioning="adaln")
    names = [n for n, _ in none.named_parameters()]
    assert not any(is_conditioning(n) for n in names) and none.time_embed is None
    extra = [n for n, _ in adaln.named_parameters() if n not in names]
    assert extra and all(is_conditioning(n) for n in extra)
    # The shared parameters come out of init_weights identical: the conditioning draws come after them.
    sd = adaln.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in none.state_dict().items())
    # An unconditioned state dict loads into an unconditioned model; into an adaln one only the conditioning
    # is missing.
    Transformer(CFG).load_state_dict(none.state_dict())
    missing = Transformer(dataclasses.replace(CFG, time_conditioning="adaln")).load_state_dict(
        none.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(extra)


def test_configuration_is_validated():
    with pytest.raises(ValueError, match="time_conditioning"):
        dataclasses.replace(CFG, time_conditioning="film").validate()
    with pytest.raises(ValueError, match="cond_dim"):
        dataclasses.replace(CFG, time_conditioning="adaln", cond_dim=0).validate()
    from pretrain.config import load_config
    with pytest.raises(ValueError, match="time_conditioning"):
        load_config(None, ["model.time_conditioning=film"])
    assert load_config(None, ["model.time_conditioning=adaln", "model.cond_dim=64"]).model.cond_dim == 64


def test_t_is_required_with_adaln_and_refused_without():
    x, _, _ = batch()
    with pytest.raises(ValueError, match="needs the noise level"):
        build(time_conditioning="adaln")(x)
    with pytest.raises(ValueError, match="not time-conditioned"):
        build()(x, t=torch.full((3,), 0.5))
    for bad in (torch.full((2,), 0.5), torch.full((3, 1), 0.5), torch.ones(3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"\(3,\) float tensor"):
            build(time_conditioning="adaln")(x, t=bad)


# ----------------------------------------------------------------------------- adaLN-zero

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaln_zero_at_init_gives_exactly_the_unconditioned_logits(seed, causal):
    plain, cond = build(seed, causal=causal), build(seed, causal=causal, time_conditioning="adaln")
    x, doc, pad = batch(seed=seed)
    ref = plain(x, doc_ids=doc, key_padding=pad)
    for t in (0.0, 1e-3, 0.37, 1.0):
        got = cond(x, doc_ids=doc, key_padding=pad, t=torch.full((3,), t))
        assert torch.equal(got, ref), t
    got = cond(x, doc_ids=doc, key_padding=pad, t=torch.tensor([0.1, 0.5, 0.9]))  # a different t per row
    assert torch.equal(got, ref)
    # and the same for the cross-entropy path the objectives use
    at = torch.rand(3, 16, generator=torch.Generator().manual_seed(9)) < 0.5
    assert torch.equal(cond(x, logits_at=at, targets=x[at], ce_chunk=5, t=torch.full((3,), 0.4)),
                       plain(x, logits_at=at, targets=x[at], ce_chunk=5))


def test_modulation_learns_from_zero():
    """adaLN-zero: the modulation starts at zero yet receives gradient (through the conditioning vector), so
    training moves it off zero."""
    m = build(time_conditioning="adaln")
    x, _, _ = batch()
    m(x, t=torch.tensor([0.2, 0.5, 0.8])).float().pow(2).mean().backward()
    for i in range(CFG.n_layers):
        assert m.layers[i].modulation.proj.weight.grad.abs().max() > 0
        assert m.layers[i].modulation.proj.bias.grad.abs().max() > 0
    assert m.final_modulation.proj.weight.grad.abs().max() > 0


def test_nonzero_modulation_makes_the_logits_depend_on_t():
    m = perturb(build(time_conditioning="adaln"))
    plain = build()
    x, doc, pad = batch()
    outs = [m(x, doc_ids=doc, key_padding=pad, t=torch.full((3,), t)) for t in (0.1, 0.5, 0.9)]
    ref = plain(x, doc_ids=doc, key_padding=pad)
    for a in outs:
        assert (a - ref).abs().max() > 1e-2
    for a, b in zip(outs, outs[1:]):
        assert (a - b).abs().max() > 1e-3
    # each row sees its own t only
    mixed = m(x, doc_ids=doc, key_padding=pad, t=torch.tensor([0.1, 0.5, 0.9]))
    for r in range(3):
        torch.testing.assert_close(mixed[r], outs[r][r], atol=1e-6, rtol=0)


def test_sinusoidal_features_follow_dits_table():
    t = torch.tensor([0.0, 0.25, 1.0])
    f = timestep_features(t)
    assert f.shape == (3, 256) and f.dtype == torch.float32
    k = torch.arange(128, dtype=torch.float64)
    arg = 1000 * t.double()[:, None] * torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * k / 128)
    torch.testing.assert_close(f.double(), torch.cat([arg.cos(), arg.sin()], -1), atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------- the other paths

def test_kv_cache_with_time_conditioning():
    from model.kvcache import KVCache
    m = perturb(build(time_conditioning="adaln")).eval()
    x, _, pad = batch()
    t = torch.tensor([0.3, 0.6, 0.9])
    with torch.no_grad():
        full = m(x, key_padding=pad, t=t)
        cache = KVCache(CFG.n_layers, 3, 16, causal=False, key_real=pad)
        assert torch.equal(m(x, key_padding=pad, kv_cache=cache.fill(), t=t), full)  # a fill forward is exact
        reuse = m(x[:, 8:12], kv_cache=cache.reuse(8), t=t)  # fresh cache: nothing stale
        torch.testing.assert_close(reuse, full[:, 8:12], atol=1e-5, rtol=1e-5)
        rows = torch.tensor([0, 2])  # rows that still have work carry their own t
        sub = m(x[rows, 8:12], kv_cache=cache.reuse(8, rows=rows), t=t[rows])
        torch.testing.assert_close(sub, full[rows, 8:12], atol=1e-5, rtol=1e-5)
        causal = perturb(build(causal=True, time_conditioning="adaln")).eval()
        ref = causal(x[:1], t=t[:1])
        c = KVCache(CFG.n_layers, 1, 16, causal=True)
        causal(x[:1, :10], kv_cache=c.fill(), t=t[:1])
        steps = [causal(x[:1, j:j + 1], kv_cache=c.reuse(j), t=t[:1])[:, 0] for j in range(10, 16)]
        torch.testing.assert_close(torch.stack(steps, 1), ref[:, 10:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrap", ["ac_full", "ac_op", "compile"])
def test_checkpoint_and_compile_wrappers_pass_the_conditioning(wrap):
    import pretrain.engines.parallel as parallel
    x, doc, pad = batch()
    t = torch.tensor([0.2, 0.5, 0.8])
    base = perturb(build(time_conditioning="adaln"))
    loss = base(x, doc_ids=doc, key_padding=pad, t=t).float().pow(2).mean()
    g_base = torch.autograd.grad(loss, list(base.parameters()))
    m = perturb(build(time_conditioning="adaln"))
    if wrap == "compile":
        backend, parallel.COMPILE_BACKEND = parallel.COMPILE_BACKEND, "aot_eager"
        try:
            parallel.apply_compile(m)
        finally:
            parallel.COMPILE_BACKEND = backend
    else:
        parallel.apply_ac(m, wrap[3:])
    got = m(x, doc_ids=doc, key_padding=pad, t=t).float().pow(2).mean()
    assert abs(float(got.detach()) - float(loss.detach())) < 1e-6
    g = torch.autograd.grad(got, list(m.parameters()))
    for a, b in zip(g, g_base):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_parameter_and_flop_counts_include_the_conditioning():
    for kw in ({}, {"time_conditioning": "adaln"}, {"time_conditioning": "adaln", "cond_dim": 128}):
        cfg = dataclasses.replace(CFG, **kw)
        with torch.device("meta"):
            m = Transformer(cfg)
        c = count_params(m)
        assert c["conditioning"] == conditioning_params(cfg) == sum(
            p.numel() for n, p in m.named_parameters() if is_conditioning(n))
        assert c["total"] == sum(p.numel() for p in m.parameters())
        f = flops_by_term(cfg, 16, c["non_embedding"])
        # block and head weights per token; the conditioning once per row of 16 tokens
        assert f["weights"] == 6 * (c["non_embedding"] - c["conditioning"])
        assert f["conditioning"] == 6 * c["conditioning"] / 16
        assert f["total"] == f["weights"] + f["attention"] + f["head"] + f["conditioning"]
    # A training step's budget: the conditioning once per row of the global batch, on top of the same model
    # without it.
    from pretrain.config import load_config
    from pretrain.loop.flops import step_flops
    over = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=50",
            "model.mask_id=49", "model.cond_dim=16", "data.seq_len=16", "train.global_batch_size=4"]
    plain, cond = (load_config(None, over + extra) for extra in ([], ["model.time_conditioning=adaln"]))
    n_plain = count_params(Transformer(plain.model))["non_embedding"]
    n_cond = count_params(Transformer(cond.model))["non_embedding"]
    assert step_flops(cond, n_cond)["conditioning"] == 4 * 6 * conditioning_params(cond.model)
    assert step_flops(cond, n_cond)["total"] == pytest.approx(
        step_flops(plain, n_plain)["total"] + 4 * 6 * conditioning_params(cond.model), rel=1e-12)


def test_llada_export_refuses_a_time_conditioned_model():
    from model.adapters import Unsupported, llada_config_json
    llada_config_json(CFG, eos_id=None, pad_id=None)  # the unconditioned model exports
    with pytest.raises(Unsupported, match="no time-conditioning weights"):
        llada_config_json(dataclasses.replace(CFG, time_conditioning="adaln"), eos_id=None, pad_id=None)


# ----------------------------------------------------------------------------- parallel layouts

@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return objective_scenarios(tmp_path_factory) / "time_cond"


def test_time_conditioned_dp2_x_tp2_matches_single_process(four):
    """A non-zero modulation (the same perturbation in every layout), t per row from the step's noise, and a
    chunked all-position full-softmax row loss, which under TP gathers the vocab-sharded logits chunk by chunk."""
    rep = load(four / "equivalence_time_cond.json")
    assert rep["_ref_grad_scale"] > 1e-3
    assert rep["_t_sensitivity"] > 1e-3  # the perturbed modulation makes the loss depend on t
    check_equivalence(rep, "dp2_tp2", 3)
    check_equivalence(rep, "dp2_tp2_ac_full", 3)
    check_equivalence(rep, "hsdp2_tp2_compile", 3)


def test_fsdp_bf16_keeps_the_noise_level_in_fp32(four):
    # FSDP's mixed precision casts floating forward inputs to bf16; the root unit leaves t alone, so the
    # sinusoidal features see the fp32 noise level (bf16 would round 1000 t by up to ~4).
    rep = load(four / "t_dtype.json")
    assert rep["t_dtype"] == "torch.float32", rep
