"""Preemption: SIGUSR1 / SIGTERM -> finish the current step, checkpoint if there is time, exit for a requeue.

Slurm sends SIGUSR1 ahead of the time limit (`--signal=USR1@<lead>`, see launch/slurm.py) and SIGTERM on
preemption or cancel, followed by SIGKILL after the cluster's KillWait. The handler only sets a flag (and
the time); the loop asks `requested()` after every step, which ORs the flag across all ranks (signals reach
ranks at slightly different times, and a checkpoint is collective: every rank must stop after the same step).

On SIGUSR1 the run always saves: the lead time is chosen to cover a step plus a save. On SIGTERM with
train.preempt_grace_s = g > 0 the run saves only if the measured save time still fits before g seconds after
the signal, and otherwise exits at once, so the previous checkpoint stays the latest instead of a save being
cut by SIGKILL (harmless too, saves are atomic, but it wastes the grace period). Either way rank 0 writes
`<run>/PREEMPTED`, the marker the sbatch script reads to requeue the job; the requeued job resumes from the
latest checkpoint (train.resume=auto).
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.dist import distributed

MARKER = "PREEMPTED"
SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)


class Preemption:
    def __init__(self, run_dir: Path, rank: int, group=None, grace_s: float = 0.0):
        """group: a gloo group (parallel.cpu_group) so the per-step agreement is a host-side all-reduce that
        never waits on the GPU stream. grace_s: seconds between SIGTERM and SIGKILL (0: unknown, always save)."""
        self.run_dir, self.rank, self.group, self.grace_s = Path(run_dir), rank, group, grace_s
        self.signum = None
        self.signal_time = None
        self.terminated = False  # agreed across ranks: some rank got SIGTERM
        self.elapsed = 0.0  # agreed: seconds since the earliest signal
        self.save_estimate = 0.0  # agreed: the longest measured save time of any rank
        self._previous = {}

    def install(self) -> "Preemption":
        if self.rank == 0:
            (self.run_dir / MARKER).unlink(missing_ok=True)  # a fresh (or requeued) job starts unmarked
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. training called from a worker thread): no handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None or signum == signal.SIGTERM:
            self.signal_time = self.signal_time or time.monotonic()
            self.signum = signum

    def requested(self, save_estimate_s: float = 0.0) -> bool:
        """Collective, once per step: whether any rank got a signal. Also agrees on whether it was SIGTERM,
        the time since the earliest signal and the save-time estimate, so should_save() is the same on every
        rank."""
        got = self.signum is not None
        since = time.monotonic() - self.signal_time if got and self.signal_time is not None else 0.0
        flags = torch.tensor([float(got), float(self.signum == signal.SIGTERM), since, float(save_estimate_s)],
                             dtype=torch.float64)
        if distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        got, term, self.elapsed, self.save_estimate = flags.tolist()
        self.terminated = bool(term)
        return bool(got)

    def should_save(self) -> bool:
        """Save before exiting? Always on SIGUSR1 or with no grace period configured; on SIGTERM only if the
        measured save time (with a 20% margin) ends before the grace period does."""
        if not self.terminated or self.grace_s <= 0:
            return True
        return self.elapsed + 1.2 * self.save_estimate <= self.grace_s

    def mark(self, saved: bool = True, latest: str = "") -> None:
        """The run stopped early on a signal: the requeue marker, with what the requeued job will resume from."""
        if self.rank == 0:
            name = signal.Signals(self.signum).name if self.signum is not None else "another rank's signal"
            what = "checkpoint saved" if saved else (f"no time to save within the {self.grace_s:g} s grace period "
                                                     f"(a save takes ~{self.save_estimate:.1f} s)")
            (self.run_dir / MARKER).write_text(f"{name}\n{what}; resume from {latest or 'the start'}\n")

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
