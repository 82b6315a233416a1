"""Chaos: SIGKILL a small CPU training run at N random moments, restart it each time, compare with a clean run.

    python benchmarks/chaos.py [--kills 20] [--nproc 2] [--steps 60] [--save-every 5] [--in-save 0.4]
                               [--async-save] [--seed 0] [--out DIR]

Runs `python -m pretrain` under torchrun (gloo, CPU) on configs/tiny.yaml. First an uninterrupted reference;
then the same run is started, SIGKILLed (torchrun and every worker at once, as a node failure would) and
restarted with train.resume=auto, N times, then allowed to finish. A fraction `--in-save` of the kills waits
for a checkpoint's .tmp folder to appear and strikes a few milliseconds later, inside the save; the others
a fraction `--at-startup` strikes at a random time before training starts; the others wait until a random
step between the restart's checkpoint and the end has been logged and strike at a random point of the next
step (a random time of at most one step's duration). A kill that finds a .tmp folder is counted as a kill
during a save, whatever its kind.

Prints one row per kill and a summary: kills, kills during saves, steps redone (work lost: the steps logged
before a kill minus the checkpoint the restart resumed from), and whether the loss curve (every step's
training loss, the final validation loss) and the final weights are bit-identical to the reference's.
Exit status 0 only when they are.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.procs import kill_tree  # noqa: E402


def run_args(out: Path, name: str, args) -> list[str]:
    overrides = [f"train.out_dir={out}", f"train.name={name}", f"train.steps={args.steps}",
                 f"train.save_every={args.save_every}", "train.log_every=1", f"train.eval_every={args.steps}",
                 "train.samples=0", "logging.progress_bar=false", "logging.plot=false", "train.keep_checkpoints=2",
                 f"train.seed={args.seed}", "train.peak_flops=1e11",  # no start-up matmul benchmark
                 f"parallel.async_save={'true' if args.async_save else 'false'}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "-m", "pretrain", "--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and all its workers at once (the workers run in their own sessions)."""
    victims = kill_tree(proc)
    deadline = time.time() + 10  # the workers are not our children: wait until they are gone
    while time.time() < deadline and any(_alive(p) for p in victims[1:]):
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line torn by the kill (the next start cuts it off)
    return out


def curve(run_dir: Path) -> tuple[dict, dict]:
    """(step -> training loss, step -> validation loss), the last record of a step winning."""
    train, val = {}, {}
    for r in records(run_dir):
        if "loss" in r:
            train[r["step"]] = r["loss"]
        for k, v in r.items():
            if k.startswith("val/"):
                val[r["step"]] = v
    return train, val


def _tmp_dirs(ckdir: Path) -> set:
    """The save folders in progress, by name and inode (a restart removes a stale one and may create a new
    one of the same name)."""
    out = set()
    for p in ckdir.glob("step_*.tmp") if ckdir.is_dir() else []:
        try:
            out.add((p.name, p.stat().st_ino))
        except FileNotFoundError:
            pass
    return out


def _logged_at_least(run_dir: Path, skip: int, step: int) -> bool:
    return any("loss" in r and r["step"] >= step for r in records(run_dir)[skip:])


def weights(ckpt: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(ckpt), str(Path(d) / "full.pt"))
        return torch.load(Path(d) / "full.pt", weights_only=False)


def same_tensors(a, b) -> bool:
    import torch
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def run_to_end(cmd: list[str], log: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        p = subprocess.run(cmd, env=env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"a run failed (exit {p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def chaos(args) -> dict:
    from pretrain.checkpoint.store import latest_checkpoint, step_of
    rng = random.Random(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="chaos-"))
    shutil.rmtree(out / "reference", ignore_errors=True)
    shutil.rmtree(out / "chaos", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t_ref = run_to_end(run_args(out, "reference", args), out / "reference.log", args.timeout)
    ref_dir, run_dir = out / "reference", out / "chaos"
    times = [r["time"] for r in records(ref_dir) if "loss" in r]
    step_s = (times[-1] - times[0]) / max(1, len(times) - 1)
    startup_s = max(1.0, t_ref - (times[-1] - times[0]))
    ckdir = run_dir / "checkpoints"
    rows, kills = [], 0
    log = out / "chaos.log"
    while kills < args.kills:
        draw = rng.random()
        kind = "in-save" if draw < args.in_save else "startup" if draw < args.in_save + args.at_startup else "step"
        if args.pattern:
            kind = args.pattern[kills % len(args.pattern)]
        resumed_from = (lambda c: step_of(c) if c else 0)(latest_checkpoint(ckdir))
        # "step": strike at a random point of a random step of the next two save intervals
        target = min(args.steps - 1, resumed_from + rng.randint(1, 2 * args.save_every))
        pause = rng.uniform(0, step_s)
        n_before = len(records(run_dir))
        stale = _tmp_dirs(ckdir)  # left by the previous kill; the restart removes them
        with open(log, "a") as f:
            proc = subprocess.Popen(run_args(out, "chaos", args), env=env(), cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        delay = rng.uniform(0.0, 1.0) * startup_s  # "startup": somewhere before the first step
        finished = False
        while True:
            if proc.poll() is not None:
                finished = True
                break
            now = time.perf_counter() - t0
            if kind == "in-save" and _tmp_dirs(ckdir) - stale:
                time.sleep(rng.uniform(0, args.save_jitter))
                break
            if kind == "startup" and (now >= delay or _logged_at_least(run_dir, n_before, 0)):
                break
            if kind == "step" and _logged_at_least(run_dir, n_before, target):
                time.sleep(pause)
                break
            if now > args.timeout:
                kill_all(proc)
                raise SystemExit(f"a chaos attempt ran past {args.timeout} s; see {log}")
            time.sleep(0.002)
        if finished:
            if proc.returncode != 0:
                raise SystemExit(f"a chaos attempt failed (exit {proc.returncode}); see {log}:\n"
                                 f"{log.read_text()[-3000:]}")
            # It finished before the kill: start over so every kill strikes a live run.
            rows.append({"kill": None, "note": "finished before the kill; run restarted from scratch"})
            shutil.rmtree(run_dir)
            continue
        kill_all(proc)
        kills += 1
        in_save = bool(_tmp_dirs(ckdir) - stale)
        new_steps = [r["step"] for r in records(run_dir)[n_before:] if "loss" in r]  # logged by this attempt
        latest = latest_checkpoint(ckdir)
        survived = step_of(latest) if latest else 0
        rows.append({"kill": kills, "kind": kind, "at_s": time.perf_counter() - t0,
                     "in_save": in_save, "started_from": resumed_from, "logged": max(new_steps, default=resumed_from),
                     "latest_after": survived,
                     # work lost: steps this attempt computed beyond the checkpoint that survived the kill
                     "redone": max(0, max(new_steps, default=0) - survived)})
    t_final = run_to_end(run_args(out, "chaos", args), log, args.timeout)
    ref_train, ref_val = curve(ref_dir)
    got_train, got_val = curve(run_dir)
    ref_last, got_last = latest_checkpoint(ref_dir / "checkpoints"), latest_checkpoint(ckdir)
    weights_identical = (got_last is not None and ref_last is not None and step_of(got_last) == step_of(ref_last)
                         == args.steps and same_tensors(weights(ref_last), weights(got_last)))
    curve_identical = (sorted(ref_train) == list(range(1, args.steps + 1)) and ref_train == got_train
                       and ref_val == got_val)
    killed = [r for r in rows if r.get("kill")]
    return {"kills": len(killed), "kills_in_save": sum(r["in_save"] for r in killed),
            "kills_aimed_at_saves": sum(r["kind"] == "in-save" for r in killed),
            "steps_redone": sum(r["redone"] for r in killed),
            "max_redone": max((r["redone"] for r in killed), default=0),
            "curve_identical": curve_identical, "weights_identical": weights_identical,
            "max_abs_loss_diff": max((abs(ref_train[s] - got_train.get(s, float("inf"))) for s in ref_train),
                                     default=float("nan")),
            "reference_s": t_ref, "final_s": t_final, "rows": rows, "out": str(out),
            "nproc": args.nproc, "steps": args.steps, "save_every": args.save_every, "async_save": args.async_save}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--in-save", type=float, default=0.4, help="fraction of kills aimed inside a save")
    ap.add_argument("--pattern", type=lambda t: t.split(","), default=None,
                    help="fixed kinds in turn instead of random ones, e.g. in-save,step,startup (tests)")
    ap.add_argument("--at-startup", type=float, default=0.1, help="fraction of kills before the first step")
    ap.add_argument("--save-jitter", type=float, default=0.005, help="seconds after a save starts, at most")
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.pattern and not set(args.pattern) <= {"in-save", "step", "startup"}:
        ap.error(f"--pattern takes in-save, step and startup, got {','.join(args.pattern)}")
    res = chaos(args)
    print(f"{'kill':>4} {'kind':>8} {'at s':>6} {'in save':>7} {'from':>5} {'logged':>6} {'survived':>8} {'redone':>6}")
    for r in res["rows"]:
        if not r.get("kill"):
            print(f"   - {r['note']}")
            continue
        print(f"{r['kill']:>4} {r['kind']:>8} {r['at_s']:>6.1f} {str(r['in_save']):>7} {r['started_from']:>5} "
              f"{r['logged']:>6} {r['latest_after']:>8} {r['redone']:>6}")
    print(f"\n{res['nproc']} processes (gloo), {res['steps']} steps, a checkpoint every {res['save_every']}"
          f"{' (async)' if res['async_save'] else ''}; reference run {res['reference_s']:.1f} s")
    print("| kills | kills during saves | steps redone (max per kill) | loss curve bit-identical | "
          "final weights bit-identical |")
    print("|---|---|---|---|---|")
    print(f"| {res['kills']} | {res['kills_in_save']} | {res['steps_redone']} ({res['max_redone']}) | "
          f"{'yes' if res['curve_identical'] else 'NO'} | {'yes' if res['weights_identical'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["curve_identical"] and res["weights_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
