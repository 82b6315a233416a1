"""Bad steps: a non-finite loss or gradient norm on any rank skips that step's update on every rank.

`BadStepGuard.verdict(loss, grad_norm)` is called between the gradient norm and the optimizer step (the
engines' `step(guard=...)`). It is collective: the loss is averaged over all ranks (a NaN anywhere makes it
NaN everywhere) and the gradient norm is already global, so every rank reaches the same decision. A skipped
step drops its gradients and leaves the weights, the optimizer state (and the EMA) untouched; the step
counter and the data position still advance, so a resumed run skips the same batch and stays exact.

The optional loss-spike guard (train.loss_spike_factor = k > 0) also skips a step whose loss exceeds k times
the median of the last train.loss_spike_window good steps. Its history is part of the trainer state.

After train.max_bad_steps consecutive bad steps the run stops (TooManyBadSteps) with the step and a rollback
suggestion: skipping cannot fix weights or data that keep producing them.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

import torch

from .metrics import all_reduce_mean


class TooManyBadSteps(RuntimeError):
    """train.max_bad_steps consecutive steps were skipped."""


class BadStepGuard:
    def __init__(self, max_bad_steps: int = 10, spike_factor: float = 0.0, spike_window: int = 100,
                 state: Optional[dict] = None):
        self.max_bad_steps, self.spike_factor = max_bad_steps, spike_factor
        self.history: deque = deque(maxlen=max(1, spike_window))
        self.consecutive, self.total = 0, 0
        if state:
            self.consecutive, self.total = state.get("consecutive", 0), state.get("total", 0)
            self.history.extend(state.get("history", []))
        self.last_reason = ""

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run makes the same decisions."""
        return {"consecutive": self.consecutive, "total": self.total, "history": list(self.history)}

    def verdict(self, loss: torch.Tensor, grad_norm) -> str:
        """"" when the step may update the weights, else why not. Collective (one small all-reduce and one
        device-to-host copy per step)."""
        loss = all_reduce_mean(loss.detach().float())
        gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        gn = torch.as_tensor(gn, dtype=torch.float32, device=loss.device)
        loss_v, gn_v = torch.stack([loss, gn.detach().float()]).tolist()
        reason = ""
        if not math.isfinite(loss_v):
            reason = f"non-finite loss ({loss_v})"
        elif not math.isfinite(gn_v):
            reason = f"non-finite gradient norm ({gn_v})"
        elif self.spike_factor > 0 and len(self.history) >= min(10, self.history.maxlen):
            median = statistics.median(self.history)
            if loss_v > self.spike_factor * median:
                reason = f"loss spike ({loss_v:.4f} > {self.spike_factor:g} x running median {median:.4f})"
        if reason:
            self.consecutive += 1
            self.total += 1
        else:
            self.consecutive = 0
            self.history.append(loss_v)
        self.last_reason = reason
        return reason

    def check_limit(self, step: int, checkpoint_steps: list[int]) -> None:
        """Stop the run after max_bad_steps consecutive bad steps. `step`: the step just skipped (1-based, as
        logged); `checkpoint_steps`: the run's checkpoints, the newest from before the streak is suggested."""
        if self.max_bad_steps > 0 and self.consecutive >= self.max_bad_steps:
            first = step - self.consecutive + 1
            last_good = max((s for s in checkpoint_steps if s < first), default=None)
            back = f"--rollback {last_good}" if last_good is not None else "train.resume=none (no checkpoint yet)"
            raise TooManyBadSteps(
                f"steps {first}..{step} were all skipped ({self.consecutive} consecutive bad steps, the limit "
                f"train.max_bad_steps={self.max_bad_steps}; the last: {self.last_reason}). Skipping cannot fix "
                f"this: roll back to an earlier checkpoint with a lower learning rate, e.g. python -m pretrain "
                f"--config ... {back} optim.lr=<lower>")
