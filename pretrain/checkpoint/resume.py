"""Resuming a run: which checkpoint, rolling back, and what a resumed run may change.

- `select_checkpoints`: rank 0 lists the candidates (newest first) and broadcasts them, so every rank loads the
  same one; train() tries them in order and falls back, loudly, past a checkpoint that fails to load.
- `roll_back`: resuming from an older checkpoint of the run itself moves the newer ones aside into
  checkpoints/abandoned-<time>/ (never deleted), so later `resume=auto` requeues continue the rollback and
  rotation never touches the rollback's own saves.
- `compare_configs`: the saved config against the new one. Keys that would corrupt the run (the model, the
  data and its order, the objective) stop it with every changed key listed; keys users change on purpose
  after a blow-up (learning rate, schedule, steps, clipping, intervals) are allowed and logged;
  `train.allow_config_change` names keys to accept anyway.

A changed step count or schedule continues from the LR the run had instead of jumping to the new schedule's
value at that step: that is the loop's (pretrain/loop/lr.py: continue_schedule, lr_for).

`python -m pretrain.checkpoint.resume RUN_DIR --rollback STEP` performs the rollback without training (for a
job that is requeued with `train.resume=auto`).
"""
from __future__ import annotations

import argparse
import difflib
import json
import shutil
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional

from data.dist import rank

from ..config import Config, ConfigError, PrepareConfig, SourceConfig, to_dict
from .store import (STATE_FILE, CheckpointError, CorruptCheckpoint, barrier, broadcast_from_rank0, clean_stale,
                    list_checkpoints, read_trainer_state, step_of)

# Changed on purpose after a blow-up or to extend a run: allowed, logged.
INTENTIONAL = {
    "optim.lr", "optim.min_lr", "optim.schedule", "optim.warmup_steps", "optim.decay_fraction", "optim.grad_clip",
    "optim.weight_decay", "optim.betas", "optim.eps", "train.steps", "train.eval_every", "train.eval_batches",
    "train.log_every", "train.save_every", "train.keep_checkpoints", "train.keep_every", "train.max_bad_steps",
    "train.loss_spike_factor", "train.loss_spike_window", "data.extra_valid", "data.extra_valid_doc_split",
}
# Operational: how this attempt runs, not what it computes. Layouts reshard on load; a checkpoint of the other
# engine is refused by the engine itself, with its own explanation (store.check_engine). Allowed silently.
OPERATIONAL_PREFIXES = ("logging.", "parallel.", "model.attn_backend", "model.init_std", "diffusion.ce_chunk",
                        "model.ce_chunk", "train.resume", "train.stop_after", "train.name", "train.out_dir", "train.device",
                        "train.threads", "train.peak_flops", "train.allow_config_change", "train.verify_checkpoint",
                        "train.preempt_grace_s", "train.micro_batch_size", "train.dtype", "train.samples",
                        "train.sample_steps", "train.sample_temperature", "data.prepare.workers",
                        "data.prepare.streaming", "data.prepare.bpe_sample_bytes")


def flatten(tree, prefix: str = "") -> dict:
    """Nested config dict -> {dotted key: value}; lists are compared whole."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def known_keys() -> set[str]:
    """Every dotted config key (optional sections included), for checking train.allow_config_change."""
    keys = set(flatten(to_dict(Config())))
    keys |= {f"data.prepare.{k}" for k in to_dict(PrepareConfig())} | {"data.prepare"}
    keys |= {f"data.sources.{k}" for k in to_dict(SourceConfig())} | {"data.sources"}
    return keys


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "[") for n in names)


def compare_configs(saved: dict, new: dict, allow: list[str] = ()) -> list[tuple[str, object, object, str]]:
    """Changes from the saved config (a checkpoint's) to the new one, as (key, old, new, kind) with kind
    "intentional", "operational" or "allowed" (named in `allow`). Raises ConfigError listing every change
    that would corrupt the run. Keys absent from the saved config (added to unmask since) are not compared."""
    keys = known_keys()
    unknown = [a for a in allow if not _covered(a, keys) and not any(k.startswith(a + ".") for k in keys)]
    if unknown:
        hints = [f"{a} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(a, known_keys(), n=1)) else a
                 for a in unknown]
        raise ConfigError(f"train.allow_config_change names unknown keys: {', '.join(hints)}")
    old_flat, new_flat = flatten(saved), flatten(new)
    changes, fatal = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key not in old_flat:
            continue
        a, b = old_flat.get(key), new_flat.get(key)
        if same_value(a, b):
            continue
        if key in INTENTIONAL:
            changes.append((key, a, b, "intentional"))
        elif key.startswith(OPERATIONAL_PREFIXES):
            changes.append((key, a, b, "operational"))
        elif _covered(key, allow):
            changes.append((key, a, b, "allowed"))
        else:
            fatal.append((key, a, b))
    if fatal:
        lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in fatal)
        raise ConfigError(
            f"the resumed run's config differs from its checkpoint's in keys that would corrupt it (model shape, "
            f"tokenizer or vocabulary, data, sequence length, seed, batch, objective):\n{lines}\n"
            f"Restore them (the checkpoint's config is under config in its trainer_state.json), start a new run "
            f"(another train.name, or train.resume=none), or accept them knowingly: "
            f"train.allow_config_change=[{','.join(k for k, _, _ in fatal)}]")
    return changes


def same_value(a, b) -> bool:
    """Whether two config values are equal (numbers by value, lists element by element)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


# ----------------------------------------------------------------------------- choosing and rolling back

def select_checkpoints(ckpt_dir: Path, resume: str, group=None) -> list[Path]:
    """Checkpoints to try, in order, as decided on rank 0 and broadcast: for resume=auto every complete one,
    newest first (the first that loads wins); for a path, only that one; for none, nothing."""
    choice = None
    if rank() == 0:
        if resume == "none":
            choice = []
        elif resume == "auto":
            choice = [str(p) for p in reversed(list_checkpoints(ckpt_dir))]
        else:
            choice = [resume]
    return [Path(p) for p in broadcast_from_rank0(choice, group)]


def newer_than(ckpt_dir: Path, target: Path) -> list[Path]:
    """The run's checkpoints newer than `target`, when `target` is one of the run's own checkpoints."""
    ckpt_dir, target = Path(ckpt_dir), Path(target)
    try:
        if target.resolve().parent != ckpt_dir.resolve():
            return []
        s = step_of(target)
    except (ValueError, OSError):
        return []
    return [p for p in list_checkpoints(ckpt_dir) if step_of(p) > s]


def roll_back(ckpt_dir: Path, target: Path) -> Optional[Path]:
    """Move the checkpoints newer than `target` (and any incomplete save) into checkpoints/abandoned-<time>/.
    Returns that folder, or None when there was nothing newer. Rank 0 only."""
    newer = newer_than(ckpt_dir, target)
    if not newer:
        return None
    aside = Path(ckpt_dir) / time.strftime("abandoned-%Y%m%d-%H%M%S", time.gmtime())
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
        n += 1
    aside.mkdir()
    for p in newer:
        shutil.move(str(p), str(aside / p.name))
    return aside


def record_rollback(run_dir: Path, target: Path, aside: Optional[Path], log=None) -> dict:
    """The rollback as a metrics record (in metrics.jsonl through `log`, or appended directly)."""
    record = {"step": step_of(target), "event": "rollback", "rollback_to": str(target),
              "abandoned": str(aside) if aside else None, "time": time.time()}
    if log is not None:
        log.log(record)
    else:
        with open(Path(run_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def rollback_path(run_dir: Path, step: int) -> Path:
    """The checkpoint of `step` in a run directory, with a clear error when there is none."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    target = ckpt_dir / f"step_{step:08d}"
    if target not in list_checkpoints(ckpt_dir):
        have = ", ".join(str(step_of(p)) for p in list_checkpoints(ckpt_dir)) or "none"
        raise ConfigError(f"--rollback {step}: {target} is not a complete checkpoint of this run (steps with "
                          f"one: {have})")
    return target


@dataclass
class ResumePlan:
    """What a run resumes from, decided before anything is written (see plan_resume)."""
    candidates: list[Path] = field(default_factory=list)  # tried in order; the first that loads wins
    fallback: bool = False  # resume=auto: a checkpoint that fails to load is skipped for the previous one
    rollback: Optional[tuple[Path, Optional[Path]]] = None  # (target, folder the newer ones moved to)


@dataclass
class Resumed:
    path: Optional[Path] = None
    state: dict = field(default_factory=dict)
    changes: list = field(default_factory=list)  # (key, old, new, kind) from compare_configs
    failed: list = field(default_factory=list)  # (checkpoint, why) skipped on the way


def check_state(state: dict, cfg: Config, fingerprint: Optional[str] = None) -> list:
    """compare_configs on a checkpoint's trainer state, plus its tokenizer: a checkpoint's embeddings mean the
    ids of the tokenizer it was trained with, whatever the config says."""
    saved = state.get("data_fingerprint")
    if saved and fingerprint and saved != fingerprint:
        raise ConfigError(f"the checkpoint was trained with tokenizer {saved} but the data now uses {fingerprint}: "
                          f"its embeddings would read the ids wrongly. Prepare the data with the run's "
                          f"tokenizer.json, or start a new run (another train.name, or train.resume=none)")
    return compare_configs(state.get("config", {}), to_dict(cfg), cfg.train.allow_config_change)


def plan_resume(cfg: Config, run_dir: Path, group=None, fingerprint: Optional[str] = None) -> ResumePlan:
    """Collective, before the run writes anything: clean stale .tmp folders, choose the checkpoints (rank 0,
    broadcast), perform a requested rollback, and check the config against the chosen checkpoint's (a fatal
    difference raises ConfigError here, so the run directory is left as it was)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    rank0 = rank() == 0
    if rank0:
        for p in clean_stale(ckpt_dir):
            print(f"removed {p}: the leftover of an interrupted save")
    candidates = select_checkpoints(ckpt_dir, cfg.train.resume, group)
    plan = ResumePlan(candidates=candidates, fallback=cfg.train.resume == "auto")
    if candidates and not plan.fallback:
        target = candidates[0]
        if not (target / STATE_FILE).is_file():
            have = ", ".join(p.name for p in list_checkpoints(ckpt_dir)) or "none"
            raise ConfigError(f"train.resume={cfg.train.resume}: not a complete checkpoint (no {STATE_FILE}); "
                              f"complete checkpoints of this run: {have}")
        check_state(read_trainer_state(target), cfg, fingerprint)
        moved = roll_back(ckpt_dir, target) if rank0 else None
        aside = broadcast_from_rank0(str(moved) if moved else None, group)
        if aside:
            plan.rollback = (target, Path(aside))
    elif candidates:
        try:
            saved = read_trainer_state(candidates[0])
        except CheckpointError:
            saved = None  # unreadable: the load loop reports it and falls back
        if saved is not None:
            check_state(saved, cfg, fingerprint)
    return plan


def load_resumed(engine, plan: ResumePlan, cfg: Config, warn=print, fingerprint: Optional[str] = None) -> Resumed:
    """Load the first candidate that loads (collective). With resume=auto a corrupt or unreadable checkpoint
    is reported and moved into checkpoints/corrupt/, and the previous one is tried; an explicitly named
    checkpoint that fails is an error."""
    out = Resumed()
    for path in plan.candidates:
        try:
            state = read_trainer_state(path)
            out.changes = check_state(state, cfg, fingerprint)
            state = engine.load(path)
        except (CorruptCheckpoint, FileNotFoundError) as e:
            if not plan.fallback:
                raise CheckpointError(f"train.resume={path} cannot be loaded: {e}") from None
            out.failed.append((path, str(e)))
            warn(f"WARNING: {e}\nWARNING: moved it to {path.parent / 'corrupt'}/ and falling back to the previous "
                 f"complete checkpoint")
            if rank() == 0:
                shelf = path.parent / "corrupt"
                shelf.mkdir(exist_ok=True)
                shutil.move(str(path), str(shelf / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"))
            barrier()
            continue
        out.path, out.state = path, state
        return out
    if plan.candidates:
        raise CheckpointError("no checkpoint of this run could be loaded: " +
                              "; ".join(f"{p.name}: {why}" for p, why in out.failed) +
                              ". Start afresh with train.resume=none (the checkpoints were moved to "
                              "checkpoints/corrupt/)")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.checkpoint.resume",
                                 description="Roll a run back to one of its checkpoints without training: newer "
                                 "checkpoints move to checkpoints/abandoned-<time>/, so the next "
                                 "train.resume=auto (a requeued job) continues from STEP.")
    ap.add_argument("run_dir")
    ap.add_argument("--rollback", type=int, required=True, metavar="STEP")
    args = ap.parse_args(argv)
    try:
        target = rollback_path(Path(args.run_dir), args.rollback)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    aside = roll_back(target.parent, target)
    record_rollback(Path(args.run_dir), target, aside)
    print(f"rolled back to {target}" + (f"; newer checkpoints moved to {aside}" if aside else
                                          " (it already was the newest)"))


if __name__ == "__main__":
    main()
