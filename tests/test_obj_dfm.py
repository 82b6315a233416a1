"""Discrete flow matching (model/objectives/dfm.py): with SUBS and kappa = alpha, s = 1 - t the generalised KL is
the masked-diffusion loss; the Euler jump solver with the oracle posterior samples the joint."""

import pytest
import torch

from model.objectives import DiffusionConfig, build_objective
from model.objectives.dfm import generalized_kl
from model.sample import Noise
from tests.obj_oracles import TableNet, chi_square_p, log_table, posterior, random_joint

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
