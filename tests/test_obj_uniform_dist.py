"""uniform and hybrid diffusion under DP2 x TP2 (gloo, 4 processes): the same losses, gradients and updates as
one process, with adaLN time conditioning on (its modulation made non-zero) and the chunked all-position
loss gathering the vocab-sharded logits chunk by chunk (scenario `uniform` of tests/dist_worker.py)."""
import pytest

from dist_launch import check_equivalence, load, objective_scenarios


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return objective_scenarios(tmp_path_factory) / "uniform"


@pytest.mark.parametrize("name", ["uniform", "hybrid"])
def test_dp2_x_tp2_matches_single_process_with_adaln(four, name):
    rep = load(four / "equivalence_uniform.json")
    assert rep[f"_{name}_ref_grad_scale"] > 1e-4
    check_equivalence(rep, f"{name}_dp2_tp2", 2)
    check_equivalence(rep, f"{name}_dp2_tp2_ac_full", 2)
