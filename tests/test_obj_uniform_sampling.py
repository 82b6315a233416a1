"""Samplers of uniform and hybrid diffusion through model.sample.generate: exact for one token at any number
of steps, close to the joint for three tokens with many steps (chi-square, with a power check), the Psi
step at kappa = 1 is the ancestral posterior, and the noise-removal / self-correction options."""
import pytest
import torch

from model.objectives import DiffusionConfig, build_objective
from model.sample import generate
from tests.obj_oracles import SoftOracle, chi_square_p, random_joint

V, MASK = 3, 3


def build(name, p_u=0.5, **kw):
    return build_objective(DiffusionConfig(objective=name, uniform_frac=p_u, **kw), mask_id=MASK,
                           vocab_size=V + 1)


def sample(obj, joint, n, steps, seed=0, **kw):
    model = SoftOracle(joint, obj)
    out = generate(model, None, mask_id=MASK, gen_length=joint.ndim, steps=steps, batch_size=n,
                   generator=torch.Generator().manual_seed(seed), objective=obj, **kw)
    assert not (out == MASK).any()
    return out


@pytest.mark.parametrize("name,p_u", [("uniform", 1.0), ("hybrid", 0.4), ("hybrid", 0.0)])
def test_one_token_is_exact_at_any_number_of_steps(name, p_u):
    joint = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    obj = build(name, p_u)
    for steps in (1, 4):
        assert chi_square_p(sample(obj, joint, 6000, steps, seed=steps), joint) > 1e-3
    # Power: the same samples are rejected against a different joint.
    wrong = torch.tensor([0.5, 0.35, 0.15], dtype=torch.float64)
    assert chi_square_p(sample(obj, joint, 6000, 4, seed=9), wrong) < 1e-6


@pytest.mark.parametrize("name,p_u", [("uniform", 1.0), ("hybrid", 0.5)])
def test_three_tokens_match_the_joint_with_many_steps(name, p_u):
    joint = random_joint(V, 3, seed=4) ** 3
    joint = joint / joint.sum()  # peaked, so a wrong sampler shows
    obj = build(name, p_u)
    out = sample(obj, joint, 4000, 128, seed=1)
    assert chi_square_p(out, joint) > 1e-3
    flat = random_joint(V, 3, seed=4)  # power: the un-sharpened joint is rejected
    assert chi_square_p(out, flat / flat.sum()) < 1e-6


@pytest.mark.parametrize("name,p_u", [("uniform", 1.0), ("hybrid", 0.3)])
def test_psi_step_at_kappa_one_is_the_ancestral_posterior(name, p_u):
    obj = build(name, p_u)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, V + 1, generator=g, dtype=torch.float64)
    p[:, MASK] = 0
    p = p / p.sum(-1, keepdim=True)
    states = V + 1 if name == "hybrid" else V
    z = torch.randint(0, states, (50,), generator=g)
    for t, s in [(0.8, 0.6), (0.3, 0.1)]:
        anc = obj.reverse_step(p, z, t, s)
        assert torch.equal(obj.psi_step(p, z, t, s, kappa=1.0), anc)
        half = obj.psi_step(p, z, t, s, kappa=0.5)
        assert torch.allclose(half.sum(-1), torch.ones(50, dtype=torch.float64)) and (half >= 0).all()
        assert not torch.allclose(half, anc)


def test_psi_sampler_and_noise_removal_options_are_valid_samplers():
    joint = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    obj = build("hybrid", 0.5, psi_kappa=0.7)
    assert chi_square_p(sample(obj, joint, 6000, 8, sampler="psi"), joint) > 1e-3
    greedy = build("uniform", noise_removal="greedy")
    out = sample(greedy, joint, 200, 4)
    assert (out == 0).all()  # the greedy tail takes the argmax of x_theta = p(x)
    corr = build("uniform", self_correct_steps=3)
    assert (sample(corr, joint, 200, 4) == 0).all()  # self-correction moves every token to the model's mode
