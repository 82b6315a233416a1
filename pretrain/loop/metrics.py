"""Where numbers go: a JSONL file always, the console on rank 0, wandb when configured; and the mean over
ranks that the logged losses are."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from data.dist import distributed, world_size


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over all ranks (a new tensor; `x` itself outside torch.distributed)."""
    if distributed():
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


class MetricLogger:
    def __init__(self, run_dir: Path, *, rank: int, wandb_mode: str = "disabled", project: str = "unmask",
                 name: str = "run", config: Optional[dict] = None):
        self.rank = rank
        self.file = None
        if rank == 0:
            _drop_torn_line(run_dir / "metrics.jsonl")
            self.file = open(run_dir / "metrics.jsonl", "a")
        self.wandb = None
        if rank == 0 and wandb_mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=project, name=name, mode=wandb_mode, dir=str(run_dir),
                                    config=config, resume="allow")

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_torn_line(path: Path) -> None:
    """A run killed mid-write leaves a partial last line; cut it off before appending (a resumed run re-logs
    that step), so it never ends up in the middle of the file."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()  # a record is far shorter than 1 MiB
        if tail and not tail.endswith(b"\n"):
            f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
