"""Preemption: SIGUSR1 / SIGTERM -> finish the current step, checkpoint, exit so the scheduler requeues.

Slurm sends SIGUSR1 ahead of the time limit (`--signal=USR1@300`, see launch/slurm.py) and SIGTERM on
preemption or cancel. The handler only sets a flag; the loop asks `requested()` once per step, which ORs the
flag across all ranks (signals reach ranks at slightly different times, and a checkpoint is collective: every
rank must stop after the same step). On stop, rank 0 writes `<run>/PREEMPTED`, the marker the sbatch script
reads to requeue the job; the requeued job resumes from the latest checkpoint (train.resume=auto).
"""
from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "PREEMPTED"
SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)


class Preemption:
    def __init__(self, run_dir: Path, rank: int, group=None):
        """group: a gloo group (parallel.cpu_group) so the per-step agreement is a host-side all-reduce that
        never waits on the GPU stream."""
        self.run_dir, self.rank, self.group = Path(run_dir), rank, group
        self.signum = None
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
        self.signum = signum

    def requested(self) -> bool:
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def mark(self) -> None:
        """The run stopped early on a signal and has a checkpoint to resume from."""
        if self.rank == 0:
            name = signal.Signals(self.signum).name if self.signum is not None else "another rank's signal"
            (self.run_dir / MARKER).write_text(f"{name}\n")

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
