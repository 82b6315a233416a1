"""genmd4 under DP2 x TP2 (gloo, 4 processes; scenario `genmd4` of tests/dist_worker.py): its learned exponents
are an FSDP unit of their own, replicated on the tp ranks, so training matches one process (gradients of the
exponents included); they are checkpointed, and survive a resume at another data-parallel degree."""
import json

import pytest

from dist_launch import check_equivalence, load, objective_scenarios


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return objective_scenarios(tmp_path_factory) / "genmd4"


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["dp2_tp2", "dp2_tp2_accum2_ac_full"])
def test_dp2_x_tp2_matches_single_process(four, layout):
    rep = load(four / "equivalence_genmd4.json")
    assert rep["_ref_grad_scale"] > 1e-4
    check_equivalence(rep, layout, 3)


def test_exponents_survive_save_and_resume_at_another_dp_degree(four):
    tp, dp4 = load(four / "genmd4_dp2_tp2.json"), load(four / "genmd4_dp4.json")
    assert tp["step"] == dp4["step"] == 4
    mask = tp["mask_id"]
    w = [v for i, v in enumerate(tp["w"]) if i != mask]
    assert max(abs(v - 1.0) for v in w) > 1e-3, "the exponents did not train (still w = 1)"
    assert tp["w"] == dp4["w"], "the exponents differ when the checkpoint is loaded at DP4"
    assert dp4["val_loss"] == pytest.approx(tp["val_loss"], abs=1e-5)
    # The run's own validation at step 4 (before the save) is the loaded checkpoint's.
    val4 = [r["val/valid"] for r in records(four / "genmd4") if r.get("step") == 4 and "val/valid" in r]
    assert val4 and val4[-1] == pytest.approx(tp["val_loss"], abs=1e-5)
    # Resumed at DP4: the first step logs the exponents it resumed with (the stats are read before the update).
    steps = {r["step"]: r for r in records(four / "genmd4_dp4") if "loss" in r}
    assert max(steps) == 8
    first = steps[5]
    assert first["w_min"] == pytest.approx(min(w), abs=1e-6)
    assert first["w_max"] == pytest.approx(max(w), abs=1e-6)
    assert first["w_mean"] == pytest.approx(sum(w) / len(w), abs=1e-6)


def test_logged_loss_is_the_nelbo_and_w_is_logged(four):
    step0 = load(four / "genmd4_step0.json")
    steps = [r for r in records(four / "genmd4") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["w_min"] <= r["w_mean"] <= r["w_max"]
    # The step loss logged at DP2 x TP2 is step 0's NELBO computed by hand in one process, not the surrogate
    # that is differentiated (NELBO + the REINFORCE term, mean zero but not zero).
    assert abs(step0["surrogate"] - step0["nelbo"]) > 1e-3
    assert steps[0]["loss"] == pytest.approx(step0["nelbo"], abs=1e-5)
