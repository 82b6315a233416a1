"""Where numbers go: a JSONL file always, the console on rank 0, wandb when configured."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


class MetricLogger:
    def __init__(self, run_dir: Path, *, rank: int, wandb_mode: str = "disabled", project: str = "unmask",
                 name: str = "run", config: Optional[dict] = None):
        self.rank = rank
        self.file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
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
