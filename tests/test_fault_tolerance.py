"""Runs that survive a cluster (issue 12), single process: bad steps, checkpoints to fall back on, rollbacks,
config changes on resume, preemption within a grace period, failed saves.

Every scenario trains configs/tiny.yaml in this process for a handful of steps (about a second each)."""
import errno
import json
import os
import signal

import pytest
import torch

from pretrain.checkpoint.store import (Checkpointer, CheckpointError, latest_checkpoint, list_checkpoints,
                                 read_trainer_state, step_of)
from pretrain.config import ConfigError, load_config, to_dict
from tests.conftest import ROOT

BASE = ["train.log_every=1", "train.samples=0", "logging.progress_bar=false", "logging.plot=false",
        "train.threads=1", "train.eval_every=1000", "data.random_length_prob=0", "train.peak_flops=1e11"]


def cfg_of(out, *extra):
    return load_config(str(ROOT / "configs" / "tiny.yaml"), [f"train.out_dir={out}", *BASE, *extra])


def run(out, *extra):
    from pretrain.loop.train import train
    return train(cfg_of(out, *extra))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def weights(ckpt):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(ckpt), str(ckpt.parent / "full.pt"))
    out = torch.load(ckpt.parent / "full.pt", weights_only=False)
    (ckpt.parent / "full.pt").unlink()
    return out


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient norm is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison(monkeypatch, bad: dict):
    """Make training step k (1-based, one micro-batch per step) produce bad[k]: "loss" (NaN loss), "grad"
    (finite loss, NaN gradient) or a float (the loss times that factor)."""
    import pretrain.loop.step as step_mod
    real = step_mod.objective_loss
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        loss, stats = real(*a, **k)
        how = bad.get(calls["n"])
        if how == "loss":
            loss = loss * float("nan")
        elif how == "grad":
            loss = _NanGrad.apply(loss)
        elif how == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif how is not None:
            loss = loss * how
        return loss, stats
    monkeypatch.setattr(step_mod, "objective_loss", wrapped)


# ----------------------------------------------------------------------------- bad steps

def test_non_finite_steps_are_skipped_without_touching_weights_or_optimizer(tmp_path, monkeypatch):
    run(tmp_path, "train.name=clean", "train.steps=2", "train.save_every=2")
    poison(monkeypatch, {3: "loss", 4: "grad"})
    run(tmp_path, "train.name=bad", "train.steps=4", "train.save_every=2")
    recs = records(tmp_path / "bad")
    skipped = {r["step"]: r["skipped"] for r in recs if r.get("event") == "bad_step"}
    assert sorted(skipped) == [3, 4] and "loss" in skipped[3] and "gradient norm" in skipped[4], skipped
    assert [r["bad_steps"] for r in recs if "loss" in r] == [0, 0, 1, 2]
    # Steps 3 and 4 changed nothing: the step-4 checkpoint holds exactly the step-2 weights and AdamW state.
    bad = weights(tmp_path / "bad" / "checkpoints" / "step_00000004")
    clean = weights(tmp_path / "clean" / "checkpoints" / "step_00000002")
    assert same(bad["model"], clean["model"]) and same(bad["optim"]["state"], clean["optim"]["state"])
    assert read_trainer_state(tmp_path / "bad" / "checkpoints" / "step_00000004")["guard"]["total"] == 2


def test_consecutive_bad_steps_stop_the_run_and_suggest_a_rollback(tmp_path, monkeypatch):
    from pretrain.loop.guard import TooManyBadSteps
    poison(monkeypatch, {k: "loss" for k in range(3, 20)})
    with pytest.raises(TooManyBadSteps, match=r"steps 3\.\.5 were all skipped.*--rollback 2"):
        run(tmp_path, "train.name=r", "train.steps=10", "train.save_every=2", "train.max_bad_steps=3")
    # Saves during the streak hold the step-2 weights unchanged (nothing was applied since).
    assert read_trainer_state(tmp_path / "r" / "checkpoints" / "step_00000004")["guard"]["consecutive"] == 2


def test_loss_spike_guard_is_off_by_default_and_skips_spikes_when_on(tmp_path, monkeypatch):
    poison(monkeypatch, {12: 50.0, 24: 50.0})  # the second run's step 12 is call 24
    run(tmp_path, "train.name=plain", "train.steps=12", "train.save_every=100")
    assert not [r for r in records(tmp_path / "plain") if r.get("event") == "bad_step"]
    run(tmp_path, "train.name=guarded", "train.steps=12", "train.save_every=100", "train.loss_spike_factor=3")
    skipped = [r for r in records(tmp_path / "guarded") if r.get("event") == "bad_step"]
    assert [r["step"] for r in skipped] == [12] and "loss spike" in skipped[0]["skipped"]


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(tmp_path / "checkpoints")
    ck.save(1, model, opt, {"step": 1})
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="not finite"):
        ck.save(2, model, opt, {"step": 2})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


# ----------------------------------------------------------------------------- checkpoints

def test_rotation_keeps_the_last_k_and_every_milestone(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(tmp_path, keep=2, keep_every=4)
    for s in range(1, 11):
        ck.save(s, model, opt, {"step": s})
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [4, 8, 9, 10]
    manifest = json.loads((tmp_path / "step_00000010" / "manifest.json").read_text())["files"]
    assert set(manifest) >= {"trainer_state.json", ".metadata"} and all(len(v["sha256"]) == 64
                                                                        for v in manifest.values())


def test_corrupt_latest_checkpoint_falls_back_loudly_and_resumes_exactly(tmp_path, capsys):
    run(tmp_path, "train.name=r", "train.steps=8", "train.save_every=4")
    first = losses(tmp_path / "r")
    ckdir = tmp_path / "r" / "checkpoints"
    shard = next((ckdir / "step_00000008").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    (ckdir / "step_00000009.tmp").mkdir()  # a stale leftover of an interrupted save
    capsys.readouterr()
    out = run(tmp_path, "train.name=r", "train.steps=8", "train.save_every=4")
    printed = capsys.readouterr().out
    assert "WARNING: checkpoint" in printed and "SHA-256" in printed and "falling back" in printed
    assert not (ckdir / "step_00000009.tmp").exists()
    assert [p.name for p in (ckdir / "corrupt").iterdir()][0].startswith("step_00000008-")
    assert out["step"] == 8
    again = losses(tmp_path / "r")  # steps 5..8 re-run from step 4: the same numbers
    assert all(again[s] == first[s] for s in range(5, 9))
    assert any(r.get("event") == "checkpoint_fallback" for r in records(tmp_path / "r"))


def test_checkpoint_with_a_missing_file_is_refused_when_named_explicitly(tmp_path):
    run(tmp_path, "train.name=r", "train.steps=4", "train.save_every=4")
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000004"
    (ckpt / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"cannot be loaded.*\.metadata is missing"):
        run(tmp_path, "train.name=r", "train.steps=6", f"train.resume={ckpt}")


def test_disk_full_during_a_save_is_a_clear_error_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs
    run(tmp_path, "train.name=r", "train.steps=2", "train.save_every=2")
    real = fs._write_item

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fs, "_write_item", full_disk)
    with pytest.raises(CheckpointError, match=r"step_00000004 could not be written .*No space left on device.*"
                                              r"still step_00000002"):
        run(tmp_path, "train.name=r", "train.steps=4", "train.save_every=2")
    monkeypatch.setattr(fs, "_write_item", real)
    ckdir = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_00000002"]


def test_failed_commit_on_rank0_is_a_clear_error(tmp_path, monkeypatch):
    import pretrain.checkpoint.store as ckmod
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(tmp_path)
    ck.save(1, model, opt, {"step": 1})
    real = ckmod._write_json

    def enospc(path, obj):
        if path.name == ckmod.MANIFEST_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)
    monkeypatch.setattr(ckmod, "_write_json", enospc)
    with pytest.raises(CheckpointError, match=r"step_00000002 could not be committed .*Errno 28.*still step_00000001"):
        ck.save(2, model, opt, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


# ----------------------------------------------------------------------------- rollback

def test_rollback_moves_newer_checkpoints_aside_and_requeues_continue_it(tmp_path):
    from pretrain.__main__ import main
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"train.out_dir={tmp_path}", *BASE, "train.name=r",
            "train.steps=12", "train.save_every=4", "train.keep_checkpoints=2"]
    main(args)
    ckdir = tmp_path / "r" / "checkpoints"
    assert [step_of(p) for p in list_checkpoints(ckdir)] == [8, 12]
    main(args + ["--rollback", "8", "optim.lr=1e-3", "train.stop_after=2"])  # a blow-up: back to 8, lower LR
    (aside,) = ckdir.glob("abandoned-*")
    assert [p.name for p in aside.iterdir()] == ["step_00000012"]
    assert [step_of(p) for p in list_checkpoints(ckdir)] == [8, 10]
    main(args + ["optim.lr=1e-3"])  # the requeue (resume=auto) continues the rollback, not the abandoned run
    assert [step_of(p) for p in list_checkpoints(ckdir)] == [10, 12] and (aside / "step_00000012").is_dir()
    recs = records(tmp_path / "r")
    assert [r["step"] for r in recs if r.get("event") == "rollback"] == [8]
    assert read_trainer_state(latest_checkpoint(ckdir))["config"]["optim"]["lr"] == 1e-3
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        main(args + ["--rollback", "3"])
    # The same without training, for a job that is then requeued as it is.
    from pretrain.checkpoint.resume import main as resume_main
    resume_main([str(tmp_path / "r"), "--rollback", "10"])
    assert [step_of(p) for p in list_checkpoints(ckdir)] == [10] and len(list(ckdir.glob("abandoned-*"))) == 2
    assert [r["step"] for r in records(tmp_path / "r") if r.get("event") == "rollback"] == [8, 10]


# ----------------------------------------------------------------------------- config changes

def test_fatal_config_changes_are_listed_and_stop_before_anything_is_written(tmp_path):
    run(tmp_path, "train.name=r", "train.steps=4", "train.save_every=4")
    config_before = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        run(tmp_path, "train.name=r", "train.steps=8", "data.seq_len=32", "train.seed=1",
            "train.global_batch_size=4", "model.n_layers=1")
    msg = str(e.value)
    for line in ("data.seq_len: 64 in the checkpoint, 32 now", "train.seed: 0 in the checkpoint, 1 now",
                 "train.global_batch_size: 8 in the checkpoint, 4 now", "model.n_layers"):
        assert line in msg, msg
    assert "train.allow_config_change=[" in msg
    assert (tmp_path / "r" / "config.yaml").read_text() == config_before


def test_allowed_and_overridden_changes_are_logged(tmp_path, capsys):
    run(tmp_path, "train.name=r", "train.steps=4", "train.save_every=4")
    capsys.readouterr()
    run(tmp_path, "train.name=r", "train.steps=6", "optim.lr=1e-3", "optim.grad_clip=0.5", "train.seed=5",
        "train.allow_config_change=[train.seed]")
    printed = capsys.readouterr().out
    assert "config change on resume (intentional): optim.lr: 0.003 -> 0.001" in printed
    assert "config change on resume (allowed): train.seed: 0 -> 5" in printed
    (rec,) = [r for r in records(tmp_path / "r") if r.get("event") == "config_change"]
    assert rec["changes"]["train.steps"] == [4, 6] and rec["step"] == 4
    with pytest.raises(ConfigError, match="unknown keys: train.sede"):
        run(tmp_path, "train.name=r", "train.steps=8", "train.allow_config_change=[train.sede]")


def test_vocab_and_tokenizer_mismatch_with_the_checkpoint_are_refused(tmp_path):
    from pretrain.checkpoint.resume import check_state
    run(tmp_path, "train.name=r", "train.steps=2", "train.save_every=2")
    with pytest.raises(ConfigError, match="model.vocab_size: 65 in the checkpoint, 80 now"):
        run(tmp_path, "train.name=r", "train.steps=4", "model.vocab_size=80")
    state = read_trainer_state(tmp_path / "r" / "checkpoints" / "step_00000002")
    assert state["data_fingerprint"] == "synthetic-64"
    with pytest.raises(ConfigError, match="trained with tokenizer synthetic-64 but the data now uses bpe-1234"):
        check_state(state, cfg_of(tmp_path, "train.name=r"), fingerprint="bpe-1234")


def test_changed_steps_continue_from_the_current_learning_rate():
    from pretrain.loop.lr import continue_schedule, lr_at, lr_for
    old = cfg_of("x", "train.steps=100", "optim.warmup_steps=10")
    new = cfg_of("x", "train.steps=200", "optim.warmup_steps=10")
    anchor = continue_schedule(to_dict(old), new, 60, None)
    was = lr_at(60, lr=old.optim.lr, min_lr=old.optim.min_lr, warmup=10, total=100, schedule="cosine")
    jump = lr_at(60, lr=new.optim.lr, min_lr=new.optim.min_lr, warmup=10, total=200, schedule="cosine")
    assert abs(jump - was) > 0.2 * was  # what a plain restart would do
    assert lr_for(60, new.optim, 200, anchor) == pytest.approx(was, rel=1e-12)
    assert abs(lr_for(61, new.optim, 200, anchor) - was) < 0.01 * was  # smooth
    assert lr_for(200, new.optim, 200, anchor) == pytest.approx(new.optim.min_lr)  # and still ends at min_lr
    series = [lr_for(s, new.optim, 200, anchor) for s in range(60, 201)]
    assert all(a >= b for a, b in zip(series, series[1:]))
    # A lower LR after a blow-up scales the curve down (no schedule jump on top of the intended change).
    lower = cfg_of("x", "train.steps=200", "optim.warmup_steps=10", "optim.lr=1.5e-3", "optim.min_lr=1.5e-4")
    assert lr_for(60, lower.optim, 200, continue_schedule(to_dict(old), lower, 60, None)) == \
        pytest.approx(was / 2, rel=1e-9)
    # Nothing changed: no anchor, the plain schedule.
    assert continue_schedule(to_dict(old), old, 60, None) is None


def test_resumed_run_with_more_steps_has_no_lr_jump(tmp_path):
    run(tmp_path, "train.name=r", "train.steps=10", "train.save_every=6", "train.stop_after=6",
        "optim.warmup_steps=2")
    run(tmp_path, "train.name=r", "train.steps=20", "train.save_every=100", "optim.warmup_steps=2")
    from pretrain.loop.lr import lr_at
    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "r") if "lr" in r}  # step s logs the LR of index s-1
    kw = dict(lr=3e-3, min_lr=3e-4, warmup=2, schedule="cosine")
    assert lrs[7] == pytest.approx(lr_at(6, total=10, **kw), rel=1e-9)  # where the old schedule was going
    assert abs(lr_at(6, total=20, **kw) - lrs[7]) > 0.3 * lrs[7]  # a plain restart would have jumped up
    assert all(a >= b for a, b in zip([lrs[s] for s in range(6, 21)], [lrs[s] for s in range(7, 21)]))
    assert lrs[20] < 3.5e-4


# ----------------------------------------------------------------------------- preemption

def test_sigterm_saves_within_the_grace_period_or_exits_leaving_the_previous_checkpoint(tmp_path, monkeypatch):
    poison(monkeypatch, {3: "term", 6: "term"})
    out = run(tmp_path, "train.name=saves", "train.steps=10", "train.save_every=2", "train.preempt_grace_s=0")
    ckdir = tmp_path / "saves" / "checkpoints"
    assert out["preempted"] and out["step"] == 3 and latest_checkpoint(ckdir).name == "step_00000003"
    assert "checkpoint saved" in (tmp_path / "saves" / "PREEMPTED").read_text()
    # A 1 ms grace period cannot hold a save (measured at step 2): exit at once, step 2 stays the latest.
    out = run(tmp_path, "train.name=exits", "train.steps=10", "train.save_every=2", "train.preempt_grace_s=0.001")
    ckdir = tmp_path / "exits" / "checkpoints"
    assert out["preempted"] and out["step"] == 3 and latest_checkpoint(ckdir).name == "step_00000002"
    marker = (tmp_path / "exits" / "PREEMPTED").read_text()
    assert marker.startswith("SIGTERM") and "no time to save" in marker and "step_00000002" in marker


def test_config_file_that_is_not_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    bad.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    bad.write_text("- a\n- list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(bad))


def test_async_save_is_committed_as_soon_as_it_finishes(tmp_path):
    import time
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(tmp_path, async_save=True)
    ck.save(1, model, opt, {"step": 1})
    deadline = time.time() + 60
    while latest_checkpoint(tmp_path) is None:  # no wait(), no next save: the commit thread does it
        assert time.time() < deadline, "the asynchronous save was never committed"
        time.sleep(0.01)
    assert (tmp_path / "step_00000001" / "manifest.json").is_file()
    ck.wait()
