"""GenMD4 (model/objectives/genmd4.py): reduction to MD4 poly-k, exact tightness with the oracle, an unbiased
gradient in the learned exponents (with a negative control), and the derived sampler against the joint."""
import math

import pytest
import torch

from model import ModelConfig, Transformer
from model.objectives import DiffusionConfig, build_objective
from model.objectives.config import GenMD4Config
from model.objectives.genmd4 import log_t_quadrature
from model.objectives.mdm import masked_loss, mask_batch
from model.objectives.schedules import PolySchedule
from tests.obj_oracles import TableNet, chi_square_p, log_table, posterior, posterior_table, random_joint, states

V, MASK, L = 3, 3, 2
W = torch.tensor([0.5, 1.0, 2.0, 1.0])  # the mask id's entry is never used


def objective(samples=2, mask_eps=1e-4, t1=1e-3):
    return build_objective(DiffusionConfig(objective="genmd4", eps=t1,
                                           genmd4=GenMD4Config(samples_per_t=samples, mask_eps=mask_eps)),
                           mask_id=MASK)


def set_w(obj, model, w):
    obj.init_modules(model)
    with torch.no_grad():
        model.noise_schedule.w_hat.copy_(torch.log(torch.expm1(w)))


def tiny_model(seed=0):
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=V + 1, mask_id=MASK, max_seq_len=8,
                      init_std=0.6)
    m = Transformer(cfg)
    m.init_weights(seed=seed)
    return m


def test_config_is_validated_and_the_exponents_start_linear_after_init_weights():
    with pytest.raises(ValueError, match="samples_per_t"):
        objective(samples=3)
    obj, model = objective(), tiny_model()
    obj.init_modules(model)
    model.init_weights(seed=1)  # must not overwrite the exponents
    torch.testing.assert_close(model.noise_schedule(), torch.ones(V + 1))
    assert "noise_schedule.w_hat" in model.state_dict()
    assert obj.no_decay_prefixes == ("noise_schedule.",)


@pytest.mark.parametrize("samples", [1, 2])
def test_frozen_exponents_are_the_md4_ablation(samples):
    """genmd4.learn_exponents=false: w stays power_init (no gradient, no REINFORCE), the same NELBO on the same
    noise as the learned objective at its initialisation: md4 issue 4's MD4 poly-k with 1 or 2 masks per t."""
    dcfg = DiffusionConfig(objective="genmd4", genmd4=GenMD4Config(samples_per_t=samples, learn_exponents=False))
    frozen, learned = build_objective(dcfg, mask_id=MASK), objective(samples=samples)
    model = tiny_model(seed=2)
    frozen.init_modules(model)
    assert not model.noise_schedule.w_hat.requires_grad
    x0 = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(1))
    noise = frozen.draw(0, 3, 4, 8)
    loss, stats = frozen.micro_loss(model, x0, noise)
    loss.backward()
    assert model.noise_schedule.w_hat.grad is None
    torch.testing.assert_close(loss, stats["nelbo"])  # no REINFORCE term: the loss is the NELBO
    _, ref = learned.micro_loss(model, x0, noise)
    torch.testing.assert_close(stats["nelbo"], ref["nelbo"])


class Subs(torch.nn.Module):
    """The transformer with its mask logit removed (SUBS, as GenMD4's V-way output), for either loss path."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.cfg = module.cfg

    def forward(self, xt, logits_at=None, targets=None, row_loss=None, ce_chunk=0, **kw):
        logits = self.module(xt, logits_at=logits_at, **kw).float().index_fill(-1, torch.tensor([MASK]),
                                                                               float("-inf"))
        if row_loss is not None:
            return row_loss(logits, slice(0, logits.shape[0]))
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("k", [1.0, 2.5])
def test_all_w_equal_k_is_the_poly_k_masked_loss_on_the_same_noise(k):
    inner = tiny_model(seed=3)
    obj = objective(samples=1, mask_eps=0.0)
    set_w(obj, inner, torch.full((V + 1,), k))
    model = Subs(inner)
    x0 = torch.randint(0, V, (6, 8), generator=torch.Generator().manual_seed(0))
    noise = obj.draw(0, 5, 6, 8)
    _, stats = obj.micro_loss(model, x0, noise)
    sched = PolySchedule(k)
    sched.squeeze = 0.0  # alpha = 1 - t^k exactly, as GenMD4 with mask_eps = 0
    ref, _ = masked_loss(model, mask_batch(x0, noise.u, noise.mask_uniform, mask_id=MASK, schedule=sched,
                                           eps=1e-3))
    torch.testing.assert_close(stats["nelbo"] - stats["recon"], ref, rtol=1e-5, atol=1e-6)


def oracle_logprobs(joint, w, mask_eps=0.0):
    """cond_logprobs(xt, t): the exact posterior under the value-dependent mask."""
    def cond(xt, t):
        lik = lambda v: (1.0 - mask_eps) * t ** w.double()[v]  # noqa: E731
        p = posterior(joint, xt, MASK, mask_lik=lik)
        out = torch.full((L, V + 1), float("-inf"), dtype=torch.float64)
        out[:, :V] = torch.log(p.clamp_min(1e-300))
        return out
    return cond


def test_tightness_exact_nelbo_of_the_oracle_is_minus_log_p():
    joint = random_joint(V, L, seed=4)
    obj = objective(mask_eps=0.0, t1=1e-12)
    model = TableNet(V, L, lambda z: torch.zeros(L, V + 1))
    set_w(obj, model, W)
    cond = oracle_logprobs(joint, W)
    for x in states(V, L):
        got = obj.exact_nelbo(cond, x, panels=10, nodes=8)  # converged: 48 x 24 nodes agree to 1e-8
        want = -math.log(float(joint[tuple(x.tolist())]))
        assert abs(got - want) < 1e-4, (x.tolist(), got, want)


def test_log_t_quadrature_integrates_a_power_singularity():
    ts, cs = log_t_quadrature(1e-12)
    got = float((cs * ts ** -0.5).sum())
    assert abs(got - 2.0 * (1.0 - 1e-6)) < 1e-10


def _fixed_net(seed=7):
    g = torch.Generator().manual_seed(seed)
    table = {}

    def fn(z):
        key = tuple(z.tolist())
        if key not in table:
            table[key] = torch.randn(L, V + 1, generator=g, dtype=torch.float64)
        return table[key]
    return TableNet(V, L, fn)


def _gradient_draws(obj, model, x, batches, B):
    grads = []
    for step in range(batches):
        model.zero_grad()
        x0 = x[None].repeat(B, 1)
        loss, _ = obj.micro_loss(model, x0, obj.draw(11, step, B, L))
        (loss * L).backward()  # per-sequence mean
        grads.append(model.noise_schedule.w_hat.grad[:V].clone().double())
    return torch.stack(grads)


def _exact_gradient(obj, model, x):
    w_hat = model.noise_schedule.w_hat.detach().double().clone().requires_grad_(True)
    w = torch.nn.functional.softplus(w_hat)
    cond = lambda z, t: torch.log_softmax(  # noqa: E731
        model.table[model.index(z)].double().index_fill(-1, torch.tensor([MASK]), float("-inf")), -1)
    ts, cs = log_t_quadrature(obj.eps, panels=24, nodes=16)
    total = sum(c * obj.expected_diffusion(cond, x, w, float(t)) for t, c in zip(ts, cs)) / (1.0 - obj.eps)
    from model.objectives.genmd4 import recon_loss
    total = total + recon_loss(x[None], w, obj.eps, obj.mask_eps, MASK)[0]
    total.backward()
    return w_hat.grad[:V]


@pytest.mark.parametrize("samples", [2, 1])
def test_gradient_in_w_is_unbiased_and_a_negative_control_without_reinforce_fails(samples):
    x = torch.tensor([0, 2])
    obj = objective(samples=samples, t1=0.05)  # t1 bounds 1/t: lighter tails, steadier standard errors
    model = _fixed_net()
    set_w(obj, model, W)
    exact = _exact_gradient(obj, model, x)
    B = 250
    draws = _gradient_draws(obj, model, x, 80, B)  # N = 20,000 (t, z1, z2) draws, in 80 batch means

    def zscores(d):
        se = d.std(0) / math.sqrt(d.shape[0])
        return (d.mean(0) - exact) / se, se
    z_all, se_all = zscores(draws)
    z_few, se_few = zscores(draws[:20])  # N = 5,000
    assert bool((z_all.abs() < 4).all()), (z_all, exact, draws.mean(0))
    assert bool((z_few.abs() < 4).all()), z_few
    # 1/sqrt(N): the standard error at N = 5,000 is twice that at 20,000 (the ratio's geometric mean over the
    # components, as the standard errors are themselves estimates from 20 and 80 batch means)
    ratio = float(torch.exp(torch.log(se_few / se_all).mean()))
    assert 1.4 < ratio < 2.9, ratio
    obj.reinforce = False  # negative control: the pathwise part alone is biased
    z_bad, _ = zscores(_gradient_draws(obj, model, x, 80, B))
    assert bool((z_bad.abs() > 4).any()), z_bad


def test_sampler_with_the_oracle_matches_the_joint():
    joint = random_joint(V, L, seed=9)
    obj = objective(mask_eps=0.0)
    model = TableNet(V, L, lambda z: torch.zeros(L, V + 1))
    set_w(obj, model, W)
    N, T = 20000, 400
    gen = torch.Generator().manual_seed(0)
    z = torch.full((N, L), MASK)
    patterns = model.patterns
    for i in range(T):
        t, s = 1.0 - i / T, 1.0 - (i + 1) / T
        lik = lambda v: t ** W.double()[v]  # noqa: E731
        table = torch.zeros(len(patterns), L, V + 1, dtype=torch.float64)
        table[:, :, :V] = posterior_table(joint, patterns, MASK, mask_lik=lik)
        p_x0 = table[model.index(z)].reshape(N * L, V + 1)
        probs = obj.reverse_step(p_x0, z.reshape(-1), t, s)
        u = torch.rand(N * L, 1, generator=gen, dtype=torch.float64)
        z = (probs.cumsum(-1) < u).sum(-1).clamp_max(V).reshape(N, L)  # inverse CDF
    assert not bool((z == MASK).any())
    assert chi_square_p(z, joint) > 1e-3


def test_eval_bound_through_eval_elbo_matches_exact_nelbo():
    from eval.elbo import sequence_samples
    joint = random_joint(V, L, seed=2)
    obj = objective(mask_eps=1e-4, t1=1e-3)
    model = TableNet(V, L, log_table(lambda z: posterior(joint, z, MASK)))
    set_w(obj, model, W)
    x = torch.tensor([1, 2])
    cond = lambda z, t: model.table[model.index(z)].double()  # noqa: E731
    exact = obj.exact_nelbo(cond, x)
    est = sequence_samples(model, x[None], method="t", samples=4000, seed=0, mask_id=MASK, objective=obj)
    assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(est.numel()) + 1e-6
