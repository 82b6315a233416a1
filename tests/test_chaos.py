"""Kills at any moment, multi-process (issue 12): the short chaos run and collective checkpoint failures.

The chaos run is benchmarks/chaos.py in small: 2 processes (gloo), 10 steps, a checkpoint every 2, three
SIGKILLs of the whole job (one aimed inside a save, one in the middle of a step, one during startup), a
restart after each; the loss curve and the final weights must be bit-identical to an uninterrupted run's.
"""
import json
import subprocess
import sys

from dist_launch import ROOT, env


def test_short_chaos_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import chaos
    code = chaos.main(["--kills", "3", "--steps", "10", "--save-every", "2", "--pattern", "in-save,step,startup",
                       "--out", str(tmp_path), "--json", str(tmp_path / "result.json"), "--timeout", "300"])
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["kills"] == 3 and res["kills_aimed_at_saves"] == 1
    assert res["curve_identical"] and res["weights_identical"], res
    assert code == 0
    # Each kill lost at most the work since the last checkpoint (plus the step in flight).
    assert all(r["redone"] <= 2 + 1 for r in res["rows"] if r.get("kill")), res["rows"]
    assert not list((tmp_path / "chaos" / "checkpoints").glob("*.tmp"))


def test_failed_commit_on_rank0_reaches_every_rank_at_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ft_worker.py"), "commit_fails", str(tmp_path)]
    p = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["error"] == got[1]["error"] and "step_00000002 could not be committed" in got[0]["error"]
    assert "No space left on device" in got[0]["error"] and "still step_00000001" in got[0]["error"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
