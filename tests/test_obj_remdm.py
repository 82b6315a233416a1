"""ReMDM (model/remdm.py): the per-position rules against the reference's formulas, eta = 0 is MDLM's ancestral
step, a perfect model still samples the joint, and batch invariance."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.objectives import DiffusionConfig, build_objective
from model.objectives.config import GenMD4Config
from model.remdm import ReMDMConfig, loop_alphas, nucleus, sigma_for, step_probs, time_grid
from model.sample import generate, row_generators
from tests.obj_oracles import TableNet, chi_square_p, log_table, posterior, random_joint

V, MASK = 3, 3


def reference_rows(p_x0, decoded_token, a_t, a_s, strategy, eta):
    """kuleshov-group/remdm diffusion.py::_ddpm_caching_update, one position: (masked row, decoded row)."""
    if strategy == "cap":
        sigma = min(eta, (1 - a_s) / a_t) if a_t > 0 else eta
    elif strategy == "rescale":
        sigma = eta * (min(1, (1 - a_s) / a_t) if a_t > 0 else 1)
    else:  # mdlm
        q = p_x0 * ((1 - a_t) - (1 - a_s))
        q[MASK] = 1 - a_s
        return q / q.sum(), None
    onehot = torch.zeros(V + 1, dtype=torch.float64)
    onehot[decoded_token] = 1.0
    dec = onehot * (1 - sigma)
    dec[MASK] = sigma
    msk = p_x0 * ((a_s - (1 - sigma) * a_t) / (1 - a_t))
    msk[MASK] = (1 - a_s - sigma * a_t) / (1 - a_t)
    return msk, dec


GRID = [(a_t, a_s) for a_t in (0.0, 0.1, 0.5, 0.9) for a_s in (0.2, 0.6, 0.95, 1.0) if a_s > a_t]


@pytest.mark.parametrize("strategy", ["cap", "rescale"])
def test_rules_equal_the_reference_on_a_grid_and_keep_the_marginal(strategy):
    p = torch.tensor([0.2, 0.5, 0.3, 0.0], dtype=torch.float64)
    for a_t, a_s in GRID:
        for eta in (0.0, 0.01, 0.5, 1.0):
            sigma = sigma_for(strategy, eta, a_t, a_s)
            got = step_probs(torch.stack([p, p]), torch.tensor([MASK, 1]), a_t, a_s, sigma, MASK)
            msk, dec = reference_rows(p, 1, a_t, a_s, strategy, eta)
            torch.testing.assert_close(got[0], msk, rtol=0, atol=1e-12)
            torch.testing.assert_close(got[1], dec, rtol=0, atol=1e-12)
            assert bool((got >= -1e-12).all()) and torch.allclose(got.sum(-1), torch.ones(2, dtype=torch.float64))
            # marginal preservation: z_t ~ q_t(.|x), with a perfect model p = onehot(x): P(z_s = x) = alpha_s
            x = 2
            onehot = torch.zeros(V + 1, dtype=torch.float64)
            onehot[x] = 1.0
            rows = step_probs(torch.stack([onehot, onehot]), torch.tensor([MASK, x]), a_t, a_s, sigma, MASK)
            assert abs(float((1 - a_t) * rows[0, x] + a_t * rows[1, x]) - a_s) < 1e-12


def test_conf_and_loop_follow_the_reference():
    # conf: sigma_l = softmax over decoded positions of psi, times min(1, (1 - alpha_s) / alpha_t)
    p = torch.tensor([[0.2, 0.5, 0.3, 0.0]] * 3, dtype=torch.float64)
    z = torch.tensor([0, MASK, 2])
    psi = torch.tensor([-0.9, float("-inf"), -0.2])
    a_t, a_s = 0.5, 0.6
    eta_l = torch.softmax(psi, 0).double()
    sigma = eta_l * min(1, (1 - a_s) / a_t)
    got = step_probs(p, z, a_t, a_s, sigma, MASK, per_position=True)
    for i in range(3):
        msk, _ = reference_rows(p[i], 0, a_t, a_s, "mdlm", 0.0)
        if int(z[i]) == MASK:
            torch.testing.assert_close(got[i], msk)
        else:
            assert abs(float(got[i, MASK]) - float(sigma[i])) < 1e-12 and abs(float(got[i, z[i]]) - 1 + float(sigma[i])) < 1e-12
    assert float(sigma[2]) > float(sigma[0])  # the less confident token is more likely re-masked
    # loop: the reference's three phases
    cfg = ReMDMConfig(strategy="loop", eta=0.02)
    assert loop_alphas(0.8, 0.7, cfg) == pytest.approx((0.2 * 0.9 / 0.45, 0.3 * 0.9 / 0.45, False)[:2] + (False,))
    assert loop_alphas(0.3, 0.2, cfg) == (0.9, 0.9, True)
    assert loop_alphas(0.04, 0.03, cfg)[:2] == pytest.approx((1 - 0.04 * 0.1 / 0.05, 1 - 0.03 * 0.1 / 0.05))
    assert time_grid(4)[0] == (1.0, 1.0 - (1 - 1e-5) / 4)


def test_nucleus_drops_the_crossing_token():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(nucleus(p, 0.9), torch.tensor([[0.625, 0.375, 0.0]]))
    torch.testing.assert_close(nucleus(p, 0.4), torch.tensor([[1.0, 0.0, 0.0]]))


def test_eta_zero_is_the_mdlm_ancestral_step_for_mdm_and_genmd4():
    mdm = build_objective(DiffusionConfig(), mask_id=MASK)
    g = build_objective(DiffusionConfig(objective="genmd4", genmd4=GenMD4Config(mask_eps=0.0)), mask_id=MASK)
    net = TableNet(V, 1, lambda z: torch.zeros(1, V + 1))
    g.init_modules(net)
    with torch.no_grad():
        net.noise_schedule.w_hat.copy_(torch.log(torch.expm1(torch.tensor([0.5, 1.0, 2.0, 1.0]))))
    p = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.1, 0.1, 0.8, 0.0]], dtype=torch.float64)
    z = torch.tensor([MASK, 1])
    for t, s in time_grid(8):
        a_t, a_s = 1.0 - t, 1.0 - s
        for strategy in ("cap", "rescale"):
            got = step_probs(p, z, a_t, a_s, sigma_for(strategy, 0.0, a_t, a_s), MASK)
            torch.testing.assert_close(got, mdm.reverse_step(p, z, t, s), rtol=0, atol=1e-12)
        got = step_probs(p, z, g.alpha(t), g.alpha(s), sigma_for("cap", 0.0, g.alpha(t), g.alpha(s)), MASK)
        torch.testing.assert_close(got, g.reverse_step(p, z, t, s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy,eta", [("cap", 0.05), ("rescale", 0.3), ("conf", 0.0), ("loop", 0.05)])
def test_a_perfect_model_still_samples_the_joint(strategy, eta):
    L = 2
    joint = random_joint(V, L, seed=5)
    model = TableNet(V, L, log_table(lambda z: posterior(joint, z, MASK)))
    out = generate(model, mask_id=MASK, gen_length=L, steps=128, sampler="remdm", batch_size=20000,
                   generator=torch.Generator().manual_seed(1), temperature=1.0,
                   remdm=ReMDMConfig(strategy=strategy, eta=eta, top_p=1.0))
    assert not bool((out == MASK).any())
    assert chi_square_p(out, joint) > 1e-3


def test_remdm_is_batch_invariant_with_one_generator_per_row():
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=V + 1, mask_id=MASK, max_seq_len=16,
                      init_std=0.6)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.eval()
    kw = dict(mask_id=MASK, gen_length=8, steps=16, sampler="remdm", remdm=ReMDMConfig(strategy="conf"))
    together = generate(model, batch_size=3, generator=row_generators([5, 6, 7]), **kw)
    for i, seed in enumerate([5, 6, 7]):
        alone = generate(model, batch_size=1, generator=row_generators([seed]), **kw)
        assert torch.equal(alone[0], together[i])
    g = build_objective(DiffusionConfig(objective="genmd4"), mask_id=MASK)
    g.init_modules(model)
    for sampler in ("mdlm", "remdm"):
        out = generate(model, batch_size=2, mask_id=MASK, gen_length=8, steps=8, sampler=sampler, objective=g,
                       temperature=1.0, generator=torch.Generator().manual_seed(0))
        assert not bool((out == MASK).any())
