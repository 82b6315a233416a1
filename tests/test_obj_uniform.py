"""Uniform-state diffusion (model/objectives/uniform.py): DUO's closed form against UDLM's formula, the
posterior against Bayes' rule from explicit transition matrices, and tightness of the bound on an exact joint."""
import math

import pytest
import torch

from model.objectives import DiffusionConfig, build_objective
from model.objectives.uniform import duo_nll
from tests.obj_oracles import random_joint, soft_posterior

V, MASK = 3, 3  # three real tokens, the mask id after them (never used by uniform noise)


def udlm_nll(logits, z, x, alpha, dalpha):
    """UDLM's per-token formula (discrete-diffusion-guidance `_forward_pass_diffusion`, uniform branch),
    written directly from its definition, no mask column (N = V)."""
    N = logits.shape[-1]
    x_theta = logits.softmax(-1)
    a = alpha[:, None]
    xbar = N * a * torch.nn.functional.one_hot(x, N).double() + (1 - a)
    xbar_theta = N * a * x_theta + (1 - a)
    xi, xti = xbar.gather(-1, z[:, None]), xbar_theta.gather(-1, z[:, None])
    inner = (xbar / xi) * torch.log((xti * xbar) / (xbar_theta * xi))
    return dalpha / (N * alpha) * (N / xi[:, 0] - N / xti[:, 0] - inner.sum(-1))


@pytest.mark.parametrize("same", [True, False])
def test_duo_closed_form_equals_udlm_formula(same):
    g = torch.Generator().manual_seed(0)
    n, N = 400, 7
    logits = torch.randn(n, N, generator=g, dtype=torch.float64) * 2
    x = torch.randint(0, N, (n,), generator=g)
    z = x.clone() if same else (x + torch.randint(1, N, (n,), generator=g)) % N
    alpha = 0.01 + 0.98 * torch.rand(n, generator=g, dtype=torch.float64)
    dalpha = -torch.rand(n, generator=g, dtype=torch.float64) - 0.1
    ours = duo_nll(logits, z, x, alpha, dalpha, mask_id=None)
    ref = udlm_nll(logits, z, x, alpha, dalpha)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-11)
    assert (ours >= -1e-12).all()  # a KL-type term: never negative
    # A mask column at -inf is a head over the real tokens only.
    with_mask = torch.cat([logits[:, :3], torch.randn(n, 1, dtype=torch.float64), logits[:, 3:]], 1)
    shift = lambda v: v + (v >= 3).long()  # noqa: E731
    again = duo_nll(with_mask, shift(z), shift(x), alpha, dalpha, mask_id=3)
    assert torch.allclose(again, ours, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mask", [None, 3])
def test_duo_closed_form_gradient_is_the_derivative_of_its_value(mask):
    """duo_nll's written-out gradient (it keeps no autograd graph) against finite differences in float64, for
    z = x and z != x rows, with and without a mask column (whose logit gets no gradient)."""
    g = torch.Generator().manual_seed(1)
    n, V = 12, 7
    N = V - (mask is not None)
    real = lambda r: r + (r >= mask).long() if mask is not None else r  # noqa: E731
    x = real(torch.randint(0, N, (n,), generator=g))
    z = x.clone()
    z[::2] = real(torch.randint(0, N, (n,), generator=g))[::2]
    assert bool((z != x).any()) and bool((z == x).any())
    a = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    da = -torch.rand(n, generator=g, dtype=torch.float64) - 0.1
    logits = (torch.randn(n, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda lg: duo_nll(lg, z, x, a, da, mask_id=mask), (logits,))
    if mask is not None:
        (grad,) = torch.autograd.grad(duo_nll(logits, z, x, a, da, mask_id=mask).sum(), logits)
        assert float(grad[:, mask].abs().max()) == 0.0


@pytest.mark.parametrize("mask", [None, 3])
def test_mixture_log_stats_values_and_gradient(mask):
    """The shared statistics of uniform and hybrid losses: S and log q at chosen ids equal the dense formula,
    and the written-out gradient passes gradcheck in float64, including rows with const = 0 (pure masking,
    where q = scale p and the values at the ids are taken in log space)."""
    from model.objectives.uniform import mixture_log_stats
    g = torch.Generator().manual_seed(2)
    n, V = 10, 7
    N = V - (mask is not None)
    real = lambda r: r + (r >= mask).long() if mask is not None else r  # noqa: E731
    idx = real(torch.randint(0, N, (n, 2), generator=g))
    scale = 0.05 + torch.rand(n, generator=g, dtype=torch.float64)
    const = torch.rand(n, generator=g, dtype=torch.float64) * 0.3
    const[::3] = 0.0
    logits = (torch.randn(n, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    S, lg = mixture_log_stats(logits, scale, const, idx, mask_id=mask)
    masked = logits.detach().clone()
    if mask is not None:
        masked[:, mask] = float("-inf")
    q = scale[:, None] * masked.softmax(-1) + const[:, None]
    keep = torch.ones(V, dtype=torch.bool)
    if mask is not None:
        keep[mask] = False
    assert torch.allclose(S, q[:, keep].log().sum(-1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(lg, q.gather(-1, idx).log(), rtol=1e-12, atol=1e-12)
    coef = torch.randn(n, 3, generator=g, dtype=torch.float64)

    def combo(lgt):
        s_, l_ = mixture_log_stats(lgt, scale, const, idx, mask_id=mask)
        return coef[:, 0] * s_ + (coef[:, 1:] * l_).sum(-1)
    assert torch.autograd.gradcheck(combo, (logits,))
    if mask is not None:
        (grad,) = torch.autograd.grad(combo(logits).sum(), logits)
        assert float(grad[:, mask].abs().max()) == 0.0
    with pytest.raises(ValueError, match="logits only"):
        mixture_log_stats(logits, scale.clone().requires_grad_(), const, idx, mask_id=mask)


def objective(eps=1e-3, schedule="linear"):
    return build_objective(DiffusionConfig(objective="uniform", eps=eps, schedule=schedule), mask_id=MASK,
                           vocab_size=V + 1)


def transition(obj, t, s):
    """Q[y, z] = q(z_t = z | z_s = y) over the real tokens, built as (a_t/a_s) I + (1 - a_t/a_s) 11^T / N."""
    a_t, a_s = obj.step_alphas(t, s)
    r = a_t / a_s
    return r * torch.eye(V, dtype=torch.float64) + (1 - r) / V


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_is_bayes_rule_from_transition_matrices(schedule):
    obj = objective(schedule=schedule)
    for t, s in [(0.9, 0.5), (0.3, 0.29), (0.99, 0.01), (0.5, 0.0)]:
        a_t, a_s = obj.step_alphas(t, s)
        Q = transition(obj, t, s)
        qs = a_s * torch.eye(V, dtype=torch.float64) + (1 - a_s) / V  # q_s(. | x0) rows
        qt = qs @ Q
        assert torch.allclose(qt, a_t * torch.eye(V, dtype=torch.float64) + (1 - a_t) / V, atol=1e-12)
        for x0 in range(V):
            onehot = torch.zeros(V, V + 1, dtype=torch.float64)
            onehot[:, x0] = 1.0
            post = obj.reverse_step(onehot, torch.arange(V), t, s)
            for zt in range(V):
                bayes = Q[:, zt] * qs[x0] / qt[x0, zt]
                assert torch.allclose(post[zt, :V], bayes, atol=1e-12)
                assert post[zt, MASK] == 0 and abs(float(post[zt].sum()) - 1) < 1e-12


def oracle(obj, joint, leave_out, n_states=V):
    """cond_logprobs(Z (K, L), t) of the exact (leave-one-out or full) posterior under the soft evidence of
    the objective's forward process (obj.marginal), for every noised sequence in Z at once."""
    def cond(Z, t):
        K, L = Z.shape
        q = obj.marginal_table(t)[:V, :n_states].T  # q[z, v] = q_t(z | x = v)
        p = soft_posterior(joint, q[Z], leave_out)
        out = torch.full((K, L, n_states if n_states > V else V + 1), float("-inf"), dtype=torch.float64)
        out[..., :V] = p.clamp_min(1e-300).log()
        return out
    return cond


@pytest.mark.parametrize("x", [(2, 0, 1)])
def test_bound_of_the_leave_one_out_posterior_is_tight(x):
    joint = random_joint(V, 3, seed=1)
    obj = objective(eps=1e-6)
    x0 = torch.tensor(x)
    nll = -math.log(float(joint[x]))
    tight = obj.exact_nelbo(oracle(obj, joint, leave_out=True), x0, nodes=200)
    assert abs(tight - nll) < 1e-4, (tight, nll)
    loose = obj.exact_nelbo(oracle(obj, joint, leave_out=False), x0, nodes=200)
    assert loose > nll + 1e-3, (loose, nll)


def test_prior_term_is_reported_and_matches_duo():
    obj = objective(schedule="cosine")  # MD4's squeeze leaves alpha(1) = 1e-4
    a = 1e-4
    duo = (a + (1 - a) / V) * math.log((V - 1) * a + 1) + (1 - 1 / V) * (1 - a) * math.log(1 - a)
    assert obj.prior_nats() == pytest.approx(duo, rel=1e-9)
    assert objective().prior_nats() < 1e-5  # linear: alpha(1) = 0 (floored at 1e-6)
