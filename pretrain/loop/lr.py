"""Learning-rate schedules as pure functions of the step (so the scheduler's state is the step).

`lr_at` is the configured schedule; `lr_for` the learning rate the loop sets, which after a resume that changed
the step count or the schedule continues from the LR the run had (`continue_schedule` anchors it) instead of
jumping to the new schedule's value at that step.
"""
from __future__ import annotations

import math
from typing import Optional

from ..checkpoint.resume import flatten, same_value
from ..config import Config, to_dict

# What changes the learning-rate curve's shape (a change here re-anchors the schedule at the resume step).
SCHEDULE_KEYS = ("train.steps", "optim.schedule", "optim.warmup_steps", "optim.decay_fraction")


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str,
          decay_fraction: float = 0.2) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":  # warmup, stable at lr, then linear decay to min_lr over the last decay_fraction
        decay_steps = int(round(decay_fraction * total))
        decay_start = total - decay_steps
        if step < decay_start or decay_steps == 0:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    raise ValueError(f"unknown optim.schedule {schedule!r}; choices: cosine, wsd, constant")


def lr_for(step: int, optim, steps: int, anchor: Optional[dict] = None) -> float:
    """The learning rate at `step`: the configured schedule, or, after a resume that changed the schedule
    (anchor {"step": s0, "frac": f}), the new schedule's shape over the remaining steps s0..steps, starting
    from the fraction f of the way between min_lr and lr that the run had reached at s0."""
    base = dict(lr=optim.lr, min_lr=optim.min_lr, warmup=optim.warmup_steps, total=steps, schedule=optim.schedule,
                decay_fraction=optim.decay_fraction)
    if anchor is None or step < anchor["step"] or optim.schedule == "constant" and anchor["frac"] >= 1:
        return lr_at(step, **base)
    s0, frac = anchor["step"], anchor["frac"]
    remaining = max(1, steps - s0)
    progress = min(1.0, (step - s0) / remaining)
    if optim.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    elif optim.schedule == "wsd":
        decay_start = max(s0, steps - int(round(optim.decay_fraction * steps)))
        shape = 1.0 if step < decay_start else 1.0 - min(1.0, (step - decay_start + 1) / max(1, steps - decay_start))
    else:  # constant: hold the LR the run had
        shape = 1.0
    return optim.min_lr + (optim.lr - optim.min_lr) * frac * shape


def continue_schedule(saved_cfg: dict, cfg: Config, step: int, anchor: Optional[dict]) -> Optional[dict]:
    """The schedule anchor for a resumed run: unchanged unless a schedule-shaping key changed, then re-anchored
    at `step` on the LR the old schedule gave there (scaled by a changed optim.lr), so the LR does not jump."""
    old = flatten(saved_cfg)
    new = flatten(to_dict(cfg))
    if all(k not in old or same_value(old[k], new[k]) for k in SCHEDULE_KEYS):
        return anchor
    if step < cfg.optim.warmup_steps or cfg.optim.lr <= cfg.optim.min_lr:
        return None  # warmup is the same ramp whatever the total; a flat schedule has nothing to continue

    class _Old:  # the saved optimizer settings, as lr_for reads them
        lr, min_lr = old["optim.lr"], old["optim.min_lr"]
        warmup_steps, schedule = old["optim.warmup_steps"], old["optim.schedule"]
        decay_fraction = old.get("optim.decay_fraction", 0.2)
    was = lr_for(step, _Old, old["train.steps"], anchor)
    scaled = was * cfg.optim.lr / _Old.lr if _Old.lr > 0 else was
    frac = (scaled - cfg.optim.min_lr) / (cfg.optim.lr - cfg.optim.min_lr)
    return {"step": step, "frac": min(1.0, max(0.0, frac))}
