"""Learning-rate schedules as pure functions of the step (so the scheduler's state is the step)."""
from __future__ import annotations

import math


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
