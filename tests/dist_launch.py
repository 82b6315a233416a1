"""Helpers for the distributed tests: run tests/dist_worker.py under torchrun (CPU, gloo) once per session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


LOSS_TOL, GRAD_TOL, PARAM_TOL = 5e-6, 1e-5, 1e-4


def check_equivalence(report: dict, name: str, steps: int) -> None:
    """A layout's report (tests/dist_worker.py) against the unsharded single-process reference."""
    r = report[name]
    assert r["init"] == 0.0, f"{name}: initial weights differ from the unsharded init by {r['init']}"
    assert len(r["loss"]) == steps
    assert max(r["loss"]) < LOSS_TOL, f"{name}: loss differs by {max(r['loss'])}"
    assert max(r["gnorm"]) < LOSS_TOL, f"{name}: gradient norm differs by {max(r['gnorm'])}"
    assert max(r["grad"]) < GRAD_TOL, f"{name}: gradients differ by {max(r['grad'])}"
    assert max(r["param"]) < PARAM_TOL, f"{name}: weights after the update differ by {max(r['param'])}"


def env() -> dict:
    # One thread per process: the tests start up to 4 processes on a 2-core machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(WORKER), *args]


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(torchrun_cmd(nproc, *args), env=env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"torchrun {nproc} x {' '.join(args)} failed (exit {p.returncode}):\n"
                             f"{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def run_once(tmp_path_factory, key: str, nproc: int, scenario: str, *args: str, timeout: int = 600) -> Path:
    """Run a scenario once per pytest session into <basetemp>/dist_<key> (results shared across modules)."""
    out = tmp_path_factory.getbasetemp() / f"dist_{key}"
    done = out / "DONE"
    if not done.exists():
        t0 = time.perf_counter()
        torchrun(nproc, scenario, str(out), *args, timeout=timeout)
        out.mkdir(parents=True, exist_ok=True)
        done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    return out


def objective_scenarios(tmp_path_factory) -> Path:
    """Every objective's 4-process scenario (tests/dist_worker.py `objectives`), one launch per pytest session;
    each module reads its own subfolder."""
    return run_once(tmp_path_factory, "objectives", 4, "objectives", timeout=900)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def metrics(run_dir: Path) -> dict:
    """step -> record, last record of each kind wins (a resumed run re-logs the steps after its checkpoint)."""
    train, val = {}, {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train[rec["step"]] = rec["loss"]
        for k, v in rec.items():
            if k.startswith("val/"):
                val[rec["step"]] = v
    return {"train": train, "val": val}
