"""The training loss is an unbiased estimator of the NELBO (checked against exact enumeration)."""
import itertools
import math

import numpy as np
import pytest
import torch

from model import ModelConfig, Transformer
from model.objectives import (SCHEDULES, CosAlphaSchedule, CosineSchedule, LinearSchedule, PolySchedule,
                              draw_step_noise, get_schedule, noise_level, sample_u)
from model.objectives.mdm import mdm_loss

V, MASK, L = 3, 3, 4
X0 = torch.tensor([0, 2, 1, 2])


def toy_model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=V + 1, mask_id=MASK,
                                max_seq_len=8, init_std=0.5))
    return m.eval()


@torch.no_grad()
def exact_expected_loss(model, schedule, eps, n_nodes=400):
    """E_u E_mask[loss] = (1/L) * integral_0^1 sum_patterns P(pattern | p(t)) w(t) CE(pattern) du,
    by enumerating all 2^L mask patterns and Gauss-Legendre quadrature over u."""
    patterns = torch.tensor(list(itertools.product([False, True], repeat=L)))
    xt = torch.where(patterns, torch.full_like(patterns, MASK, dtype=torch.long), X0.expand(len(patterns), L))
    logp = torch.log_softmax(model(xt).double(), -1)
    nll = -logp.gather(-1, X0.expand(len(patterns), L)[..., None]).squeeze(-1)
    ce_sum = (nll * patterns).sum(1)  # (16,)
    k = patterns.sum(1).double()
    nodes, weights = np.polynomial.legendre.leggauss(n_nodes)
    u = torch.tensor((nodes + 1) / 2)  # map [-1, 1] -> [0, 1]
    wq = torch.tensor(weights / 2)
    t = noise_level(u, eps)
    p = schedule.mask_prob(t)[:, None]
    prob = p ** k * (1 - p) ** (L - k)  # (nodes, 16)
    integrand = schedule.weight(t) * (prob * ce_sum).sum(1)
    return float((wq * integrand).sum() / L)


@torch.no_grad()
def mc_losses(model, schedule, eps, batches=40, batch=4096, stratified=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = X0.expand(batch, L).clone()
    out = []
    for _ in range(batches):
        u = sample_u(batch, gen, stratified)
        loss, _ = mdm_loss(model, x0, u, torch.rand(batch, L, generator=gen), mask_id=MASK, schedule=schedule,
                           eps=eps)
        out.append(float(loss))
    return np.array(out)


ALL_SCHEDULES = [LinearSchedule(), CosineSchedule(), PolySchedule(2.0), PolySchedule(3.0), CosAlphaSchedule()]


def test_every_schedule_is_covered():
    assert {type(s) for s in ALL_SCHEDULES} == set(SCHEDULES.values())


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=["linear", "cosine", "poly2", "poly3", "cos_alpha"])
def test_loss_is_unbiased_for_the_nelbo(schedule):
    model = toy_model()
    exact = exact_expected_loss(model, schedule, eps=0.0)
    losses = mc_losses(model, schedule, eps=0.0, batches=16)
    mean, se = losses.mean(), losses.std(ddof=1) / math.sqrt(len(losses))
    assert abs(mean - exact) < 4 * se + 1e-4, (mean, exact, se)
    assert abs(mean - exact) / exact < 0.02  # MD4 cosine: weight pi/(2e) at t -> 0, a heavy tail


def test_md4_schedules_follow_md4_formulas():
    """alpha = (1 - 2e) alpha0 + e with e = 1e-4; cosine alpha0 = 1 - cos(pi/2 (1 - t)), poly alpha0 = 1 - t^k; the
    weight is -alpha'/(1 - alpha) (checked against a finite difference)."""
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    e = 1e-4
    cos, poly = get_schedule("cosine"), get_schedule("poly", poly_exponent=3.0)
    assert torch.allclose(cos.alpha(t), (1 - 2 * e) * (1 - torch.cos(math.pi / 2 * (1 - t))) + e)
    assert torch.allclose(poly.alpha(t), (1 - 2 * e) * (1 - t ** 3) + e)
    assert float(cos.alpha(torch.tensor(0.0))) == pytest.approx(1 - e) and float(cos.alpha(torch.tensor(1.0))) == pytest.approx(e)
    # mean masked fraction of MD4's cosine over t ~ U(0, 1) is 2 / pi (up to the squeeze)
    grid = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    assert float(cos.mask_prob(grid).mean()) == pytest.approx(2 / math.pi, abs=1e-3)
    for sch in (cos, poly, get_schedule("linear"), get_schedule("cos_alpha")):
        h = 1e-6
        dalpha = (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h)
        assert torch.allclose(sch.weight(t), -dalpha / (1 - sch.alpha(t)), rtol=1e-5)


def test_continuous_time_nelbo_does_not_depend_on_the_schedule():
    """w dt = dp / p with p = 1 - alpha: the exact expected loss depends only on p's end points, which the MD4
    squeeze moves by 1e-4; every schedule's NELBO equals the linear one's to that order."""
    model = toy_model()
    ref = exact_expected_loss(model, LinearSchedule(), eps=0.0)
    for sch in ALL_SCHEDULES[1:]:
        assert exact_expected_loss(model, sch, eps=0.0) == pytest.approx(ref, rel=2e-3)


def test_llada_eps_changes_the_target_by_order_eps():
    model = toy_model()
    exact0 = exact_expected_loss(model, LinearSchedule(), eps=0.0)
    exact_eps = exact_expected_loss(model, LinearSchedule(), eps=1e-3)
    assert exact_eps != exact0
    assert abs(exact_eps - exact0) / exact0 < 3e-3
    losses = mc_losses(model, LinearSchedule(), eps=1e-3, batches=20, seed=1)
    se = losses.std(ddof=1) / math.sqrt(len(losses))
    assert abs(losses.mean() - exact_eps) < 4 * se + 1e-4


def test_stratified_t_reduces_variance():
    model = toy_model()
    strat = mc_losses(model, LinearSchedule(), 1e-3, batches=30, batch=256, stratified=True)
    plain = mc_losses(model, LinearSchedule(), 1e-3, batches=30, batch=256, stratified=False)
    assert strat.var() < plain.var()


def test_loss_normalizes_by_all_positions_not_masked_count():
    """LLaDA: sum over masked of CE / p_mask, divided by batch * length."""
    model = toy_model()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, V, (5, L), generator=gen)
    u = torch.rand(5, generator=gen)
    noise = torch.rand(5, L, generator=gen)
    loss, _ = mdm_loss(model, x0, u, noise, mask_id=MASK, schedule=LinearSchedule(), eps=1e-3)
    p = (1 - 1e-3) * u + 1e-3
    masked = noise < p[:, None]
    with torch.no_grad():
        logits = model(torch.where(masked, MASK, x0))
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    expected = (ce * masked / p[:, None]).sum() / (5 * L)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_step_noise_is_a_pure_function_of_seed_and_step():
    a = draw_step_noise(7, 11, 16, 32, stratified=True, random_length_prob=0.5, device="cpu")
    b = draw_step_noise(7, 11, 16, 32, stratified=True, random_length_prob=0.5, device="cpu")
    c = draw_step_noise(7, 12, 16, 32, stratified=True, random_length_prob=0.5, device="cpu")
    assert torch.equal(a.u, b.u) and torch.equal(a.mask_uniform, b.mask_uniform) and a.length == b.length
    assert not torch.equal(a.u, c.u)
    # Stratified over the global batch: exactly one draw in each interval ((j-1)/n, j/n].
    bins = torch.ceil(a.u * 16).long()
    assert sorted(bins.tolist()) == list(range(1, 17))


def test_random_length_frequency():
    cut = sum(draw_step_noise(0, s, 2, 64, stratified=True, random_length_prob=0.25, device="cpu").length < 64
              for s in range(2000))
    assert 0.2 < cut / 2000 < 0.3
    lengths = {draw_step_noise(0, s, 2, 8, stratified=True, random_length_prob=1.0, device="cpu").length
               for s in range(400)}
    assert lengths == set(range(1, 9))
