"""sedd, d3pm and dfm under DP2 x TP2 (gloo, 4 processes, one torchrun launch: scenario `baselines` of
tests/dist_worker.py), through the trainer's own step (pretrain.loop.step.train_step), time-conditioned with the
adaLN modulation made non-zero identically in every layout:
  - each objective in both of its graphs / sources gives the same losses, gradients and updates as one process;
  - a DP2 x TP2 run stopped (and checkpointed) at step 2 of 4 and resumed at DP4, another data-parallel degree,
    gives the uninterrupted run's losses to float32 reduction order (< 1e-5, the checkpoint tests' tolerance;
    the sum over 4 shards instead of 2 cannot be bitwise equal; a resume in the same layout is bit for bit,
    tests/test_dist_checkpoint.py);
  - sedd trains under DeepSpeed ZeRO-2 with the native engine's losses."""
import json

import pytest

from dist_launch import check_equivalence, load, metrics, objective_scenarios

OBJECTIVES = ["sedd", "d3pm", "dfm"]
TOL = 1e-5


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return objective_scenarios(tmp_path_factory) / "baselines"


@pytest.mark.parametrize("variant", ["", "_other"])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_dp2_x_tp2_matches_single_process(four, name, variant):
    rep = load(four / f"equivalence_{name}{variant}.json")
    assert rep["_ref_grad_scale"] > 1e-4
    check_equivalence(rep, "dp2_tp2", 2)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_resume_continues_the_uninterrupted_run(four, name):
    reference = metrics(four / f"{name}_reference")["train"]
    stopped = metrics(four / name)["train"]
    dp4 = metrics(four / f"{name}_dp4")["train"]
    assert sorted(reference) == sorted(dp4) == [1, 2, 3, 4]
    assert sorted(stopped) == [1, 2]
    for step in (1, 2):  # the stopped run is the reference up to the checkpoint
        assert stopped[step] == reference[step], step
    for step in (3, 4):  # after the resume
        assert abs(dp4[step] - reference[step]) < TOL, (step, dp4[step], reference[step])
    assert abs(reference[4] - reference[3]) > 1e-4, "training did not move the loss: the check would be vacuous"
    # Resumed, not rerun from scratch (a rerun would log the same losses): steps 3 and 4 logged once, after the
    # copied 1 and 2, and the last checkpoint written in the new layout.
    from pretrain.checkpoint.store import read_trainer_state
    run = four / f"{name}_dp4"
    logged = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == [1, 2, 3, 4], logged
    assert read_trainer_state(run / "checkpoints" / "step_00000004")["layout"] == {"dp_replicate": 1, "dp_shard": 4,
                                                                                  "tp": 1}


def test_deepspeed_zero2_trains_sedd_like_native(four):
    """sedd under DeepSpeed ZeRO-2 at DP4 (the scenario's last run) gives the native DP2 x TP2 run's losses."""
    pytest.importorskip("deepspeed", reason="the DeepSpeed engine needs pip install -e .[deepspeed]")
    zero, native = metrics(four / "sedd_zero2")["train"], metrics(four / "sedd_reference")["train"]
    assert sorted(zero) == [1, 2, 3, 4]
    for step in zero:
        assert abs(zero[step] - native[step]) < TOL, (step, zero[step], native[step])
