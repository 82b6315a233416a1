"""Hybrid (GIDD) noise (model/objectives/hybrid.py): its end points are mdm and uniform (per-token loss,
training loss, bound), its posterior is Bayes' rule from explicit transition matrices, and its bound is tight
for the exact leave-one-out posterior at several mixing fractions."""
import math

import pytest
import torch

from model import ModelConfig, Transformer
from model.objectives import DiffusionConfig, build_objective
from model.objectives.hybrid import gidd_nll
from model.objectives.uniform import duo_nll
from tests.obj_oracles import random_joint
from tests.test_obj_uniform import oracle

V, MASK = 3, 3


def hybrid(p_u, eps=1e-3, schedule="linear"):
    return build_objective(DiffusionConfig(objective="hybrid", uniform_frac=p_u, eps=eps, schedule=schedule),
                           mask_id=MASK, vocab_size=V + 1)


def other(name, eps=1e-3, schedule="linear"):
    return build_objective(DiffusionConfig(objective=name, eps=eps, schedule=schedule), mask_id=MASK,
                           vocab_size=V + 1)


def test_per_token_loss_at_the_end_points():
    g = torch.Generator().manual_seed(0)
    n = 300
    logits = torch.randn(n, V + 1, generator=g, dtype=torch.float64) * 2
    x = torch.randint(0, V, (n,), generator=g)
    a = 0.01 + 0.98 * torch.rand(n, generator=g, dtype=torch.float64)
    da = -0.2 - torch.rand(n, generator=g, dtype=torch.float64)
    # p_u = 1: uniform noise, DUO's closed form, for z = x and z != x.
    z = torch.where(torch.rand(n, generator=g) < 0.5, x, (x + torch.randint(1, V, (n,), generator=g)) % V)
    assert torch.allclose(gidd_nll(logits, z, x, a, da, p_u=1.0, mask_id=MASK),
                          duo_nll(logits, z, x, a, da, mask_id=MASK), rtol=1e-9, atol=1e-12)
    # p_u = 0: masked positions give -alpha'/(1 - alpha) CE (mdm's weight), clean ones nothing.
    zm = torch.where(torch.rand(n, generator=g) < 0.5, x, torch.full_like(x, MASK))
    logits_real = logits.clone()
    logits_real[:, MASK] = float("-inf")
    ce = torch.nn.functional.cross_entropy(logits_real, x, reduction="none")
    want = torch.where(zm == MASK, -da / (1 - a) * ce, 0.0)
    assert torch.allclose(gidd_nll(logits, zm, x, a, da, p_u=0.0, mask_id=MASK), want, rtol=1e-9, atol=1e-12)


def gidd_dense(logits, z, x, a, da, p_u):
    """GIDD's ELBO integrand written from its definition with dense (n, V) distributions over the real
    tokens: w_t(z) [KL(q_t(. | x) || q_t(. | x_theta)) + r - log r - 1] (the module docstring's weights)."""
    n = logits.shape[0]
    masked = logits.clone()
    masked[:, MASK] = float("-inf")
    x_theta = masked.softmax(-1)[:, :V]
    b = 1 - a
    rho = a * p_u / (a * p_u + b * (1 - p_u))
    c0 = (b * rho / V)[:, None]
    one_hot = torch.nn.functional.one_hot(x, V).double()
    q_x, q_theta = a[:, None] * one_hot + c0, a[:, None] * x_theta + c0
    kl = (q_x * (q_x.log() - q_theta.log())).sum(-1)
    is_mask = z == MASK
    zs = torch.where(is_mask, x, z)
    r = q_x.gather(-1, zs[:, None])[:, 0] / q_theta.gather(-1, zs[:, None])[:, 0]
    is_div = torch.where(is_mask, 0.0, r - r.log() - 1)
    w = torch.where(is_mask, -da * (1 + rho) / (a * b), -da * rho ** 2 / (a * V * q_x.gather(-1, zs[:, None])[:, 0]))
    return w * (kl + is_div)


@pytest.mark.parametrize("p_u", [0.3, 0.8])
def test_per_token_loss_equals_the_dense_definition_with_its_gradient(p_u):
    """gidd_nll (which reads the logits through mixture_log_stats) against the dense definition: values and
    gradients in float64, at masked, clean and replaced positions."""
    g = torch.Generator().manual_seed(3)
    n = 60
    logits = (torch.randn(n, V + 1, generator=g, dtype=torch.float64) * 2).requires_grad_()
    x = torch.randint(0, V, (n,), generator=g)
    kind = torch.randint(0, 3, (n,), generator=g)
    z = torch.where(kind == 0, x, torch.where(kind == 1, torch.full_like(x, MASK),
                                              (x + torch.randint(1, V, (n,), generator=g)) % V))
    a = 0.02 + 0.96 * torch.rand(n, generator=g, dtype=torch.float64)
    da = -0.2 - torch.rand(n, generator=g, dtype=torch.float64)
    ours = gidd_nll(logits, z, x, a, da, p_u=p_u, mask_id=MASK)
    ref = gidd_dense(logits, z, x, a, da, p_u)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)
    coef = torch.randn(n, generator=g, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((coef * ours).sum(), logits)
    (g_ref,) = torch.autograd.grad((coef * ref).sum(), logits)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-10)


def tiny():
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=V + 1, mask_id=MASK, max_seq_len=8,
                      init_std=0.6, time_conditioning="adaln")
    m = Transformer(cfg)
    m.init_weights(seed=0)
    with torch.no_grad():  # a non-trivial time dependence (adaLN-zero starts at none)
        for name, p in m.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return m


def mdm_subs_loss(model, batch):
    """mdm's training loss with SUBS (the mask logit at -inf, as mdm's bound and GIDD's loss apply it; mdm's
    training CE itself keeps the mask column)."""
    B, L = batch.x0.shape
    logits = model(batch.xt, logits_at=batch.at, t=batch.t).double()
    logits[:, MASK] = float("-inf")
    ce = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
    return (ce * batch.weights).sum() / (B * L)


@pytest.mark.parametrize("p_u,name", [(0.0, "mdm"), (1.0, "uniform")])
def test_training_loss_at_the_end_points(p_u, name):
    model = tiny()
    x0 = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(2))
    h, o = hybrid(p_u), other(name)
    for step in range(3):
        nh = h.draw(5, step, 4, 8).rows(slice(0, 4))
        no = o.draw(5, step, 4, 8).rows(slice(0, 4))
        bh, bo = h.noise(x0, nh), o.noise(x0, no)
        assert torch.equal(bh.xt, bo.xt)
        lh, _ = h.loss(model, bh, ce_chunk=5)
        lo = mdm_subs_loss(model, bo) if name == "mdm" else o.loss(model, bo)[0]
        lh, lo = lh.detach(), lo.detach()
        assert abs(float(lh) - float(lo)) < 1e-5 * max(1.0, abs(float(lo))), (step, float(lh), float(lo))


def test_bound_at_the_end_points():
    joint = random_joint(V, 2, seed=3)
    x0 = torch.tensor([1, 2])
    # mdm's exact bound (subsets, t integrated out) against hybrid(0)'s quadrature, same network.
    table = {}

    def cond_masked(xt):
        key = tuple(int(v) for v in xt)
        if key not in table:
            g = torch.Generator().manual_seed(hash(key) % 2**31)
            logits = torch.randn(2, V + 1, generator=g, dtype=torch.float64)
            logits[:, MASK] = float("-inf")  # SUBS, as mdm's bound applies it
            table[key] = torch.log_softmax(logits, -1)
        return table[key]
    mdm = other("mdm")
    h0 = hybrid(0.0, eps=1e-6)
    cond_t = lambda Z, t: torch.stack([cond_masked(z) for z in Z])  # noqa: E731
    assert abs(mdm.exact_nelbo(cond_masked, x0) - h0.exact_nelbo(cond_t, x0, nodes=200)) < 1e-4
    # uniform and hybrid(1) agree for a time-dependent network.
    uni, h1 = other("uniform", eps=1e-6), hybrid(1.0, eps=1e-6)
    cond = oracle(uni, joint, leave_out=False, n_states=V + 1)
    assert abs(uni.exact_nelbo(cond, x0, nodes=50) - h1.exact_nelbo(cond, x0, nodes=50)) < 1e-9


def transition(obj, t, s):
    """Q[y, z] = q(z_t = z | z_s = y) over the whole vocabulary: (a_t/a_s) I + (beta_t pi_t - (a_t/a_s) beta_s pi_s) 1^T."""
    a_t, a_s = obj.step_alphas(t, s)
    r = a_t / a_s
    col = (1 - a_t) * obj.noise_dist(a_t, V + 1) - r * (1 - a_s) * obj.noise_dist(a_s, V + 1)
    return r * torch.eye(V + 1, dtype=torch.float64) + col[None, :]


@pytest.mark.parametrize("p_u", [0.0, 0.3, 0.8, 1.0])
def test_posterior_is_bayes_rule_from_transition_matrices(p_u):
    obj = hybrid(p_u, schedule="cosine")
    for t, s in [(0.9, 0.5), (0.3, 0.29), (0.99, 0.01), (0.5, 0.0)]:
        Q = transition(obj, t, s)
        assert (Q >= -1e-15).all() and torch.allclose(Q.sum(1), torch.ones(V + 1, dtype=torch.float64))
        qs, qt = obj.marginal_table(s) if s > 0 else torch.eye(V + 1, dtype=torch.float64), obj.marginal_table(t)
        assert torch.allclose(qs @ Q, qt, atol=1e-12)  # the forward process is Markov: q_s Q_{t|s} = q_t
        for x0 in range(V):
            onehot = torch.zeros(V + 1, V + 1, dtype=torch.float64)
            onehot[:, x0] = 1.0
            post = obj.reverse_step(onehot, torch.arange(V + 1), t, s)
            for zt in range(V + 1):
                if qt[x0, zt] == 0:
                    continue
                bayes = Q[:, zt] * qs[x0] / qt[x0, zt]
                assert torch.allclose(post[zt], bayes, atol=1e-12)


@pytest.mark.parametrize("p_u", [0.0, 0.3, 0.8])
def test_bound_of_the_leave_one_out_posterior_is_tight(p_u):
    joint = random_joint(V, 3, seed=1)
    obj = hybrid(p_u, eps=1e-6)
    x = (2, 0, 1)
    nll = -math.log(float(joint[x]))
    tight = obj.exact_nelbo(oracle(obj, joint, leave_out=True, n_states=V + 1), torch.tensor(x), nodes=200)
    assert abs(tight - nll) < 1e-4, (tight, nll)
    if p_u > 0:  # at p_u = 0 a mask carries no evidence about its own token: both posteriors coincide
        loose = obj.exact_nelbo(oracle(obj, joint, leave_out=False, n_states=V + 1), torch.tensor(x), nodes=200)
        assert loose > nll + 1e-3, (loose, nll)


def test_uniform_frac_is_validated():
    with pytest.raises(ValueError, match="uniform_frac"):
        hybrid(1.5)
