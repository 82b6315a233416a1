"""D3PM (model/objectives/d3pm.py): transition matrices against their closed-form products, the posterior against
Bayes' rule, the exact ELBO on one token, the discrete bound against the continuous-time masked bound, the
time-step draw, and the ancestral sampler."""
import itertools
import math

import pytest
import torch

from model.objectives import DiffusionConfig, build_objective
from model.objectives.d3pm import posterior
from model.sample import Noise
from tests.obj_oracles import TableNet, chi_square_p, posterior_table, random_joint

V = 3


def d3pm(graph="absorb", T=10, schedule="standard", mask_id=V, vocab=V + 1, **kw):
    return build_objective(DiffusionConfig(objective="d3pm", graph=graph, d3pm_steps=T, d3pm_schedule=schedule, **kw),
                           mask_id=mask_id, vocab_size=vocab)


def step_matrix(obj, t):
    """Explicit Q_t[i, j] = q(x_t = j | x_{t-1} = i) over the whole vocabulary (the mask row: absorbing)."""
    Vv, m, b = obj.vocab_size, obj.mask_id, float(obj.beta[t])
    real = [i for i in range(Vv) if i != m]
    Q = torch.zeros(Vv, Vv, dtype=torch.float64)
    for i in real:
        Q[i, i] += 1 - b
        if obj.graph == "absorb":
            Q[i, m] += b
        else:
            for j in real:
                Q[i, j] += b / len(real)
    Q[m, m] = 1.0
    return Q


def cumulative(obj, t):
    Vv, m, ab = obj.vocab_size, obj.mask_id, float(obj.abar[t])
    real = [i for i in range(Vv) if i != m]
    Q = torch.zeros(Vv, Vv, dtype=torch.float64)
    for i in real:
        Q[i, i] += ab
        if obj.graph == "absorb":
            Q[i, m] += 1 - ab
        else:
            for j in real:
                Q[i, j] += (1 - ab) / len(real)
    Q[m, m] = 1.0
    return Q


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("schedule", ["standard", "linear", "cosine"])
def test_products_equal_closed_form(graph, schedule):
    obj = d3pm(graph, T=10, schedule=schedule, mask_id=1, vocab=5)
    prod = torch.eye(5, dtype=torch.float64)
    for t in range(1, 11):
        Q = step_matrix(obj, t)
        assert torch.allclose(Q.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-12)
        prod = prod @ Q
        assert torch.allclose(prod, cumulative(obj, t), atol=1e-12)
    if graph == "absorb":
        assert float(obj.abar[-1]) == 0.0  # the last step masks everything
    if schedule == "standard":
        assert torch.allclose(obj.abar, 1 - torch.arange(11, dtype=torch.float64) / 10, atol=1e-12)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_posterior_is_bayes(graph):
    obj = d3pm(graph, T=10, schedule="cosine", mask_id=1, vocab=5)
    real = [0, 2, 3, 4]
    for t, s in [(1, 0), (5, 4), (10, 9), (9, 3)]:
        Qts = torch.eye(5, dtype=torch.float64)
        for k in range(s + 1, t + 1):
            Qts = Qts @ step_matrix(obj, k)
        Qs, Qt = cumulative(obj, s), cumulative(obj, t)
        for x0 in real:
            for z in range(5):
                if Qt[x0, z] == 0:
                    continue
                bayes = Qts[:, z] * Qs[x0, :] / Qt[x0, z]
                ours = posterior(torch.nn.functional.one_hot(torch.tensor([x0]), 5).double(), torch.tensor([z]),
                                 float(obj.abar[s]), float(obj.abar[t]), graph=graph, mask_id=1)[0]
                assert torch.allclose(ours, bayes, atol=1e-12), (t, s, x0, z)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_one_token_elbo_with_oracle_reverse_is_exact(graph):
    """L = 1: p~ = p (the data marginal) makes the product-form reverse the exact reverse of the marginal chain,
    so the full T-term ELBO (+ prior) equals -log p(x) to 1e-10; any other p~ is larger on average."""
    joint = random_joint(V, 1, seed=7)
    obj = d3pm(graph, T=10)
    logp = torch.cat([joint.log(), torch.zeros(1, dtype=torch.float64)])
    other = torch.cat([torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log(), torch.zeros(1, dtype=torch.float64)])
    mean_other, H = 0.0, 0.0
    for x in range(V):
        x0 = torch.tensor([x])
        got = obj.exact_nelbo(lambda Z, t: logp.expand(*Z.shape, V + 1), x0)
        assert abs(got + math.log(float(joint[x]))) < 1e-10
        mean_other += float(joint[x]) * obj.exact_nelbo(lambda Z, t: other.expand(*Z.shape, V + 1), x0)
        H -= float(joint[x]) * math.log(float(joint[x]))
    assert mean_other > H + 1e-3


def test_discrete_bound_decreases_to_continuous_masked_bound():
    """A fixed time-independent model on L = 3 (the exact per-position posterior of a random joint): the
    absorbing D3PM bound at T = 10, 100, 1000 decreases toward the continuous-time masked-diffusion bound
    (mdm.exact_nelbo, t integrated out: -log p(x) for this model), on average over the data."""
    L = 3
    joint = random_joint(V, L, seed=8)
    Z = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))
    table = torch.full((len(Z), L, V + 1), float("-inf"), dtype=torch.float64)
    table[..., :V] = posterior_table(joint, Z, V).clamp_min(1e-300).log()
    base = (V + 1) ** torch.arange(L - 1, -1, -1)

    def cond(Zq, t=None):
        return table[(Zq * base).sum(-1)]
    mdm = build_objective(DiffusionConfig(objective="mdm"), mask_id=V, vocab_size=V + 1)
    xs = list(itertools.product(range(V), repeat=L))
    assert abs(mdm.exact_nelbo(lambda z: cond(z[None])[0], torch.tensor(xs[5])) + math.log(float(joint[xs[5]]))) < 1e-10
    entropy = -float((joint * joint.log()).sum())  # the continuous bound averaged over the data
    vals = [sum(float(joint[x]) * d3pm("absorb", T=T).exact_nelbo(cond, torch.tensor(x)) for x in xs)
            for T in (10, 100, 1000)]
    # measured: 3.14615 > 3.13141 > 3.12991 > 3.12974 (per sequence the factorised model may undercut p_data)
    assert vals[0] > vals[1] > vals[2] > entropy
    assert vals[2] - entropy < 0.05 * (vals[0] - entropy)


def test_time_step_drawn_in_one_to_T():
    obj = d3pm(T=10)
    u = (torch.arange(1000, dtype=torch.float64) + 1) / 1000  # (0, 1]
    t = obj.step_of(u)
    assert t.min() == 1 and t.max() == 10
    assert torch.equal(torch.bincount(t, minlength=11)[1:], torch.full((10,), 100))


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_ancestral_sampler_exact_on_one_token(graph):
    joint = random_joint(V, 1, seed=9)
    obj = d3pm(graph, T=10)
    net = TableNet(V, 1, lambda z: torch.cat([joint.log(), torch.tensor([float("-inf")], dtype=torch.float64)])[None])
    B = 20_000
    out = obj.generate(net, torch.zeros(B, 0, dtype=torch.long), None, gen_length=1, steps=10, temperature=1.0,
                       noise=Noise(torch.Generator().manual_seed(1), B, "cpu"))
    assert chi_square_p(out, joint) > 1e-3


@pytest.mark.parametrize("steps,calls", [(3, 3), (5, 5), (10, 10), (25, 10)])
def test_any_number_of_steps_jumps_on_rounded_times(steps, calls):
    """steps need not divide T: min(steps, T) network calls on round(T - i T / steps); one token's draw stays
    exact (any skip posterior with the oracle p~ samples p)."""
    joint = random_joint(V, 1, seed=9)
    net = TableNet(V, 1, lambda z: torch.cat([joint.log(), torch.tensor([float("-inf")], dtype=torch.float64)])[None])
    B, stats = 20_000, {}
    out = d3pm("absorb", T=10).generate(net, torch.zeros(B, 0, dtype=torch.long), None, gen_length=1, steps=steps,
                                        temperature=1.0, noise=Noise(torch.Generator().manual_seed(2), B, "cpu"),
                                        stats=stats)
    assert stats["forwards"] == calls and not bool((out == V).any())
    assert chi_square_p(out, joint) > 1e-3


def test_full_bound_needs_T_samples():
    obj = d3pm(T=10)
    with pytest.raises(ValueError, match="--samples 10"):
        obj.eval_draw("full", seed=0, seq=0, sample=0, samples=4, maskable=torch.ones(3, dtype=torch.bool),
                      eps=1e-3, group=8)
