"""Discrete flow matching (model/objectives/dfm.py): with SUBS and kappa = alpha, s = 1 - t the generalised KL is
the masked-diffusion loss; the Euler jump solver with the oracle posterior samples the joint; the `elbo` bound is
flow_matching's estimate_likelihood (draw for draw, in law and in expectation) and is tight for the mask source."""

import itertools
import math

import numpy as np
import pytest
import torch

from model.objectives import DiffusionConfig, build_objective
from model.objectives.base import EvalDraw
from model.objectives.dfm import generalized_kl
from model.sample import Noise
from tests.obj_oracles import (TableNet, chi_square_p, log_table, posterior, random_joint,
                               soft_posterior, states)

V = 3


def dfm(source="mask", **kw):
    return build_objective(DiffusionConfig(objective="dfm", source=source, **kw), mask_id=V, vocab_size=V + 1)


def test_generalized_kl_with_subs_is_the_masked_diffusion_loss():
    """Same step draw: DFM's mask-source path at s = 1 - t masks exactly where mdm masks (kappa = alpha = 1 - t),
    and with SUBS logits (mask -inf, unmasked positions copied) the generalised KL is w(t) CE at masked
    positions and 0 elsewhere, w = kappa' / (1 - kappa) = 1 / t = mdm's weight."""
    B, L = 6, 9
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (B, L), generator=g)
    obj, mdm = dfm(), build_objective(DiffusionConfig(objective="mdm"), mask_id=V, vocab_size=V + 1)
    noise = obj.draw(3, 7, B, L)
    nd, nm = obj.noise(x0, noise), mdm.noise(x0, noise)
    assert torch.equal(nd.xt, nm.xt) and torch.allclose(nd.t, nm.t)
    logits = torch.randn(B, L, V + 1, generator=g, dtype=torch.float64)
    logits[..., V] = float("-inf")
    visible = nd.xt != V
    copy = torch.full_like(logits, float("-inf")).scatter(-1, nd.xt.clamp(max=V - 1)[..., None], 0.0)
    logits = torch.where(visible[..., None], copy, logits)
    kap, dkap = obj.kappa(1.0 - nd.t.double())
    w = (dkap / (1 - kap))[:, None].expand(B, L).reshape(-1)
    ours = generalized_kl(logits.reshape(-1, V + 1), nd.xt.reshape(-1), x0.reshape(-1), w).view(B, L)
    ce = torch.nn.functional.cross_entropy(logits[nm.at], x0[nm.at], reduction="none")
    assert torch.allclose(ours[visible], torch.zeros(1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ours[nm.at], nm.weights.double() * ce, rtol=1e-6)  # mdm's weights are float32
    assert torch.allclose(ours[nm.at], (1.0 / nd.t.double())[:, None].expand(B, L)[nm.at] * ce, rtol=1e-12)


def test_cross_entropy_loss_counts_every_position():
    obj = dfm(dfm_loss="cross_entropy")
    logits = torch.randn(5, V + 1, dtype=torch.float64)
    x1 = torch.tensor([0, 1, 2, 0, 1])
    got = obj.token_loss(logits, torch.full((5,), V), x1, torch.zeros(5), torch.ones(5), "cross_entropy")
    assert torch.allclose(got, torch.nn.functional.cross_entropy(logits, x1, reduction="none"))


def test_euler_solver_with_oracle_matches_joint():
    """Mask source, L = 3: the oracle p_{1|s}(x^i | x_s) is the exact posterior of each position given the
    visible tokens (time-independent for the mask source); 400 Euler steps, 20,000 draws, chi-square."""
    L, B = 3, 20_000
    joint = random_joint(V, L, seed=1)
    net = TableNet(V, L, log_table(lambda z: posterior(joint, z, V)))
    out = dfm().generate(net, torch.zeros(B, 0, dtype=torch.long), None, gen_length=L, steps=400, temperature=1.0,
                         noise=Noise(torch.Generator().manual_seed(2), B, "cpu"))
    assert chi_square_p(out, joint) > 1e-3


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="diffusion.source"):
        build_objective(DiffusionConfig(objective="dfm", source="gauss"), mask_id=V, vocab_size=V + 1)
    with pytest.raises(ValueError, match="dfm_loss"):
        dfm(dfm_loss="mse")
    with pytest.raises(ValueError, match="eps"):
        dfm().eval_draw("elbo", seed=0, seq=0, sample=0, samples=1, maskable=torch.ones(2, dtype=torch.bool),
                        eps=1.0, group=32)


# ------------------------------------------------------------------------------------------------------------
# The bound against flow_matching's examples/text/logic/evaluate.py::estimate_likelihood, re-implemented here in
# plain torch from reading it: the linear path k = kappa whatever the training scheduler; per sequence the grid
# linspace(0, 1, n + 1)[:-1] plus one uniform shift, mod 1, times (1 - 1e-3), the shifted grid carried over to
# the next batch (shifts compound; the expectation does not change); per grid point a fresh source draw x_0 and
# x_k = x_0 where rand < 1 - k else x_1; the model at the training path's time kappa^{-1}(k) = k^(1/n); the
# generalised KL with kappa = k (weight 1/(1 - k)) summed, over the number of summed elements.
# Networks here take this project's t = 1 - s.

LIB_EPS = 1e-3
N_EXP = 2.0  # kappa = s^2: the library's model is queried at s = sqrt(k), so a wrong time map would show
L3 = 3


def lib_gkl(logits, x1, xt, k):
    """(R, L) the library's per-token generalised KL on the linear path at k (R,)."""
    logp = torch.log_softmax(logits.double(), -1)
    p_xt = logp.gather(-1, xt[..., None])[..., 0].exp()
    lp_x1 = logp.gather(-1, x1[..., None])[..., 0]
    same = (xt == x1).double()
    return -(p_xt - same + (1 - same) * torch.where(xt == x1, 0.0, lp_x1)) / (1 - k)[:, None]


def lib_logits(net, xt, k, source):
    """The model at s = kappa^{-1}(k); the library's uniform-source model has the V real outputs only."""
    out = net(xt, t=(1 - k ** (1 / N_EXP)).float())
    return out[..., :V] if source == "uniform" else out


def library_estimate(net, x1, source, n_disc, batch_size, gen):
    """(N,) per sequence: estimate_likelihood's sum over its grid column / n_disc (nats per sequence)."""
    grid = torch.linspace(0, 1, n_disc + 1, dtype=torch.float64)[:-1, None].repeat(1, batch_size)
    out = []
    for x in x1.split(batch_size):
        grid = (grid + torch.rand(1, batch_size, generator=gen, dtype=torch.float64)) % 1 * (1 - LIB_EPS)
        tot = torch.zeros(len(x), dtype=torch.float64)
        for k in grid[:, :len(x)]:
            x0 = torch.full_like(x, V) if source == "mask" else torch.randint(0, V, x.shape, generator=gen)
            xt = torch.where(torch.rand(x.shape, generator=gen, dtype=torch.float64) < (1 - k)[:, None], x0, x)
            tot += lib_gkl(lib_logits(net, xt, k, source), x, xt, k).sum(1)
        out.append(tot / n_disc)
    return torch.cat(out)


def source_outcomes(source, L):
    """Every (x_0, source-coin) outcome of one grid point: x_0 (C, L), coins (C, L) (1: x_k keeps x_0) and
    the probability of x_0 (C,)."""
    x0s = [(V,) * L] if source == "mask" else list(itertools.product(range(V), repeat=L))
    combos = [(a, c) for a in x0s for c in itertools.product((0, 1), repeat=L)]
    x0 = torch.tensor([a for a, _ in combos])
    coins = torch.tensor([c for _, c in combos])
    return x0, coins, torch.full((len(combos),), 1.0 / len(x0s), dtype=torch.float64)


def library_expectation(net, x1, source, eps=LIB_EPS, nodes=48):
    """(N,) the exact expectation of library_estimate per sequence: k ~ U[0, 1 - eps) by Gauss-Legendre in
    u = -log(1 - k) (dk = (1 - k) du takes out the generalised KL's 1/(1 - k)), x_0 and the coins enumerated
    and summed per distinct x_k. A tiny eps: the ELBO integral over [0, 1]."""
    N, L = x1.shape
    x0, coins, p0 = source_outcomes(source, L)
    xt = torch.where(coins[None].bool(), x0[None], x1[:, None])  # (N, C, L)
    pats, which = torch.unique(xt.reshape(-1, L), dim=0, return_inverse=True)
    which = which.view(N, -1)
    rows_x1 = x1.repeat_interleave(len(pats), 0)
    rows_xt = pats.repeat(N, 1)
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    top = -math.log(eps)
    total = torch.zeros(N, dtype=torch.float64)
    for xi, wi in zip(xs, ws):
        u = 0.5 * top * (xi + 1)
        k = -math.expm1(-u)
        kept = coins.sum(1).double()
        prob = p0 * (1 - k) ** kept * k ** (L - kept)  # (C,)
        weight = torch.zeros(N, len(pats), dtype=torch.float64).scatter_add_(1, which, prob.expand(N, -1))
        kk = torch.full((len(rows_xt),), k, dtype=torch.float64)
        loss = lib_gkl(lib_logits(net, rows_xt, kk, source), rows_x1, rows_xt, kk).sum(1).view(N, -1)
        loss = torch.where(weight > 0, loss, 0.0)  # draws that cannot occur (the oracle has no posterior there)
        total += 0.5 * top * wi * (1 - k) / (1 - eps) * (weight * loss).sum(1)
    return total


def net_output(out, logits_at, row_loss):
    """What model/ networks return: the logits at `logits_at`, or row_loss of the flattened logits."""
    if logits_at is not None:
        out = out[logits_at]
    elif row_loss is not None:
        out = out.reshape(-1, out.shape[-1])
    return row_loss(out, slice(0, out.shape[0])) if row_loss is not None else out


class DFMOracle(torch.nn.Module):
    """p_{1|s}(x^i | x_s): the full posterior under the joint (own position included: the generalised KL's
    minimiser) given x_s on the mixture path with kappa = (1 - t)^N_EXP, per row; the mask's logit is -inf."""

    def __init__(self, joint, source):
        super().__init__()
        self.joint, self.source = joint, source
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, xt, t=None, logits_at=None, row_loss=None, **_):
        kap = ((1 - t.double()) ** N_EXP)[:, None, None]
        same = (xt[..., None] == torch.arange(V)).double()
        rest = (xt == V)[..., None].double() if self.source == "mask" else torch.full_like(same, 1.0 / V)
        p = soft_posterior(self.joint, kap * same + (1 - kap) * rest, leave_out=False)
        out = torch.full((*xt.shape, V + 1), float("-inf"), dtype=torch.float64)
        out[..., :V] = p.clamp_min(1e-300).log()
        return net_output(out, logits_at, row_loss)


class RandomNet(torch.nn.Module):
    """Fixed random logits over V + 1 ids that depend on the whole input and, strongly and non-linearly, on t."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = (torch.randn((V + 1) ** L3, L3, V + 1, generator=g, dtype=torch.float64) for _ in "ab")
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, xt, t=None, logits_at=None, row_loss=None, **_):
        idx = (xt * (V + 1) ** torch.arange(L3 - 1, -1, -1)).sum(-1)
        return net_output(self.a[idx] + 2 * torch.cos(6 * t.double())[:, None, None] * self.b[idx], logits_at,
                          row_loss)


JOINT = torch.softmax(1.5 * torch.randn(V ** L3, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
                      0).view((V,) * L3)  # peaked: the tokens depend on each other, so f(k) varies with k
ALL_X = states(V, L3)


def make_net(kind, source):
    return DFMOracle(JOINT, source) if kind == "oracle" else RandomNet(5)


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("kind", ["oracle", "random"])
def test_eval_sums_is_the_library_summand_draw_for_draw(source, kind):
    """Each x_k the library can draw, handed to eval_sums as an eval draw (pos 0: noised, tok: the source
    token), gives estimate_likelihood's summand, at levels from k = 0 to the grid's top."""
    obj, net = dfm(source, kappa_exponent=N_EXP), make_net(kind, source)
    x1 = torch.tensor([2, 0, 1])
    for k in (0.0, 0.137, 0.5, 0.9, 1 - LIB_EPS):
        x0, coins, _ = source_outcomes(source, L3)
        if k == 0.0:  # only the all-source draws can occur (the oracle has no posterior for the others)
            x0, coins = x0[coins.all(1)], coins[coins.all(1)]
        draws = [EvalDraw({"k": k, "pos": torch.where(c.bool(), 0.0, 1.5), "tok": (a.double() + 0.5) / V,
                           "scored": torch.ones(L3, dtype=torch.bool)}, 1.0) for a, c in zip(x0, coins)]
        X1 = x1.expand(len(draws), L3)
        ours = obj.eval_sums(net, X1, draws, keep=torch.ones_like(X1, dtype=torch.bool))
        xt = torch.where(coins.bool(), x0, X1)
        kk = torch.full((len(xt),), k, dtype=torch.float64)
        lib = lib_gkl(lib_logits(net, xt, kk, source), X1, xt, kk).sum(1)
        assert torch.allclose(ours, lib, rtol=1e-9, atol=1e-12), (k, ours, lib)


def test_eval_draws_are_the_library_grid():
    """eval_draw's noise has estimate_likelihood's law: per sequence the K levels are (1 - 1e-3) ((u + j/K) mod
    1), j = 0..K-1, with u uniform and independent between sequences (Kolmogorov-Smirnov), and the per-position
    uniforms that decide noising (rand < 1 - k) and the source token are uniform."""
    from scipy.stats import kstest
    obj, K = dfm("uniform", kappa_exponent=N_EXP), 16
    shifts, pos, tok = [], [], []
    for seq in range(200):
        draws = [obj.eval_draw("elbo", seed=5, seq=seq, sample=j, samples=K, maskable=torch.ones(L3, dtype=torch.bool),
                               eps=LIB_EPS, group=32) for j in range(K)]
        grid = torch.tensor([d.noise["k"] for d in draws], dtype=torch.float64) / (1 - LIB_EPS)
        u = float(grid[0])
        assert torch.allclose(grid, (u + torch.arange(K, dtype=torch.float64) / K) % 1, rtol=0, atol=1e-12)
        shifts.append(u)
        pos += [d.noise["pos"] for d in draws]
        tok += [d.noise["tok"] for d in draws]
    assert kstest(shifts, "uniform").pvalue > 1e-3
    for field in (torch.cat(pos), torch.cat(tok)):
        assert kstest(field.numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_elbo_estimator_expectation_is_estimate_likelihood(source):
    """End to end with the oracle: our `elbo` estimator (eval.elbo, 32 stratified samples per sequence) and
    the library's procedure (32 grid points, two batches with compounding shifts), each run on every sequence
    of V = 3, L = 3 twice, agree with the library's exact expectation within 4.5 standard errors; the
    objective's exact_nelbo is that expectation. (Measured: a grid in s instead of k is 10 standard errors
    off for the uniform source; noising with probability (1 - k)^(1/1.3) is 6 off for the mask source.)"""
    from eval.elbo import sequence_samples
    obj, net = dfm(source, kappa_exponent=N_EXP), make_net("oracle", source)
    x1 = ALL_X.repeat(2, 1)
    exact = library_expectation(net, ALL_X, source).repeat(2)
    cond = lambda Z, t: net(Z, t=torch.full((len(Z),), t))  # noqa: E731
    assert abs(obj.exact_nelbo(cond, ALL_X[13], nodes=200) - float(exact[13])) < 1e-8
    ours = sequence_samples(net, x1, method="elbo", samples=32, seed=3, mask_id=V, objective=obj,
                            batch_size=256).mean(1)
    lib = library_estimate(net, x1, source, n_disc=32, batch_size=27, gen=torch.Generator().manual_seed(6))
    for est in (ours, lib):
        d = est - exact
        se = float(d.std() / math.sqrt(len(d)))
        assert abs(float(d.mean())) < 4.5 * se, (float(d.mean()), se)


def test_oracle_bound_is_tight_for_the_mask_source_only():
    """The full-posterior oracle: with the mask source the ELBO integral over [0, 1] is -log p(x) for every x,
    and what the library's grid estimates (over [0, 1 - 1e-3), rescaled) is within the cut tail of it (5e-3
    here). With the uniform source it is a bound but a loose one, 0.35 to 1.77 nats per sequence here (0.66 on
    average over the data, whose entropy is 2.02): the mixture of the conditional paths is not Markov (a seen
    jump tells x_1^i; x_k alone does not say whether a token is still the source's), so the oracle's Markov
    process differs from it as a path law. A random model's library value, averaged over the data, exceeds the
    entropy."""
    nll = -torch.log(JOINT.reshape(-1))
    mask = library_expectation(make_net("oracle", "mask"), ALL_X, "mask", eps=1e-12)
    assert torch.allclose(mask, nll, rtol=0, atol=1e-9), (mask - nll).abs().max()
    cut = library_expectation(make_net("oracle", "mask"), ALL_X, "mask")
    assert (cut - nll).abs().max() < 1e-2
    uni = library_expectation(make_net("oracle", "uniform"), ALL_X, "uniform", eps=1e-12)
    assert bool((uni > nll + 0.3).all()), (uni - nll).min()
    p = JOINT.reshape(-1)
    for source in ("mask", "uniform"):
        rnd = library_expectation(make_net("random", source), ALL_X, source)
        assert float((p * rnd).sum()) > float((p * nll).sum()) + 0.1


# ------------------------------------------------------------------------------------------------------------
# diffusion.dfm_carry_over (mask source): SUBS instead of the library's head. An unmasked token is copied, so
# its loss is 0 and the network is asked for the masked positions only.

class CarryOver(torch.nn.Module):
    """What carry-over makes of `net`'s logits, applied outside the objective: one-hot(x_s) where x_s is not
    the mask, the mask logit -inf elsewhere."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, xt, t=None, logits_at=None, row_loss=None, **_):
        out = self.net(xt, t=t).double().clone()
        out[..., V] = float("-inf")
        copy = torch.full_like(out, float("-inf")).scatter(-1, xt.clamp(max=V - 1)[..., None], 0.0)
        return net_output(torch.where((xt != V)[..., None], copy, out), logits_at, row_loss)


def test_carry_over_eval_sums_are_the_plain_estimator_on_the_carried_over_head():
    """Draw for draw, at every level: carry-over's eval_sums (the head asked for masked positions only) equals
    the library's summand computed on the net with carry-over applied by hand, and is below the plain head's
    summand (-p(mask) >= log(1 - p(mask)), and w (1 - p(x_s | x_s)) >= 0 at unmasked tokens)."""
    net = make_net("random", "mask")
    carry, plain = dfm(kappa_exponent=N_EXP, dfm_carry_over=True), dfm(kappa_exponent=N_EXP)
    x1 = torch.tensor([2, 0, 1])
    x0, coins, _ = source_outcomes("mask", L3)
    for k in (0.0, 0.137, 0.5, 0.9, 1 - LIB_EPS):
        draws = [EvalDraw({"k": k, "pos": torch.where(c.bool(), 0.0, 1.5), "tok": (a.double() + 0.5) / V,
                           "scored": torch.ones(L3, dtype=torch.bool)}, 1.0) for a, c in zip(x0, coins)]
        X1 = x1.expand(len(draws), L3)
        keep = torch.ones_like(X1, dtype=torch.bool)
        ours = carry.eval_sums(net, X1, draws, keep=keep)
        by_hand = plain.eval_sums(CarryOver(net), X1, draws, keep=keep)
        assert torch.allclose(ours, by_hand, rtol=1e-12, atol=1e-12), (k, ours, by_hand)
        assert bool((ours < plain.eval_sums(net, X1, draws, keep=keep)).all())


def test_carry_over_bound_is_tight_with_the_oracle():
    """The oracle's own-position posterior already copies unmasked tokens, so carry-over leaves its bound at
    -log p(x); a random net's bound under carry-over is below its plain bound for every x, and above the
    entropy on average."""
    cond_of = lambda net: (lambda Z, t: net(Z, t=torch.full((len(Z),), t)))  # noqa: E731
    carry, plain = dfm(kappa_exponent=N_EXP, dfm_carry_over=True), dfm(kappa_exponent=N_EXP)
    nll = -torch.log(JOINT.reshape(-1))
    oracle, rnd = make_net("oracle", "mask"), make_net("random", "mask")
    for i in (0, 13, 26):
        assert carry.exact_nelbo(cond_of(oracle), ALL_X[i], nodes=200, eps=1e-12) == pytest.approx(
            float(nll[i]), abs=1e-8)
    got = torch.tensor([carry.exact_nelbo(cond_of(rnd), x, nodes=48) for x in ALL_X], dtype=torch.float64)
    ref = torch.tensor([plain.exact_nelbo(cond_of(rnd), x, nodes=48) for x in ALL_X], dtype=torch.float64)
    assert bool((got < ref).all())
    p = JOINT.reshape(-1)
    assert float((p * got).sum()) > float((p * nll).sum()) + 0.1


def test_carry_over_training_loss_is_subs_mdm_through_the_transformer():
    """kappa = s = 1 - t: on the same step draw (mdm's masks and t) the loss is mdm's 1/t-weighted CE at the
    masked positions with the mask logit removed (SUBS, as mdm's bound), value and gradient, through a real
    time-conditioned network; the head is counted at mdm's masked fraction."""
    from model.config import ModelConfig
    from model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, ffn_dim=64, vocab_size=V + 1, mask_id=V,
                                    max_seq_len=16, time_conditioning="adaln")).double()
    B, L = 6, 12
    x0 = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    carry, mdm = dfm(dfm_carry_over=True), build_objective(DiffusionConfig(objective="mdm"), mask_id=V,
                                                           vocab_size=V + 1)
    noise = carry.draw(3, 7, B, L).rows(slice(0, B))
    nm = mdm.noise(x0, noise)

    def subs_mdm():
        logits = model(nm.xt, t=nm.t).double()
        logits[..., V] = float("-inf")
        ce = torch.nn.functional.cross_entropy(logits[nm.at], x0[nm.at], reduction="none")
        return (ce / nm.t.double()[:, None].expand(B, L)[nm.at]).sum() / (B * L)
    got = []
    for fn in (lambda: carry.micro_loss(model, x0, noise)[0], subs_mdm):
        model.zero_grad()
        loss = fn()
        loss.backward()
        got.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert got[0][0] == pytest.approx(got[1][0], rel=1e-6)  # the network's row loss runs in fp32
    for a, b in zip(got[0][1], got[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)
    assert carry.logit_fraction(128) == pytest.approx(mdm.logit_fraction(128), rel=1e-4)
    assert dfm().logit_fraction(128) == 1.0


def test_carry_over_solver_copies_unmasked_tokens():
    """An oracle at the masked positions with noise at the unmasked ones: with carry-over the Euler solver
    still samples the joint (chi-square); without it the same net's jumps rewrite unmasked tokens and the
    test rejects it (power)."""
    L, B = 3, 20_000
    joint = random_joint(V, L, seed=1)

    def probs(z):
        p = posterior(joint, z, V)
        return torch.where((z != V)[:, None], torch.full_like(p, 1.0 / V), p)
    net = TableNet(V, L, log_table(probs))
    kw = dict(gen_length=L, steps=400, temperature=1.0)
    start = torch.zeros(B, 0, dtype=torch.long)
    out = dfm(dfm_carry_over=True).generate(net, start, None, noise=Noise(torch.Generator().manual_seed(2), B,
                                                                          "cpu"), **kw)
    assert chi_square_p(out, joint) > 1e-3
    bad = dfm().generate(net, start, None, noise=Noise(torch.Generator().manual_seed(2), B, "cpu"), **kw)
    assert chi_square_p(bad, joint) < 1e-6


def test_carry_over_needs_the_mask_source():
    with pytest.raises(ValueError, match="dfm_carry_over"):
        dfm("uniform", dfm_carry_over=True)
