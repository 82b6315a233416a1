"""Bit-identity regression recipe: train, evaluate and sample through the stable command lines only, and
record every number exactly, so a refactor can be checked against the code it replaced.

    python tests/bit_identity.py --root DIR --out FILE.json [--workdir DIR] [--keep] [--jobs 2]

What it runs, from DIR (cwd = DIR, PYTHONPATH = DIR, so DIR's code is what runs; checked before anything):

- `python -m pretrain --config configs/tiny.yaml` for 20 steps with a loss line per step, for each diffusion
  schedule (linear, cosine, poly, cos_alpha) and the AR baseline (diffusion.objective=ar model.causal=true),
  on one process and on DP2 x TP2 (`torch.distributed.run --standalone --nproc_per_node=4`, gloo on CPU);
  every step's loss, gradient norm and learning rate and the final validation loss are recorded;
- `python -m eval.ppl` on the synthetic language's validation stream (seq_len 64, fixed seed) for the
  linear-schedule and the AR one-process checkpoints;
- `python -m eval.generate` (fixed seeds) on the same two checkpoints.

Every float is stored as its Python repr (a string), so equality is bit equality. Outputs (runs, eval
results) go to a temporary folder, never into DIR. The fixture of the pre-refactor code is
tests/fixtures/bit_identity_before.json; tests/test_bit_identity.py reruns this recipe and compares.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1
STEPS = 20
SCHEDULES = ("linear", "cosine", "poly", "cos_alpha")
# name -> overrides of the run (besides the common ones below)
VARIANTS: dict[str, list[str]] = {
    **{s: [f"diffusion.schedule={s}"] for s in SCHEDULES},
    "ar": ["diffusion.objective=ar", "model.causal=true"],
}
LAYOUTS: dict[str, tuple[int, list[str]]] = {  # name -> (processes, overrides)
    "1proc": (1, []),
    "dp2xtp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
}
COMMON = [
    f"train.steps={STEPS}", "train.log_every=1",  # every step's loss is logged
    "train.eval_every=1000", "train.save_every=1000",  # validation and a checkpoint at the last step only
    "train.samples=0", "logging.plot=false", "logging.progress_bar=false", "logging.wandb=disabled",
    "train.peak_flops=1e12",  # skip the start-up matmul benchmark (only MFU uses it)
]
PPL_ARGS = ["--datasets", "synthetic", "--seq-len", "64", "--max-blocks", "32", "--samples", "2", "--seed", "3",
            "--batch-size", "16", "--threads", "1", "--device", "cpu", "--no-progress"]
PPL_METHODS = {"linear": "mdlm,t,count", "ar": "ar"}  # run -> estimators
GEN_CALLS: dict[str, tuple[str, list[str]]] = {  # name -> (run, flags)
    "linear_prompt_sampled": ("linear", ["--prompt", "ba be bi", "--num-samples", "2", "--gen-length", "32",
                                         "--steps", "16", "--block-length", "16", "--temperature", "1.0",
                                         "--seed", "7"]),
    "linear_uncond_greedy": ("linear", ["--gen-length", "32", "--steps", "32", "--seed", "0"]),
    "ar_prompt_sampled": ("ar", ["--prompt", "ba be bi", "--num-samples", "2", "--gen-length", "32",
                                 "--temperature", "1.0", "--seed", "7"]),
}
# Per-run result fields that depend on the machine or the temporary paths, not on the numerics.
PPL_DROP = ("seconds", "seconds_per_1M_tokens", "checkpoint")
SEPARATOR = "=" * 80


class RecipeError(RuntimeError):
    pass


def exact(x: Any) -> Any:
    """Floats -> repr strings (bit-exact, NaN-safe JSON), recursively."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, dict):
        return {k: exact(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [exact(v) for v in x]
    return x


def subprocess_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "LOCAL_RANK"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env.update({
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0",
        "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": str(root) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
    })
    return env


def run(cmd: list[str], root: Path, log: Path, timeout: int = 600) -> tuple[str, float]:
    """Run cmd from root; stdout+stderr to log. Returns (stdout, seconds); raises RecipeError on failure."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=root, env=subprocess_env(root), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RecipeError(f"timed out after {timeout} s: {' '.join(cmd)}\n{e.stdout or ''}\n{e.stderr or ''}")
    seconds = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n# exit {p.returncode} in {seconds:.1f} s\n--- stdout\n{p.stdout}\n"
                   f"--- stderr\n{p.stderr}")
    if p.returncode != 0:
        raise RecipeError(f"exit {p.returncode}: {' '.join(cmd)} (cwd {root})\n--- stdout (tail)\n"
                          f"{p.stdout[-3000:]}\n--- stderr (tail)\n{p.stderr[-6000:]}")
    return p.stdout, seconds


def check_imports(root: Path, work: Path) -> dict:
    """The subprocesses must import root's code (not an editable install of another checkout)."""
    code = ("import json, importlib; print(json.dumps({m: importlib.import_module(m).__file__ "
            "for m in ('pretrain', 'eval', 'model', 'data')}))")
    out, _ = run([sys.executable, "-c", code], root, work / "logs" / "imports.log")
    files = json.loads(out.strip().splitlines()[-1])
    wrong = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(root.resolve())}
    if wrong:
        raise RecipeError(f"subprocesses from {root} import code from elsewhere: {wrong}")
    return files


def train_cmd(variant: str, layout: str, out_dir: Path) -> list[str]:
    nproc, extra = LAYOUTS[layout]
    args = ["--config", "configs/tiny.yaml", *COMMON, f"train.out_dir={out_dir}",
            f"train.name={variant}-{layout}", *VARIANTS[variant], *extra]
    if nproc == 1:
        return [sys.executable, "-m", "pretrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pretrain", *args]


def read_metrics(run_dir: Path) -> dict:
    """Every step's loss / grad_norm / lr and the validation loss(es), in order, checked for completeness."""
    steps: dict[str, dict] = {}
    val: dict[str, dict] = {}
    true_entropy = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" in rec:
            raise RecipeError(f"{run_dir}: unexpected event in metrics.jsonl: {rec}")
        step = str(rec["step"])
        if "loss" in rec:
            if step in steps:
                raise RecipeError(f"{run_dir}: step {step} logged twice (a resumed run?)")
            steps[step] = {k: rec[k] for k in ("loss", "grad_norm", "lr")}
        vals = {k: v for k, v in rec.items() if k.startswith("val/")}
        if vals:
            val[step] = vals
            true_entropy = rec.get("true_entropy", true_entropy)
    if list(steps) != [str(s) for s in range(1, STEPS + 1)]:
        raise RecipeError(f"{run_dir}: logged steps {list(steps)}, expected 1..{STEPS}")
    if list(val) != [str(STEPS)]:
        raise RecipeError(f"{run_dir}: validation at steps {list(val)}, expected only {STEPS}")
    return {"steps": steps, "val": val[str(STEPS)], "val_loss": val[str(STEPS)]["val/valid"],
            "true_entropy": true_entropy}


def read_ppl(out_dir: Path) -> list[dict]:
    rows = json.loads((out_dir / "ppl.json").read_text())["results"]
    return [{k: v for k, v in r.items() if k not in PPL_DROP} for r in rows]


def read_generate(stdout: str) -> list[str]:
    """The generated texts: the lines between the 80-character separators (prompt + continuation)."""
    lines = stdout.splitlines()
    marks = [i for i, line in enumerate(lines) if line == SEPARATOR]
    texts = ["\n".join(lines[a + 1:b]) for a, b in zip(marks, marks[1:])]
    if not texts:
        raise RecipeError(f"no generated text found in eval.generate's output:\n{stdout[-3000:]}")
    return texts


def commit(root: Path) -> str:
    """root's git HEAD (+ "-dirty" with uncommitted changes to tracked files), for the record only."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def environment() -> dict:
    import torch
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "machine": platform.machine()}


def record(root: str | Path, work: str | Path, jobs: int = 2, dist_variants=None) -> dict:
    """Run the whole recipe from `root` with outputs under `work`; returns the JSON-able result. One-process
    jobs run `jobs` at a time (each single-threaded); the 4-process runs run alone, for every variant or only
    for `dist_variants` (the test suite's subset: the 4-process runs cost most of the recipe's time)."""
    root, work = Path(root).resolve(), Path(work).resolve()
    runs, logs = work / "runs", work / "logs"
    t_start = time.perf_counter()
    imports = check_imports(root, work)
    timings: dict[str, float] = {}

    def one(job):
        name, cmd = job
        _, seconds = run(cmd, root, logs / f"{name}.log")
        timings[name] = round(seconds, 2)

    dist = tuple(VARIANTS) if dist_variants is None else tuple(dist_variants)
    unknown = set(dist) - set(VARIANTS)
    if unknown:
        raise RecipeError(f"dist_variants {sorted(unknown)} are not variants of the recipe ({', '.join(VARIANTS)})")
    ran = {"1proc": tuple(VARIANTS), "dp2xtp2": dist}

    def train_jobs(layout):
        return [(f"train/{v}-{layout}", train_cmd(v, layout, runs)) for v in ran[layout]]

    single = train_jobs("1proc")
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, single))

    # evaluation of the one-process checkpoints (they exist now), alongside nothing else
    ppl_out = {v: work / "eval" / f"ppl-{v}" for v in PPL_METHODS}
    eval_jobs = [(f"ppl/{v}", [sys.executable, "-m", "eval.ppl", "--ckpt", str(runs / f"{v}-1proc"), *PPL_ARGS,
                               "--method", PPL_METHODS[v], "--out", str(out)]) for v, out in ppl_out.items()]
    gen_stdout: dict[str, str] = {}

    def gen(job):
        name, (variant, flags) = job
        out, seconds = run([sys.executable, "-m", "eval.generate", "--ckpt", str(runs / f"{variant}-1proc"),
                            "--threads", "1", "--device", "cpu", *flags], root, logs / f"generate-{name}.log")
        gen_stdout[name] = out
        timings[f"generate/{name}"] = round(seconds, 2)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(one, j) for j in eval_jobs] + [pool.submit(gen, j) for j in GEN_CALLS.items()]
        for f in futures:
            f.result()

    for job in train_jobs("dp2xtp2"):
        one(job)

    result = {
        "recipe_version": RECIPE_VERSION,
        "train": {f"{v}/{layout}": exact(read_metrics(runs / f"{v}-{layout}")) for layout in LAYOUTS
                  for v in ran[layout]},
        "ppl": {v: exact(read_ppl(out)) for v, out in ppl_out.items()},
        "generate": {name: read_generate(gen_stdout[name]) for name in GEN_CALLS},
        # not compared: where it ran and how long it took
        "meta": {"root": str(root), "commit": commit(root), "environment": environment(), "imports": imports, "timings_s": dict(sorted(timings.items())),
                 "total_s": round(time.perf_counter() - t_start, 1)},
    }
    return result


COMPARED = ("recipe_version", "train", "ppl", "generate")


# Fields that evaluation results gained after the fixture was recorded, by design: which objective's bound a row
# estimates (model/objectives). They add information; every field the fixture has must still be identical.
ADDED_FIELDS = {"objective", "prior_nats_per_token"}

# Reference values corrected on purpose after the fixture was recorded (not numerics): the AR runs' logged
# `true_entropy` (training log and eval.ppl's row) was the whole-sequence entropy per token, which AR's loss over
# tokens 2..L does not bound; it is now the language's entropy rate. The test checks the new values against the
# language separately.
CORRECTED = {"train.ar/1proc.true_entropy", "train.ar/dp2xtp2.true_entropy", "ppl.ar[0].true_entropy"}


def diff(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Every difference between two results (the compared sections only at the top level)."""
    if not path:
        out = []
        for key in COMPARED:
            out += diff(expected.get(key), actual.get(key), key)
        return out
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for k in list(expected) + [k for k in actual if k not in expected]:
            if k not in actual:
                out.append(f"{path}.{k}: missing (expected {short(expected[k])})")
            elif k not in expected:
                if k not in ADDED_FIELDS:
                    out.append(f"{path}.{k}: unexpected (got {short(actual[k])})")
            else:
                out += diff(expected[k], actual[k], f"{path}.{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        out = [] if len(expected) == len(actual) else [f"{path}: length {len(actual)}, expected {len(expected)}"]
        for i, (e, a) in enumerate(zip(expected, actual)):
            out += diff(e, a, f"{path}[{i}]")
        return out
    if expected != actual and path not in CORRECTED:
        return [f"{path}: got {short(actual)}, expected {short(expected)}" + ulps(expected, actual)]
    return []


def short(x: Any, n: int = 200) -> str:
    s = json.dumps(x) if not isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[:n] + "..."


def ulps(expected: Any, actual: Any) -> str:
    try:
        e, a = float(expected), float(actual)
    except (TypeError, ValueError):
        return ""
    return f" (diff {a - e:+.3e})"


def summarize(differences: list[str], limit: int = 60) -> str:
    head = "\n".join(differences[:limit])
    more = f"\n... and {len(differences) - limit} more" if len(differences) > limit else ""
    return f"{len(differences)} difference(s) from the fixture:\n{head}{more}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]),
                    help="repository whose code runs (default: the one this file lives in)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--workdir", default=None, help="where runs and logs go (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder (its path is printed)")
    ap.add_argument("--jobs", type=int, default=2, help="one-process jobs run at a time")
    ap.add_argument("--compare", default=None, help="also compare with this fixture (exit 1 on any difference)")
    args = ap.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bit_identity_"))
    try:
        result = record(args.root, work, jobs=args.jobs)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"runs and logs kept in {work}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['meta']['total_s']} s")
    for name, s in result["meta"]["timings_s"].items():
        print(f"  {name:<32} {s:6.1f} s")
    if args.compare:
        differences = diff(json.loads(Path(args.compare).read_text()), result)
        if differences:
            print(summarize(differences))
            return 1
        print(f"identical to {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
