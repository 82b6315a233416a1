"""Scaling-law sweeps: a YAML file names a base recipe and the axes; one command plans, runs and indexes the grid.

    python -m launch.sweep plan configs/sweeps/cpu-gutenberg.yaml
    python -m launch.sweep run configs/sweeps/cpu-gutenberg.yaml --backend local [--max-parallel 2]
    python -m launch.sweep run configs/sweeps/X.yaml --backend slurm --nodes 1 --gpus-per-node 8 --partition gpu
    python -m launch.sweep collect runs/X          # (after a slurm sweep) evaluate finished runs, write the index
    python -m eval.scaling runs/X                   # fit and plot

A sweep file (see configs/sweeps/*.yaml):
    name: X                     # runs go to <out_dir>/X/<run>/ (ordinary run directories)
    recipe: configs/Y.yaml      # optional base recipe; `base:` (config sections) is applied over it
    sizes:  [{name: s1, dim: 64, n_layers: 2, n_heads: 2, ffn_dim: 256}, {name: m, preset: 19M}, ...]
    budgets: [1e12, 3e12]       # training FLOPs per run (the count of pretrain/loop/flops.py: attention included,
                                # the MDM head at masked positions, SMDM's random-length correction)
    objectives: [mdm, ar, {name: genmd4, label: genmd4-s1, overrides: {genmd4.samples_per_t: 1}}]
                                # `label` names the run (needed when two entries of one objective differ only
                                # in keys the run name does not show)
    seeds: [0]
    unique_tokens: [0]          # optional data-constrained axis: 0 = all the data, else U unique tokens repeated
    exclude: [{size: s1, objective: ar, budget: 3e12}]   # optional: grid points not to run (IsoFLOP profiles
                                # centred on each budget's optimum); each entry must match a run
    rules: {batch_size: 32, lr: {base: 3e-3, base_dim: 128, exponent: 0.5}, warmup_fraction: 0.05, evals: 4}
    eval: {sequences: 64, samples: 8, seed: 0}   # held-out NELBO (eval.elbo, "count" estimator; AR exact)
    time: {flops_per_s: 2e10, overhead_s: 10}    # for the plan's time estimate
Every axis entry may be a mapping with `overrides` (dotted config keys); precedence: base < rules < size <
objective < budget < unique-token entry. Steps = floor(budget / expected FLOPs per step).

`local` runs one run after another (or N at once), each in its own process; it is resumable: a run with a
result.json is skipped, a half-finished one resumes from its latest checkpoint. The sweep index
(<out_dir>/X/index.jsonl, one line per finished run, grid order) holds the final and best held-out NELBO with
standard errors, tokens, unique tokens, epochs, exact parameter counts and FLOPs.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional




def causal_by_objective() -> dict[str, bool]:
    """Every registered objective (model/objectives) -> the model.causal it needs."""
    from model.objectives import OBJECTIVES
    return {name: cls.causal for name, cls in OBJECTIVES.items()}
SWEEP_KEYS = {"name", "out_dir", "recipe", "base", "sizes", "budgets", "objectives", "seeds", "unique_tokens",
              "exclude", "rules", "eval", "time", "description"}
EXCLUDE_KEYS = ("size", "objective", "budget", "seed", "unique_tokens")
RESULT, INDEX, EVENTS = "result.json", "index.jsonl", "events.jsonl"


class SweepError(ValueError):
    """A problem with a sweep file, naming the entry."""


@dataclass
class RunPlan:
    name: str
    index: int
    size: str
    objective: str
    budget: float
    seed: int
    unique_tokens: int  # requested cap (0: all)
    config: dict  # full config tree (plain dict) that `python -m pretrain` takes
    params_total: int = 0
    params_nonembed: int = 0
    batch: int = 0
    lr: float = 0.0
    steps: int = 0
    step_flops: dict = field(default_factory=dict)
    flops: float = 0.0
    tokens: float = 0.0
    unique: int = 0  # unique training tokens available to the run
    epochs: float = 0.0
    est_s: float = 0.0
    label: str = ""  # the objective's name in run names and tables (an entry's `label`, or derived)


# ----------------------------------------------------------------------------- reading a sweep file

def _entries(spec: dict, key: str, default=None) -> list[dict]:
    """Axis `key` as a list of {name, value/fields, overrides}."""
    raw = spec.get(key, default)
    if raw is None:
        raise SweepError(f"the sweep has no `{key}` axis (a list)")
    if not isinstance(raw, list) or not raw:
        raise SweepError(f"`{key}` must be a non-empty list, got {raw!r}")
    return raw


def _merge(tree: dict, dotted: dict, where: str) -> None:
    from pretrain.config import Config, ConfigError, _set_dotted
    if not isinstance(dotted, dict):
        raise SweepError(f"{where}: overrides must be a mapping of dotted keys, got {dotted!r}")
    for k, v in dotted.items():
        try:
            _set_dotted(tree, k, v, Config)
        except ConfigError as e:
            raise SweepError(f"{where}: {e}") from None


def _deep_update(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_update(a[k], v)
        else:
            a[k] = v
    return a


def load_sweep(path) -> dict:
    from pretrain.config import read_yaml_mapping
    p = Path(path)
    spec = read_yaml_mapping(p, what="sweep file", where=" (sweeps live in configs/sweeps/)",
                             holds="name, base, sizes, budgets, objectives, ...", error=SweepError)
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"unknown sweep key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SWEEP_KEYS))}")
    spec.setdefault("name", p.stem)
    spec["_file"] = str(p)
    return spec


def _lr_for(rule, dim: int, where: str) -> float:
    """lr = base * (base_dim / dim) ** exponent (a width rule), or a fixed number."""
    if isinstance(rule, (int, float, str)):
        return float(rule)
    if not isinstance(rule, dict) or "base" not in rule:
        raise SweepError(f"{where}: rules.lr must be a number or {{base, base_dim, exponent}}, got {rule!r}")
    return float(rule["base"]) * (float(rule.get("base_dim", dim)) / dim) ** float(rule.get("exponent", 0.0))


def _batch_for(rule, size: str, where: str) -> int:
    if isinstance(rule, int):
        return rule
    if isinstance(rule, dict) and "table" in rule:
        if size not in rule["table"] and "default" not in rule:
            raise SweepError(f"{where}: rules.batch_size.table has no entry for size {size!r} and no default")
        return int(rule["table"].get(size, rule.get("default")))
    raise SweepError(f"{where}: rules.batch_size must be an integer or {{table: {{size: batch}}, default}}")


def _base_tree(spec: dict) -> dict:
    from pretrain.config import read_yaml_mapping
    tree = read_yaml_mapping(spec["recipe"], what="recipe", where="", error=SweepError) if spec.get("recipe") else {}
    return _deep_update(tree, json.loads(json.dumps(spec.get("base") or {})))


def _data_facts(cfg) -> tuple[int, Optional[int], Any]:
    """(vocab size, training samples, the bundle) of a run's data; prepares it on first use."""
    from data import build_data
    bundle = build_data(cfg.data, cfg.train.seed)
    return bundle.vocab_size, bundle.train.num_samples, bundle


def make_plan(spec: dict, *, quiet: bool = False) -> list[RunPlan]:
    """Every run of the grid with its resolved config and planned numbers; raises SweepError naming the entry."""
    import torch

    from model import Transformer, count_params
    from pretrain.config import Config, ConfigError, from_dict
    from pretrain.loop.flops import step_flops

    name, out_dir = spec["name"], spec.get("out_dir", "runs")
    rules = spec.get("rules") or {}
    sizes = _entries(spec, "sizes")
    budgets = _entries(spec, "budgets")
    objectives = _entries(spec, "objectives", ["mdm", "ar"])
    seeds = _entries(spec, "seeds", [0])
    uniques = _entries(spec, "unique_tokens", [0])
    ev = spec.get("eval") or {}
    timing = spec.get("time") or {}
    base = _base_tree(spec)
    data_cache: dict = {}
    plans: list[RunPlan] = []

    def named(entry, i, axis, value_key):
        if isinstance(entry, dict):
            if value_key not in entry and value_key != "name":
                raise SweepError(f"{axis}[{i}]: a mapping entry needs `{value_key}`, got {entry!r}")
            return entry.get(value_key), entry.get("overrides") or {}
        return entry, {}

    for si, size in enumerate(sizes):
        if not isinstance(size, dict) or not size.get("name"):
            raise SweepError(f"sizes[{si}]: each size is a mapping with a name and model keys (preset or shape), "
                             f"got {size!r}")
        where_s = f"sizes[{si}] {size['name']!r}"
        model_keys = {k: v for k, v in size.items() if k not in ("name", "overrides")}
        if "preset" in model_keys:
            from model.config import PRESETS
            if model_keys["preset"] not in PRESETS:
                close = difflib.get_close_matches(str(model_keys["preset"]), PRESETS, n=2, cutoff=0.4)
                raise SweepError(f"{where_s}: unknown model preset {model_keys['preset']!r}"
                                 + (f" (did you mean {', '.join(close)}?)" if close else "")
                                 + f"; choices: {', '.join(PRESETS)}")
        for oi, obj_entry in enumerate(objectives):
            obj, obj_over = named(obj_entry, oi, "objectives", "name")
            where_o = f"objectives[{oi}] {obj!r}"
            obj_label = obj_entry.get("label") if isinstance(obj_entry, dict) else None
            if obj_label is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(obj_label)):
                raise SweepError(f"{where_o}: label {obj_label!r} goes into run names: use letters, digits and "
                                 f"_ . + - only")
            if obj not in causal_by_objective():
                close = difflib.get_close_matches(str(obj), causal_by_objective(), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SweepError(f"{where_o}: unknown objective{hint}; choices: {', '.join(causal_by_objective())}")
            if "causal" in model_keys and bool(model_keys["causal"]) != causal_by_objective()[obj]:
                raise SweepError(f"{where_o} with {where_s}: the size sets model.causal={model_keys['causal']} but "
                                 f"objective {obj} needs model.causal={str(causal_by_objective()[obj]).lower()} (drop `causal` "
                                 f"from the size: the objective sets it)")
            for bi, b_entry in enumerate(budgets):
                budget, b_over = named(b_entry, bi, "budgets", "flops")
                where_b = f"budgets[{bi}] {budget!r}"
                try:
                    budget = float(budget)
                except (TypeError, ValueError):
                    raise SweepError(f"{where_b}: a budget is a number of FLOPs, e.g. 1e12") from None
                if not budget > 0:
                    raise SweepError(f"{where_b}: a budget must be positive")
                for ui, u_entry in enumerate(uniques):
                    U, u_over = named(u_entry, ui, "unique_tokens", "tokens")
                    U = int(float(U))
                    for seed in seeds:
                        plans.append(_plan_one(
                            spec, base, rules, ev, timing, data_cache, name, out_dir, len(plans),
                            size, model_keys, obj, budget, int(seed), U,
                            [(where_s, size.get("overrides") or {}), (where_o, obj_over), (where_b, b_over),
                             (f"unique_tokens[{ui}]", u_over)], where_s, where_o, where_b,
                            torch, Transformer, count_params, Config, ConfigError, from_dict, step_flops,
                            obj_label))
    plans = _exclude(spec.get("exclude") or [], plans)
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise SweepError("two runs share a name: give the sizes distinct names")
    return plans


def _exclude(rules, plans: list[RunPlan]) -> list[RunPlan]:
    """The grid without the runs that match an `exclude` entry on all of its keys."""
    if not isinstance(rules, list):
        raise SweepError("`exclude` must be a list of mappings, e.g. [{size: s1, objective: ar, budget: 1e13}]")

    def value(key, v, where):
        try:
            return float(v) if key == "budget" else int(float(v)) if key in ("seed", "unique_tokens") else str(v)
        except (TypeError, ValueError):
            raise SweepError(f"{where}: {key}={v!r} is not a number") from None

    for i, rule in enumerate(rules):
        where = f"exclude[{i}] {rule!r}"
        if not isinstance(rule, dict) or not rule or set(rule) - set(EXCLUDE_KEYS):
            raise SweepError(f"{where}: an entry is a mapping of some of {', '.join(EXCLUDE_KEYS)}")
        want = {k: value(k, v, where) for k, v in rule.items()}
        keep = [p for p in plans if any(getattr(p, k) != v for k, v in want.items())]
        if len(keep) == len(plans):
            raise SweepError(f"{where} matches no run of the grid (check the size name, objective and budget)")
        plans = keep
    for i, p in enumerate(plans):
        p.index = i
    return plans


def _fmt_budget(b: float) -> str:
    m, e = f"{b:.2e}".split("e")
    return f"{float(m):g}e{int(e)}"


def _plan_one(spec, base, rules, ev, timing, data_cache, sweep, out_dir, index, size, model_keys, obj, budget,
              seed, U, layers, where_s, where_o, where_b, torch, Transformer, count_params, Config, ConfigError,
              from_dict, step_flops, label=None) -> RunPlan:
    obj_over = dict(layers[1][1])
    if label is None:  # two entries of one objective need a `label` unless these keys tell them apart
        block = obj_over.get("diffusion.block_size")  # block diffusion: one run per block size
        label = f"{obj}{block}" if obj == "block" and block is not None else obj
        variant = obj_over.get("diffusion.graph") or obj_over.get("diffusion.source")  # sedd/d3pm graph, dfm source
        if variant is not None:
            label = f"{label}-{variant}"
    run = f"{size['name']}-{label}-C{_fmt_budget(budget)}" + (f"-U{_fmt_budget(U)}" if U else "") + f"-s{seed}"
    where = f"run {run} ({where_s}, {where_o}, {where_b})"
    tree = json.loads(json.dumps(base))
    tree.setdefault("model", {})
    if "preset" in model_keys:  # a preset replaces the base shape; later keys override it
        tree["model"] = {k: v for k, v in tree["model"].items() if k in ("vocab_size", "mask_id", "max_seq_len",
                                                                         "attn_backend")}
    tree["model"].update(model_keys)
    tree["model"]["causal"] = causal_by_objective()[obj]
    from model.objectives import OBJECTIVES
    if OBJECTIVES[obj].time_conditioning:  # uniform, hybrid, sedd, d3pm, dfm: the network gets the noise level
        tree["model"].setdefault("time_conditioning", "adaln")
    tree.setdefault("diffusion", {})["objective"] = obj
    dim_guess = model_keys.get("dim") or tree["model"].get("dim")
    if dim_guess is None and "preset" in model_keys:
        from model.config import get_preset
        dim_guess = get_preset(model_keys["preset"]).dim
    _merge(tree, {"train.seed": seed, "train.name": run, "train.out_dir": f"{out_dir}/{sweep}",
                  "train.resume": "auto", "train.samples": 0, "logging.plot": False, "logging.progress_bar": False,
                  "data.unique_tokens": U}, where)
    if "batch_size" in rules:
        _merge(tree, {"train.global_batch_size": _batch_for(rules["batch_size"], size["name"], where)}, where)
    if "lr" in rules:
        lr = _lr_for(rules["lr"], int(dim_guess or 128), where)
        _merge(tree, {"optim.lr": lr, "optim.min_lr": lr * float(rules.get("min_lr_ratio", 0.1))}, where)
    for w, over in layers:
        _merge(tree, over, f"{where}, {w}")
    try:
        cfg = from_dict(Config, tree)
        cfg.validate()
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
    key = json.dumps(tree.get("data"), sort_keys=True) + str(seed)
    if key not in data_cache:
        try:
            data_cache[key] = _data_facts(cfg)
        except (ValueError, FileNotFoundError) as e:
            raise SweepError(f"{where}: data: {e}") from None
    vocab, n_samples, _ = data_cache[key]
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    if cfg.model.vocab_size < vocab:
        raise SweepError(f"{where}: model.vocab_size={cfg.model.vocab_size} is below the data's {vocab} ids")
    try:
        cfg.model.validate()
    except ValueError as e:
        raise SweepError(f"{where}: {e}") from None
    with torch.device("meta"):
        counts = count_params(Transformer(cfg.model))
    sf = step_flops(cfg, counts["non_embedding"])
    steps = int(budget // sf["total"])
    if steps < 1:
        raise SweepError(f"{where}: the budget {budget:.3g} FLOPs is below one training step of this size "
                         f"({sf['total']:.3g} FLOPs at batch {cfg.train.global_batch_size} x {cfg.data.seq_len}); "
                         f"raise the budget or drop the size")
    L = cfg.data.seq_len
    unique = (min(U // L, n_samples) if U else n_samples) * L if n_samples is not None else 0
    if U and n_samples is not None and U // L > n_samples:
        raise SweepError(f"{where}: unique_tokens={U:,} exceeds the {n_samples * L:,} training tokens of the data")
    tokens = steps * sf["tokens"]
    evals = int(rules.get("evals", 4))
    every = max(1, math.ceil(steps / max(1, evals)))
    warm = int(round(float(rules.get("warmup_fraction", 0.05)) * steps))
    _merge(tree, {"train.steps": steps, "train.eval_every": every, "train.save_every": every,
                  "train.keep_checkpoints": 0, "train.log_every": max(1, min(every, 50)),
                  "optim.warmup_steps": warm}, where)
    try:
        cfg = from_dict(Config, tree)
        cfg.validate()
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
    rate = float(timing.get("flops_per_s", 1e10))
    est = steps * sf["total"] / rate + float(timing.get("overhead_s", 10))
    return RunPlan(run, index, size["name"], obj, budget, seed, U, tree, counts["total"], counts["non_embedding"],
                   cfg.train.global_batch_size, cfg.optim.lr, steps, sf, steps * sf["total"], tokens, unique,
                   tokens / unique if unique else float("nan"), est, label)


def plan_table(plans: list[RunPlan]) -> str:
    head = (f"{'run':<34} {'N_nonemb':>9} {'N_total':>9} {'batch':>5} {'lr':>8} {'steps':>6} {'tokens':>9} "
            f"{'unique':>9} {'epochs':>7} {'FLOPs':>9} {'est':>7}")
    rows = [head, "-" * len(head)]
    for p in plans:
        rows.append(f"{p.name:<34} {p.params_nonembed:>9,} {p.params_total:>9,} {p.batch:>5} {p.lr:>8.2e} "
                    f"{p.steps:>6} {p.tokens:>9.3g} {p.unique:>9.3g} {p.epochs:>7.2f} {p.flops:>9.3g} "
                    f"{p.est_s / 60:>6.1f}m")
    total = sum(p.est_s for p in plans)
    rows.append(f"{len(plans)} runs, {sum(p.flops for p in plans):.3g} training FLOPs, estimated {total / 60:.1f} min "
                f"one at a time (at the sweep's time.flops_per_s)")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- files of a sweep

def sweep_dir(spec: dict) -> Path:
    return Path(spec.get("out_dir", "runs")) / spec["name"]


def write_plan(spec: dict, plans: list[RunPlan]) -> Path:
    from pretrain.config import Config, from_dict, save_config
    d = sweep_dir(spec)
    (d / "configs").mkdir(parents=True, exist_ok=True)
    for p in plans:
        target = d / "configs" / f"{p.name}.yaml"
        tmp = target.with_suffix(".tmp")
        save_config(from_dict(Config, p.config), tmp)
        os.replace(tmp, target)
    names = {f"{p.name}.yaml" for p in plans}
    for old in (d / "configs").glob("*.yaml"):  # runs an edited sweep file dropped (their run folders stay)
        if old.name not in names:
            old.unlink()
    record = {"sweep": spec["name"], "file": spec.get("_file"), "eval": spec.get("eval") or {},
              "runs": [{k: v for k, v in p.__dict__.items() if k != "config"} for p in plans]}
    _atomic_json(d / "plan.json", record)
    return d


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _event(d: Path, **rec) -> None:
    with open(d / EVENTS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def write_index(d: Path) -> Path:
    """index.jsonl: the finished runs' records in grid order (rebuilt from their result.json files)."""
    plan = json.loads((d / "plan.json").read_text())
    lines = []
    for r in plan["runs"]:
        res = d / r["name"] / RESULT
        if res.is_file():
            lines.append(json.dumps(json.loads(res.read_text())["record"], sort_keys=True))
    tmp = d / (INDEX + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, d / INDEX)
    return d / INDEX


# ----------------------------------------------------------------------------- one run: train, then evaluate

def evaluate_checkpoints(run_dir: Path, ev: dict) -> list[dict]:
    """Held-out NELBO (eval.elbo; exact NLL for AR) of every checkpoint of a run, on a fixed set of validation
    sequences spread evenly over the held-out documents."""
    import numpy as np
    import torch

    from data import build_data
    from eval.elbo import evaluate_blocks
    from eval.load import load
    from pretrain.checkpoint.store import list_checkpoints

    first = load(run_dir)
    cfg, objective = first.cfg, first.objective
    method = objective.eval_methods[0] if objective.exact else \
        ev.get("method", "count" if "count" in objective.eval_methods else objective.eval_methods[0])
    valid = next(iter(build_data(cfg.data, cfg.train.seed).valid.values()))
    n = int(ev.get("sequences", 64))
    if valid.num_samples is None:  # endless (synthetic) validation stream: its first n sequences
        idx = list(range(n))
    else:
        n = min(n, valid.num_samples)
        idx = np.linspace(0, valid.num_samples - 1, n).round().astype(int).tolist()
    blocks, _ = valid.get(idx)
    out = []
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        m = load(ckpt).model if ckpt != first.path else first.model
        with torch.no_grad():
            est = evaluate_blocks(m, blocks, method=method, samples=int(ev.get("samples", 8)),
                                  seed=int(ev.get("seed", 0)), mask_id=cfg.model.mask_id,
                                  batch_size=int(ev.get("batch_size", 32)), objective=objective)
        out.append({"step": int(ckpt.name.split("_")[-1]), "nelbo": est.nelbo, "stderr": est.stderr,
                    "method": est.method, "samples": est.samples, "sequences": est.n_sequences,
                    "tokens": est.n_tokens})
    return out


def work(d: Path, run: str, threads: int = 0) -> dict:
    """Train one planned run (resuming from its checkpoint), evaluate it and write its result.json."""
    import torch

    from pretrain.checkpoint.store import latest_checkpoint
    from pretrain.config import load_config
    from pretrain.loop.train import train

    if threads:
        torch.set_num_threads(threads)
    plan = json.loads((d / "plan.json").read_text())
    entry = next((r for r in plan["runs"] if r["name"] == run), None)
    if entry is None:
        raise SweepError(f"{run} is not a run of {d}")
    cfg = load_config(str(d / "configs" / f"{run}.yaml"))
    run_dir = d / run
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    step0 = int(ckpt.name.split("_")[-1]) if ckpt else 0
    _event(d, run=run, event="resume" if ckpt else "start", from_step=step0, pid=os.getpid())
    t0 = time.time()
    out = train(cfg)
    if out.get("preempted"):
        _event(d, run=run, event="preempted", step=out["step"])
        return {}
    evals = evaluate_checkpoints(run_dir, plan.get("eval") or {})
    if not evals:
        raise RuntimeError(f"{run_dir} finished without a checkpoint to evaluate")
    best = min(evals, key=lambda e: e["nelbo"])
    final = max(evals, key=lambda e: e["step"])
    record = {k: entry.get(k) for k in ("name", "size", "objective", "label", "budget", "seed", "unique_tokens",
                                        "params_total",
                                    "params_nonembed", "batch", "lr", "steps", "flops", "tokens", "unique", "epochs")}
    record.update(sweep=plan["sweep"], seq_len=cfg.data.seq_len, dim=cfg.model.dim, n_layers=cfg.model.n_layers,
                  flops_per_step=entry["step_flops"], final_nelbo=final["nelbo"], final_stderr=final["stderr"],
                  final_step=final["step"], best_nelbo=best["nelbo"], best_stderr=best["stderr"],
                  best_step=best["step"], eval={k: final[k] for k in ("method", "samples", "sequences", "tokens")},
                  curve=[{"step": e["step"], "nelbo": e["nelbo"], "stderr": e["stderr"]} for e in evals])
    _atomic_json(run_dir / RESULT, {"record": record, "wall_s": time.time() - t0, "resumed_from": step0})
    _event(d, run=run, event="done", wall_s=round(time.time() - t0, 1))
    return record


def run_local(spec: dict, plans: list[RunPlan], max_parallel: int = 1, threads: int = 0) -> Path:
    d = write_plan(spec, plans)
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // max_parallel)
    pending = [p for p in plans if not (d / p.name / RESULT).is_file()]
    for p in plans:
        if p not in pending:
            _event(d, run=p.name, event="skip")
    print(f"sweep {spec['name']}: {len(plans) - len(pending)} of {len(plans)} runs already finished; "
          f"{len(pending)} to go, {max_parallel} at a time, {threads} thread(s) each")
    running: list[tuple[RunPlan, subprocess.Popen, float]] = []
    failed = []
    t_sweep = time.time()

    def reap(block: bool):
        while running:
            for item in list(running):
                p, proc, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    ok = proc.returncode == 0 and (d / p.name / RESULT).is_file()
                    if not ok:
                        failed.append(p.name)
                    write_index(d)
                    rec = json.loads((d / p.name / RESULT).read_text())["record"] if ok else {}
                    print(f"  {'done' if ok else 'FAILED'} {p.name} in {time.time() - t0:.0f} s"
                          + (f": final NELBO {rec['final_nelbo']:.4f} +- {rec['final_stderr']:.4f}" if ok else
                             f" (exit {proc.returncode}; log {d / p.name / 'sweep.log'})"), flush=True)
                    if not block:
                        return
            if not block and len(running) < max_parallel:
                return
            time.sleep(0.5)

    if max_parallel == 1:  # in this process: no interpreter start-up per run (seconds each on a busy machine)
        import torch
        torch.set_num_threads(threads)
        for p in pending:
            t0 = time.time()
            try:
                rec = work(d, p.name)
            except Exception as e:  # one broken run must not stop the sweep; it is reported and rerun next time
                failed.append(p.name)
                print(f"  FAILED {p.name}: {type(e).__name__}: {e}", flush=True)
                continue
            write_index(d)
            if not rec:  # SIGTERM/SIGUSR1: the run saved a checkpoint and stopped; so does the sweep
                print(f"  {p.name} stopped on a signal at its checkpoint; rerun the sweep to resume", flush=True)
                raise SystemExit(143)
            print(f"  done {p.name} in {time.time() - t0:.0f} s: final NELBO {rec['final_nelbo']:.4f} +- "
                  f"{rec['final_stderr']:.4f}", flush=True)
        pending = []
    for p in pending:
        while len(running) >= max_parallel:
            reap(block=False)
        (d / p.name).mkdir(parents=True, exist_ok=True)
        log = open(d / p.name / "sweep.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "launch.sweep", "worker", str(d), p.name,
                                 "--threads", str(threads)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        running.append((p, proc, time.time()))
    reap(block=True)
    index = write_index(d)
    print(f"sweep {spec['name']}: {len(plans) - len(failed)} of {len(plans)} runs in the index {index} "
          f"({(time.time() - t_sweep) / 60:.1f} min this invocation)" + (f"; failed: {', '.join(failed)}" if failed
                                                                            else ""))
    if failed:
        raise SystemExit(1)
    return index


# ----------------------------------------------------------------------------- slurm

def slurm_array(spec: dict, plans: list[RunPlan], *, nodes: int, gpus_per_node: int, time_limit: str,
                partition: Optional[str], account: Optional[str], qos: Optional[str], cpus_per_task: int,
                signal_lead: int, port: int, log_dir: str, python: str, setup: Optional[str],
                max_parallel: int = 0) -> str:
    """One array job, task i = exactly the script `python -m launch.slurm` writes for run i (srun + torchrun,
    requeue on preemption), selected by SLURM_ARRAY_TASK_ID."""
    from launch.slurm import render
    d = sweep_dir(spec)
    bodies, header = [], None
    for p in plans:
        script = render(nodes=nodes, gpus_per_node=gpus_per_node, config=str(d / "configs" / f"{p.name}.yaml"),
                        name=p.name, out_dir=str(d), overrides=[], time=time_limit, partition=partition,
                        account=account, qos=qos, cpus_per_task=cpus_per_task, signal_lead=signal_lead, port=port,
                        log_dir=log_dir, python=python, setup=setup)
        head, body = split_slurm_script(script)
        if header is None:
            header = head
        bodies.append(body)
    n = len(plans)
    sb = []
    for line in header:
        if line.startswith("#SBATCH --job-name="):
            line = f"#SBATCH --job-name={spec['name']}"
        elif line.startswith("#SBATCH --output="):
            line = f"#SBATCH --output={log_dir}/%x-%A_%a.out"
        sb.append(line)
    sb.append(f"#SBATCH --array=0-{n - 1}" + (f"%{max_parallel}" if max_parallel else ""))
    out = ["#!/bin/bash", *sb,
           f"# Generated by python -m launch.sweep for sweep {spec['name']} ({n} runs): task i runs the script",
           "# python -m launch.slurm writes for run i. After the array: python -m launch.sweep collect " + str(d),
           'case "$SLURM_ARRAY_TASK_ID" in']
    for i, (p, body) in enumerate(zip(plans, bodies)):
        out += [f"{i})  # {p.name}", *body, ";;"]
    out += ['*) echo "no run for array task $SLURM_ARRAY_TASK_ID"; exit 1 ;;', "esac"]
    return "\n".join(out) + "\n"


def collect_script(name: str, d: Path, *, gpus_per_node: int, log_dir: str, python: str,
                   setup: Optional[str]) -> str:
    """The job that evaluates every finished run of the array (one node; one GPU where the array has any)."""
    gpus = "#SBATCH --gpus-per-node=1\n" if gpus_per_node > 0 else ""
    return (f"#!/bin/bash\n#SBATCH --job-name={name}-collect\n#SBATCH --nodes=1\n#SBATCH --ntasks=1\n{gpus}"
            f"#SBATCH --time=04:00:00\n#SBATCH --output={log_dir}/%x-%j.out\n"
            + (f"{setup}\n" if setup else "") + f"{python} -m launch.sweep collect {d}\n")


def split_slurm_script(script: str) -> tuple[list[str], list[str]]:
    """(#SBATCH lines, the body after them) of a launch.slurm script."""
    lines = script.rstrip("\n").split("\n")
    assert lines[0].startswith("#!")
    k = 1
    while k < len(lines) and lines[k].startswith("#SBATCH"):
        k += 1
    return lines[1:k], lines[k:]


def array_task_bodies(array_script: str) -> list[list[str]]:
    """The per-task bodies of an array script written by slurm_array (for checking it)."""
    lines = array_script.rstrip("\n").split("\n")
    bodies, cur = [], None
    for line in lines:
        if cur is None and line[:1].isdigit() and ")  # " in line:
            cur = []
        elif cur is not None and line == ";;":
            bodies.append(cur)
            cur = None
        elif cur is not None:
            cur.append(line)
    return bodies


def collect(d: Path, ev_threads: int = 0) -> Path:
    """Evaluate every finished run of a sweep that has no result.json yet (after slurm), then write the index."""
    from pretrain.checkpoint.store import latest_checkpoint
    plan = json.loads((d / "plan.json").read_text())
    for r in plan["runs"]:
        ckpt = latest_checkpoint(d / r["name"] / "checkpoints")
        if (d / r["name"] / RESULT).is_file() or ckpt is None or int(ckpt.name.split("_")[-1]) < r["steps"]:
            continue
        work(d, r["name"], ev_threads)  # training is complete: train() returns at once, then it evaluates
    return write_index(d)


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plan", help="print the grid and check every run's config")
    pp.add_argument("sweep")
    pr = sub.add_parser("run", help="run the grid (local) or write its slurm array job")
    pr.add_argument("sweep")
    pr.add_argument("--backend", choices=("local", "slurm"), default="local")
    pr.add_argument("--max-parallel", type=int, default=1, help="local: runs at once; slurm: array throttle")
    pr.add_argument("--threads", type=int, default=1, help="local: torch threads per run (default 1: tiny models "
                    "gain nothing from more, and oversubscribed OpenMP threads on a shared CPU spin ~20x slower; "
                    "0: cores / max-parallel)")
    for flag, kw in (("--nodes", dict(type=int, default=1)), ("--gpus-per-node", dict(type=int, default=8)),
                     ("--time", dict(default="24:00:00")), ("--partition", {}), ("--account", {}), ("--qos", {}),
                     ("--cpus-per-task", dict(type=int, default=64)), ("--signal-lead", dict(type=int, default=300)),
                     ("--port", dict(type=int, default=29500)), ("--log-dir", dict(default="logs")),
                     ("--python", dict(default="python")), ("--setup", {})):
        pr.add_argument(flag, **kw)
    pw = sub.add_parser("worker", help=argparse.SUPPRESS)
    pw.add_argument("dir")
    pw.add_argument("run")
    pw.add_argument("--threads", type=int, default=0)
    pc = sub.add_parser("collect", help="evaluate finished runs and write the index (after a slurm sweep)")
    pc.add_argument("dir")
    a = ap.parse_args(argv)
    if a.cmd == "worker":
        work(Path(a.dir), a.run, a.threads)
        return
    if a.cmd == "collect":
        print(collect(Path(a.dir)))
        return
    try:
        spec = load_sweep(a.sweep)
        plans = make_plan(spec)
    except SweepError as e:
        ap.exit(2, f"sweep error: {e}\n")
    if a.cmd == "plan":
        print(plan_table(plans))
        return
    if a.max_parallel < 0 or (a.backend == "local" and a.max_parallel < 1):
        ap.error("--max-parallel must be >= 1")
    print(plan_table(plans))
    if a.backend == "local":
        run_local(spec, plans, a.max_parallel, a.threads)
        return
    d = write_plan(spec, plans)
    script = slurm_array(spec, plans, nodes=a.nodes, gpus_per_node=a.gpus_per_node, time_limit=a.time,
                         partition=a.partition, account=a.account, qos=a.qos, cpus_per_task=a.cpus_per_task,
                         signal_lead=a.signal_lead, port=a.port, log_dir=a.log_dir, python=a.python, setup=a.setup,
                         max_parallel=a.max_parallel if a.max_parallel > 1 else 0)
    (d / "sweep.sbatch").write_text(script)
    (d / "collect.sbatch").write_text(collect_script(spec["name"], d, gpus_per_node=a.gpus_per_node,
                                                     log_dir=a.log_dir, python=a.python, setup=a.setup))
    from launch.slurm import make_log_dir
    make_log_dir(a.log_dir)  # both jobs' --output folder: slurm kills a job whose folder is missing
    print(f"wrote {d / 'sweep.sbatch'} ({len(plans)} array tasks) and {d / 'collect.sbatch'}; submit with\n"
          f"  jid=$(sbatch --parsable {d / 'sweep.sbatch'}) && sbatch --dependency=afterany:$jid "
          f"{d / 'collect.sbatch'}")


if __name__ == "__main__":
    main()
