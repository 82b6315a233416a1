"""Block diffusion under DP2 x TP2 (gloo, 4 processes): the same losses, gradients and updates as one process
(tests/dist_worker.py scenario `block`, through the trainer's own step)."""
import pytest

from dist_launch import check_equivalence, load, objective_scenarios


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return objective_scenarios(tmp_path_factory) / "block"


def test_block_dp2_x_tp2_matches_single_process(four):
    rep = load(four / "equivalence_block.json")
    check_equivalence(rep, "dp2_tp2", 2)
    check_equivalence(rep, "dp2_tp2_ac_full", 2)
