"""Downstream benchmarks with lm-evaluation-harness and the `unmask` model; JSON + Markdown results.

    python -m eval.downstream --ckpt runs/NAME --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande \
        --num-fewshot 0 [--mc-samples K] [--limit N] [--data-dir DIR] [--output DIR]

Offline (no network): --data-dir DIR points each built-in task at local files instead of the hub. For task T
the files are looked up as DIR/T/<split>.jsonl (also .json, .parquet, .csv) for each split the task declares,
or DIR/T.jsonl for the split it evaluates; LAMBADA also accepts OpenAI's DIR/lambada/lambada_test.jsonl
(the layout of shared/data). Files keep the hub dataset's own fields (docs/downstream.md lists them). The
task's prompt, answer and metric definitions are lm-eval's own; only the data source changes (dataset_path
json/parquet/csv with dataset_kwargs.data_files). Custom task YAMLs can be added with --include-path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Extra file names accepted for a task's evaluated split (relative to --data-dir).
ALIASES = {"lambada_openai": ["lambada/lambada_test.jsonl"]}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# lm-eval folders of the common tasks: indexing only these takes milliseconds, all 14k+ built-ins ~20 s.
TASK_FOLDERS = {"lambada_openai": "lambada", "lambada_standard": "lambada", "hellaswag": "hellaswag",
                "piqa": "piqa", "arc_easy": "arc", "arc_challenge": "arc", "winogrande": "winogrande"}


def task_manager_for(names: list[str], include_path: Optional[str] = None):
    """A TaskManager that indexes only the folders of the requested tasks when all are known ones."""
    import lm_eval.tasks as tasks_pkg
    from lm_eval.tasks import TaskManager
    extra = [include_path] if include_path else []
    if all(n in TASK_FOLDERS for n in names):
        root = Path(tasks_pkg.__file__).parent
        folders = sorted({str(root / TASK_FOLDERS[n]) for n in names})
        return TaskManager(include_path=folders + extra, include_defaults=False)
    return TaskManager(include_path=extra or None)


def _find_file(root: Path, candidates: list[str]) -> Optional[Path]:
    for c in candidates:
        for suffix in SUFFIXES:
            p = root / (c + suffix) if not Path(c).suffix else root / c
            if p.is_file():
                return p
    return None


def local_task_config(task_manager, name: str, data_dir: Path) -> dict:
    """lm-eval's config of built-in task `name` with its data source replaced by files under data_dir."""
    from lm_eval.tasks._yaml_loader import load_yaml
    entry = task_manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise SystemExit(f"error: {name!r} is not a single lm-eval task with a YAML config; with --data-dir pass "
                         f"leaf tasks (e.g. arc_easy, not ai2_arc)")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    evaluated = cfg.get("test_split") or cfg.get("validation_split")
    files: dict[str, Path] = {}
    for key in SPLIT_KEYS:
        split = cfg.get(key)
        if not split or split in files:
            continue
        cands = [f"{name}/{split}"]
        if split == evaluated:
            cands += [name] + ALIASES.get(name, [])
        found = _find_file(data_dir, cands)
        if found is not None:
            files[split] = found
    if evaluated not in files:
        tried = ", ".join(str(data_dir / c) for c in [f"{name}/{evaluated}.jsonl", f"{name}.jsonl"]
                          + ALIASES.get(name, []))
        raise SystemExit(f"error: no local file for task {name} (split {evaluated!r}); tried {tried} "
                         f"(and .json/.parquet/.csv)")
    kinds = {SUFFIXES[p.suffix] for p in files.values()}
    if len(kinds) > 1:
        raise SystemExit(f"error: task {name}: local files mix formats {sorted(kinds)}; use one format")
    for key in SPLIT_KEYS:  # splits without a local file are dropped (few-shot then draws from what exists)
        if cfg.get(key) and cfg[key] not in files:
            cfg[key] = None
    cfg.update(dataset_path=kinds.pop(), dataset_name=None,
               dataset_kwargs={"data_files": {split: str(p) for split, p in files.items()}})
    return cfg


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Downstream results: {meta['ckpt']}", "",
             f"step {meta['step']} · {meta['kind']} · {meta['num_fewshot']}-shot · MC samples {meta['mc_samples']} · "
             f"cfg {meta['cfg_scale']} · limit {meta['limit']} · lm-eval {meta['lm_eval_version']} · "
             f"{meta['seconds']:.1f} s", "",
             "| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, res in results.items():
        for key, value in res.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            se = res.get(f"{metric}_stderr,{filt}", "")
            lines.append(f"| {task} | {metric}{'' if filt == 'none' else ' (' + filt + ')'} | {_fmt(value)} | "
                         f"{_fmt(se) if se != '' else ''} |")
    lines += ["", "Diffusion models: log-likelihoods are Monte Carlo ELBO estimates (lower bounds in expectation), so "
              "perplexities are upper bounds; `acc` of LAMBADA-style tasks is greedy joint decoding by iterative "
              "unmasking (is_greedy)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.downstream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--mc-samples", type=int, default=128, help="Monte Carlo samples per loglikelihood request")
    ap.add_argument("--stderr-tol", type=float, default=None, help="stop sampling an example at this stderr")
    ap.add_argument("--cfg-scale", type=float, default=0.0)
    ap.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    ap.add_argument("--data-dir", help="read the tasks' data from local files here (offline)")
    ap.add_argument("--include-path", help="extra folder of task YAMLs")
    ap.add_argument("--model-args", default="", help="extra unmask model args, key=value,...")
    ap.add_argument("--output", help="folder for results.json and results.md (default: RUN/downstream)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--log-samples", action="store_true", help="keep per-example outputs in the JSON")
    args = ap.parse_args(argv)

    if args.data_dir:  # everything is local: make sure nothing waits on the network
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError:
        print("error: lm-eval is not installed: pip install 'unmask[lmeval]' (or pip install lm-eval)",
              file=sys.stderr)
        return 2
    from importlib.metadata import version

    from .lm_eval_model import UnmaskLM
    from lm_eval.utils import simple_parse_args_string

    extra = simple_parse_args_string(args.model_args)
    lm = UnmaskLM(ckpt=args.ckpt, device=args.device, batch_size=args.batch_size, mc_samples=args.mc_samples,
                  stderr_tol=args.stderr_tol, cfg_scale=args.cfg_scale, seed=args.seed, **extra)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tm = task_manager_for(names, args.include_path)
    tasks = [local_task_config(tm, n, Path(args.data_dir)) for n in names] if args.data_dir else names
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=args.log_samples, random_seed=args.seed,
                                  numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                  fewshot_random_seed=args.seed, bootstrap_iters=1000)
    seconds = time.perf_counter() - t0
    if out is None:  # non-zero ranks
        return 0
    meta = {"ckpt": str(lm.run.path), "step": lm.run.step, "kind": "ar" if lm.run.is_ar else "diffusion",
            "num_fewshot": args.num_fewshot, "mc_samples": args.mc_samples, "stderr_tol": args.stderr_tol,
            "cfg_scale": args.cfg_scale, "limit": args.limit, "seed": args.seed, "data_dir": args.data_dir,
            "tasks": names, "lm_eval_version": version("lm_eval"), "seconds": seconds, "model_args": extra}
    dest = Path(args.output) if args.output else lm.run.run_dir / "downstream"
    dest.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": out["results"], "n-samples": out.get("n-samples"),
               "versions": out.get("versions"), "configs": out.get("configs")}
    if args.log_samples:
        payload["samples"] = out.get("samples")
    (dest / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    md = markdown(out["results"], meta)
    (dest / "results.md").write_text(md)
    print(md)
    print(f"wrote {dest / 'results.json'} and {dest / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
