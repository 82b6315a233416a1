"""The bound estimators of uniform and hybrid diffusion through eval.elbo (the code eval.ppl runs): with the
exact leave-one-out posterior their Monte Carlo mean is -log p(x) (the bound is tight), within 4 standard
errors, and the prior term is part of every estimate."""
import math

import pytest
import torch

from eval.elbo import sequence_samples
from model.objectives import DiffusionConfig, build_objective
from tests.obj_oracles import SoftOracle, random_joint

V, MASK = 3, 3


@pytest.mark.parametrize("name,p_u,method", [("uniform", 1.0, "t"), ("hybrid", 0.5, "mdlm")])
def test_estimator_mean_is_the_exact_nll_for_the_exact_model(name, p_u, method):
    joint = random_joint(V, 3, seed=1)
    obj = build_objective(DiffusionConfig(objective=name, uniform_frac=p_u, eps=1e-5), mask_id=MASK,
                          vocab_size=V + 1)
    x = torch.tensor([[2, 0, 1]])
    est = sequence_samples(SoftOracle(joint, obj), x, method=method, samples=256, seed=0, mask_id=MASK,
                           objective=obj, batch_size=64, group=8)
    mean, se = float(est.mean()), float(est.std()) / math.sqrt(est.numel())
    nll = -math.log(float(joint[2, 0, 1]))
    assert abs(mean - nll) < 4 * se + 1e-3, (mean, se, nll)
