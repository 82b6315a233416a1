"""Distributed checkpoints: resharding on resume, atomic asynchronous saves, consolidated export.

A run at DP=2 x TP=2 stops (and checkpoints) at step 4 of 8. Resumed at DP=1 x TP=1 and at DP=4 (FSDP2 over
4 ranks), the checkpoint gives the same validation loss and training continues with the losses of an
uninterrupted single-process run (the loader's whole state is `consumed`, and every step's noise is a pure
function of (seed, step)). Measured differences: below 1e-6 (float32 reduction order).
"""
import json
import os
import subprocess
import time

import pytest
import torch

from dist_launch import ROOT, env, load, metrics, run_once, torchrun, torchrun_cmd
from launch.procs import kill_tree

TOL = 1e-5


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_once(tmp_path_factory, "four", 4, "four")


@pytest.fixture(scope="module")
def resumed_single(tmp_path_factory, four):
    return run_once(tmp_path_factory, "resume_single", 1, "resume", str(four / "dp2tp2"), "single")


@pytest.fixture(scope="module")
def resumed_dp4(tmp_path_factory, four):
    return run_once(tmp_path_factory, "resume_dp4", 4, "resume", str(four / "dp2tp2"), "dp4")


def test_checkpoint_at_dp2_tp2_is_complete(four):
    from pretrain.checkpoint.store import latest_checkpoint, read_trainer_state
    ckdir = four / "dp2tp2" / "checkpoints"
    latest = latest_checkpoint(ckdir)
    assert latest is not None and latest.name == "step_00000004"
    state = read_trainer_state(latest)
    assert state["step"] == 4 and state["consumed"] == 4 * 8 and state["engine"] == "native"
    assert state["layout"] == {"dp_replicate": 1, "dp_shard": 2, "tp": 2}
    assert not list(ckdir.glob("*.tmp")), "a committed save must leave no temporary directory"


@pytest.mark.parametrize("which", ["single", "dp4"])
def test_resharded_checkpoint_gives_same_validation_loss(four, resumed_single, resumed_dp4, which):
    out = {"single": resumed_single, "dp4": resumed_dp4}[which]
    logged = metrics(four / "dp2tp2")["val"][4]  # evaluated at DP=2 x TP=2 during training
    got = load(out / f"eval_{which}.json")
    assert got["step"] == 4 and got["consumed"] == 32
    assert abs(got["val_loss"] - logged) < TOL, (got["val_loss"], logged)


@pytest.mark.parametrize("which", ["single", "dp4"])
def test_training_continues_as_if_uninterrupted(resumed_single, resumed_dp4, which):
    out = {"single": resumed_single, "dp4": resumed_dp4}[which]
    reference = metrics(resumed_single / "reference")  # 8 steps in one process, never stopped
    resumed = metrics(out / f"resumed_{which}")
    assert sorted(resumed["train"]) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(resumed["train"][step] - reference["train"][step]) < TOL, step
    assert abs(resumed["val"][8] - reference["val"][8]) < TOL
    # The check is not vacuous: training moved the loss.
    assert abs(reference["train"][8] - reference["train"][5]) > 1e-3


def test_export_consolidates_any_layout(four, tmp_path):
    import contextlib

    from data import build_data
    from eval.load import load as load_run
    from model.objectives import build_objective
    from pretrain.checkpoint.weights import load_model_weights
    from pretrain.interop.export import export
    from pretrain.loop.evaluate import evaluate
    out = export(four / "dp2tp2", tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.yaml"}
    loaded = load_run(out)  # the evaluation loader reads the folder directly
    direct = load_run(four / "dp2tp2" / "checkpoints" / "step_00000004")  # DCP resharded into one process
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), direct.model.state_dict().items()):
        assert torch.equal(a, b), name
    cfg = loaded.cfg
    data = build_data(cfg.data, cfg.train.seed)
    objective = build_objective(cfg.diffusion, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size)
    val = evaluate(loaded.model, cfg, next(iter(data.valid.values())), dp_rank=0, dp_size=1,
                   micro=cfg.train.global_batch_size, device=torch.device("cpu"), autocast=contextlib.nullcontext(),
                   objective=objective)
    assert abs(val - metrics(four / "dp2tp2")["val"][4]) < TOL
    # bf16 export halves the file and stays close.
    out16 = export(four / "dp2tp2", tmp_path / "export16", dtype=torch.bfloat16)
    assert (out16 / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    _ = load_model_weights  # imported for the API check: eval/load.py relies on it


def test_sigkill_during_async_save_leaves_resumable_checkpoint(tmp_path):
    """Kill the whole job (torchrun and both ranks, SIGKILL) the moment the asynchronous write of step 8
    starts: step 4 stays the latest complete checkpoint, the half-written step 8 is ignored, and a resumed run
    reproduces the losses of an uninterrupted one."""
    from pretrain.checkpoint.store import latest_checkpoint, list_checkpoints
    out = tmp_path / "async"
    ckdir = out / "async" / "checkpoints"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(torchrun_cmd(2, "async_kill", str(out)), env=env(), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline, victims = time.time() + 120, []
    try:
        while not (ckdir / "step_00000008.tmp").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached its second checkpoint"
            time.sleep(0.001)
    finally:
        victims = kill_tree(proc)
        log.close()
    time.sleep(0.5)
    assert not [pid for pid in victims if os.path.exists(f"/proc/{pid}") and
                open(f"/proc/{pid}/stat").read().split()[2] != "Z"], "a rank survived the kill"
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_00000004"]
    assert not (ckdir / "step_00000008").exists()
    assert latest_checkpoint(ckdir).name == "step_00000004"

    killed = metrics(out / "async")  # steps 1..8 ran before the kill; their losses are the reference
    assert sorted(killed["train"])[:8] == list(range(1, 9))
    torchrun(2, "async_resume", str(out))
    resumed = metrics(out / "async")
    steps = [rec["step"] for rec in map(json.loads, (out / "async" / "metrics.jsonl").read_text().splitlines())
             if "loss" in rec]
    assert steps[-4:] == [5, 6, 7, 8], "the resumed run starts after the step-4 checkpoint"
    for step in range(5, 9):
        assert abs(resumed["train"][step] - killed["train"][step]) < TOL, step
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_00000004", "step_00000008"]
    assert not list(ckdir.glob("*.tmp")), "the resumed run replaces the interrupted save"
