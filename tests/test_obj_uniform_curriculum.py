"""DUO's Gaussian-latent curriculum (model/objectives/uniform.py, diffusion.curriculum_*): the duality table
against the argmax frequency of Gaussian latents and an exact N = 2 closed form, the soft input (dense and
top-k) against the discrete input and the full softmax, the top-k sampler against the whole latent in
distribution, and training steps with the curriculum on while validation stays the plain NELBO."""
import dataclasses
import math

import pytest
import torch

from model import ModelConfig, Transformer
from model.objectives import DiffusionConfig, build_objective
from model.objectives.schedules import get_schedule
from model.objectives.uniform import (distinct_draws, duality_alpha, gaussian_latent, latent_top_k,
                                      schedule_time, tempered_weights)

V, MASK = 9, 8  # eight real tokens, the mask id last


def gamma_of(a_tilde: float) -> float:
    """gamma with alpha~^2 = sigmoid(-gamma)."""
    return math.log((1 - a_tilde ** 2) / a_tilde ** 2)


def argmax_frequency(sampler, a_tilde, n, seed):
    g = torch.Generator().manual_seed(seed)
    s_tilde = math.sqrt(1 - a_tilde ** 2)
    x = torch.randint(0, V - 1, (n,), generator=g)
    return float((sampler(x, a_tilde, s_tilde, g) == x).double().mean())


SAMPLERS = {
    "whole": lambda x, a, s, g: gaussian_latent(x, a, s, V - 1, MASK, g).argmax(-1),
    "top2": lambda x, a, s, g: latent_top_k(x, a, s, 2, V - 1, MASK, g)[0][:, 0],
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_duality_table_is_the_argmax_frequency_of_gaussian_latents(sampler):
    N, n = V - 1, 100_000
    for i, a_tilde in enumerate((0.3, 0.6, 0.9)):
        gam = gamma_of(a_tilde)
        alpha = float(duality_alpha(torch.tensor([gam]), N, -2.0, 3.0)[0][0])
        p = alpha + (1 - alpha) / N  # P(argmax = x)
        se = math.sqrt(p * (1 - p) / n)
        freq = argmax_frequency(SAMPLERS[sampler], a_tilde, n, seed=i)
        assert abs(freq - p) < 4.5 * se, (a_tilde, freq, p, se)
        # power: the naive alpha = alpha~^2 (the Gaussian's own signal share) is rejected by the same draws
        naive = a_tilde ** 2 + (1 - a_tilde ** 2) / N
        assert abs(freq - naive) > 10 * se


def test_duality_table_equals_the_two_token_closed_form():
    """N = 2: P(argmax = x) = Phi(m / sqrt 2), m = alpha~ / sigma~, so alpha = 2 Phi(m / sqrt 2) - 1."""
    gam = torch.linspace(-3.5, -1.5, 37, dtype=torch.float64)
    a, da = duality_alpha(gam, 2, -3.55, -1.45)
    closed = lambda g: torch.special.erf(torch.exp(-g / 2) / 2)  # noqa: E731  (2 Phi(y) - 1 = erf(y / sqrt 2))
    assert float((a - closed(gam)).abs().max()) < 1e-7
    h = 1e-5
    fd = (closed(gam + h) - closed(gam - h)) / (2 * h)
    assert float((da - fd).abs().max()) < 1e-6
    assert (da < 0).all()  # more noise (larger gamma), less signal


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_time_inverts_the_schedule(schedule):
    sch = get_schedule(schedule, 2.0)
    a = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert float((sch.alpha(schedule_time(sch, a)) - a).abs().max()) < 1e-9


def tiny(dtype=torch.float64) -> Transformer:
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=V, mask_id=MASK, max_seq_len=32,
                      time_conditioning="adaln", cond_dim=16)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    return m.to(dtype)


def latents(B=3, L=8, a_tilde=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (B, L), generator=g)
    w = torch.stack([gaussian_latent(x[b], a_tilde, math.sqrt(1 - a_tilde ** 2), V - 1, MASK, g) for b in range(B)])
    return x, w


@torch.no_grad()
def test_soft_input_tends_to_the_discrete_input_as_tau_goes_to_zero():
    m = tiny()
    x, w = latents()
    z = w.argmax(-1)
    t = torch.full((z.shape[0],), 0.4, dtype=torch.float64)
    ref = m(z, t=t)
    dense = m(z, t=t, soft_input=tempered_weights(w, 1e-4))
    vals, ids = w.topk(3, -1)
    sparse = m(z, t=t, soft_input=(ids, tempered_weights(vals, 1e-4)))
    assert float((dense - ref).abs().max()) < 1e-6
    assert float((sparse - ref).abs().max()) < 1e-6
    # and at a warm temperature the soft input is really another input
    assert float((m(z, t=t, soft_input=tempered_weights(w, 1.0)) - ref).abs().max()) > 1e-3


@torch.no_grad()
def test_top_k_with_every_entry_kept_is_the_full_softmax_input():
    m = tiny()
    _, w = latents(seed=1)
    z = w.argmax(-1)
    t = torch.full((z.shape[0],), 0.7, dtype=torch.float64)
    tau = 0.5  # warm: every entry carries weight
    vals, ids = w.topk(V - 1, -1)  # every real token (the mask's -inf entry is the one left out)
    dense = m.soft_embeddings(tempered_weights(w, tau), z)
    sparse = m.soft_embeddings((ids, tempered_weights(vals, tau)), z)
    assert float((dense - sparse).abs().max()) < 1e-12
    assert torch.allclose(m(z, t=t, soft_input=tempered_weights(w, tau)),
                          m(z, t=t, soft_input=(ids, tempered_weights(vals, tau))), rtol=0, atol=1e-12)
    # fewer entries is a different input at this temperature
    assert float((m.soft_embeddings((ids[..., :2], tempered_weights(vals[..., :2], tau)), z) - dense).abs().max()) > 1e-3


def test_top_k_sampler_matches_the_whole_latent_in_distribution():
    """The two largest entries drawn as order statistics have the whole latent's law: mean of the largest and
    second largest, and how often x is among the top two, within 4.5 standard errors."""
    n, a_tilde = 40_000, 0.5
    s_tilde = math.sqrt(1 - a_tilde ** 2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    x = torch.randint(0, V - 1, (n,), generator=g1)
    whole = gaussian_latent(x, a_tilde, s_tilde, V - 1, MASK, g1)
    wv, wi = whole.topk(2, -1)
    ids, vals = latent_top_k(x, a_tilde, s_tilde, 2, V - 1, MASK, g2)
    assert ids.shape == (n, 2) and bool((ids != MASK).all()) and bool((ids[:, 0] != ids[:, 1]).all())
    for j in range(2):
        se = math.sqrt((wv[:, j].var() + vals[:, j].var()) / n)
        assert abs(float(wv[:, j].mean() - vals[:, j].mean())) < 4.5 * se
    p1, p2 = (wi == x[:, None]).any(1).double(), (ids == x[:, None]).any(1).double()
    assert abs(float(p1.mean() - p2.mean())) < 4.5 * math.sqrt(2 * 0.25 / n)
    # and the noise tokens are uniform over the other real tokens: the largest, where it is not x
    other = ids[:, 0][ids[:, 0] != x]
    counts = torch.bincount(other, minlength=V)[:V - 1].double()
    expect = counts.sum() / (V - 1)
    assert float(((counts - expect) ** 2 / expect).sum()) < 24.3  # chi-square, 7 dof, p = 0.001


def test_distinct_draws_are_a_uniform_ordered_subset():
    """Floyd's subsets with shuffled slots: every slot is uniform over [0, n) (Floyd's own slot 0 never holds
    the top k - 1 values), and the k values are distinct."""
    L, k, n = 30_000, 3, 6
    d = distinct_draws(L, k, n, torch.Generator().manual_seed(5))
    assert bool((d.sort(1).values.diff(dim=1) > 0).all())
    for slot in range(k):
        counts = torch.bincount(d[:, slot], minlength=n).double()
        assert float(((counts - L / n) ** 2 / (L / n)).sum()) < 20.5  # chi-square, 5 dof, p = 0.001


def curriculum(top_k=0, steps=2, **kw):
    return build_objective(DiffusionConfig(objective="uniform", curriculum_steps=steps, curriculum_top_k=top_k,
                                           curriculum_gamma_min=-3.0, curriculum_gamma_max=-0.5, **kw),
                           mask_id=MASK, vocab_size=V)


@pytest.mark.parametrize("top_k", [0, 3])
def test_training_steps_with_the_curriculum_and_the_validation_bound(top_k):
    torch.manual_seed(0)
    m = tiny(torch.float32)
    obj, plain = curriculum(top_k), curriculum(steps=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x0 = torch.randint(0, V - 1, (4, 12), generator=torch.Generator().manual_seed(7))
    for step in range(4):
        noised = obj.noise(x0, obj.draw(0, step, 4, 12).rows(slice(0, 4)))
        on = step < 2
        assert ("alpha" in noised.extra) == on
        if on:
            key = "soft_ids" if top_k else "soft_dense"
            assert key in noised.extra
            w = noised.extra["soft_dense"] if not top_k else None
            if w is not None:  # z is the latent's argmax, the input its tempered softmax
                assert torch.equal(noised.xt, w.argmax(-1)) and w.shape == (4, 12, V)
            else:
                assert torch.equal(noised.xt, noised.extra["soft_ids"][..., 0])
                assert noised.extra["soft_ids"].shape == (4, 12, top_k)
            a = noised.extra["alpha"]
            assert torch.allclose(obj.schedule.alpha(noised.t.double()), a.double(), atol=1e-6)
        loss, stats = obj.loss(m, noised)
        assert torch.isfinite(loss)
        loss.backward()
        grad = m.tok_embeddings.weight.grad
        if on and not top_k:  # the dense soft input reaches every real token's embedding, not only the batch's
            assert bool((grad[:V - 1].abs().sum(1) > 0).all())
        opt.step()
        opt.zero_grad(set_to_none=True)
    # validation: for_validation() is the plain objective, bit for bit, on validation's noise (step 0, where
    # the training objective would run the curriculum)
    val = obj.for_validation()
    assert val.curriculum_steps == 0 and obj.curriculum_steps == 2
    noise = val.draw(10_007, 0, 4, 12).rows(slice(0, 4))
    with torch.no_grad():
        got, _ = val.loss(m, val.noise(x0, noise))
        want, _ = plain.loss(m, plain.noise(x0, plain.draw(10_007, 0, 4, 12).rows(slice(0, 4))))
        surrogate, _ = obj.loss(m, obj.noise(x0, obj.draw(10_007, 0, 4, 12).rows(slice(0, 4))))
    assert torch.equal(got, want)
    assert not torch.equal(surrogate, want)


def test_curriculum_draws_are_a_pure_function_of_seed_step_and_row():
    """A micro-batch's latents do not depend on which other rows share it (every layout sees the same noise)."""
    obj = curriculum(top_k=2)
    x0 = torch.randint(0, V - 1, (4, 10), generator=torch.Generator().manual_seed(8))
    noise = obj.draw(3, 1, 4, 10)
    whole = obj.noise(x0, noise.rows(slice(0, 4)))
    part = obj.noise(x0[2:], noise.rows(slice(2, 4)))
    assert torch.equal(whole.xt[2:], part.xt)
    assert torch.equal(whole.extra["soft_weights"][2:], part.extra["soft_weights"])


def test_curriculum_settings_are_checked():
    with pytest.raises(ValueError, match="curriculum_top_k"):
        curriculum(top_k=-1)
    with pytest.raises(ValueError, match="curriculum_gamma_min"):
        build_objective(DiffusionConfig(objective="uniform", curriculum_steps=5, curriculum_gamma_min=-1.0,
                                        curriculum_gamma_max=-2.0), mask_id=MASK, vocab_size=V)
    with pytest.raises(ValueError, match="objective=hybrid has none"):
        build_objective(DiffusionConfig(objective="hybrid", curriculum_steps=5), mask_id=MASK, vocab_size=V)
    # defaults: no curriculum, the draw carries no latent seeds
    plain = build_objective(dataclasses.replace(DiffusionConfig(), objective="uniform"), mask_id=MASK, vocab_size=V)
    assert "latent_seed" not in plain.draw(0, 0, 2, 4).extra and plain.for_validation() is plain


def test_trainer_logs_the_plain_nelbo_as_the_validation_bound_during_the_curriculum(tmp_path):
    """Through pretrain's loop, at lr 0 (the weights stay those of the seed): a run with the curriculum trains
    on its surrogate (another training loss) and logs exactly the plain run's validation bound."""
    import json

    from pretrain.config import load_config
    from pretrain.loop.train import train
    from tests.conftest import ROOT
    run = ["train.steps=2", "train.eval_every=1", "train.save_every=100", "train.log_every=1", "train.samples=0",
           "logging.plot=false", "logging.progress_bar=false", "train.threads=1", "train.peak_flops=1e12",
           "diffusion.objective=uniform", "model.time_conditioning=adaln", "optim.lr=0", "optim.min_lr=0",
           "optim.warmup_steps=0", f"train.out_dir={tmp_path}"]
    curriculum_on = ["diffusion.curriculum_steps=5", "diffusion.curriculum_top_k=4",
                     "diffusion.curriculum_gamma_min=-3", "diffusion.curriculum_gamma_max=0"]
    logs = {}
    for name, extra in (("plain", []), ("curriculum", curriculum_on)):
        train(load_config(str(ROOT / "configs" / "tiny.yaml"), [*run, f"train.name={name}", *extra]))
        logs[name] = {}
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            logs[name].setdefault(rec["step"], {}).update(rec)
    for step in (1, 2):
        assert logs["curriculum"][step]["val/valid"] == logs["plain"][step]["val/valid"]
        assert math.isfinite(logs["curriculum"][step]["loss"])
        assert logs["curriculum"][step]["loss"] != logs["plain"][step]["loss"]
