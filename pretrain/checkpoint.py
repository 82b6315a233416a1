"""Checkpoints with torch.distributed.checkpoint: sharded, resharded on load, written atomically.

Layout: <run>/checkpoints/step_00001000/ holds the DCP shards plus trainer_state.json. A checkpoint is
written into step_XXXXXXXX.tmp and renamed only after every rank finished and the trainer state was
flushed, so a crash mid-save leaves the previous checkpoint intact and the half-written one ignored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import warnings

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# DCP warns on every single-process save/load; single-process use is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete unmask checkpoint (no {STATE_FILE})")
    return json.loads(state_file.read_text())


class Checkpointer:
    def __init__(self, ckpt_dir: Path, keep: int = 2, async_save: bool = False):
        self.dir, self.keep, self.async_save = Path(ckpt_dir), keep, async_save
        self._pending = None  # (future, tmp, final, trainer_state)

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        self.wait()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if _rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp))
            self._pending = (future, tmp, final, trainer_state)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finish(tmp, final, trainer_state)
        return final

    def wait(self) -> None:
        """Block until an asynchronous save has been committed."""
        if self._pending is None:
            return
        future, tmp, final, trainer_state = self._pending
        self._pending = None
        future.result()
        self._finish(tmp, final, trainer_state)

    def _finish(self, tmp: Path, final: Path, trainer_state: dict) -> None:
        _barrier()  # every rank's shards are on disk
        if _rank() == 0:
            state_path = tmp / STATE_FILE
            with open(state_path, "w") as f:
                json.dump(trainer_state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def load(self, path: Path, model, optimizer) -> dict:
        trainer_state = read_trainer_state(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return trainer_state


def load_model_weights(path: Path, model) -> None:
    """Load only the model from a checkpoint (any layout it was saved in) into `model` (any layout)."""
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(path))
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, sd, options=StateDictOptions(strict=True))


def export_safetensors(path: Path, model, out_file: Path) -> None:
    """Consolidate the model's full weights into one safetensors file (rank 0 writes)."""
    from safetensors.torch import save_file
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        tmp = out_file.with_suffix(out_file.suffix + ".tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        os.replace(tmp, out_file)
    _barrier()


__all__ = ["Checkpointer", "export_safetensors", "latest_checkpoint", "list_checkpoints", "load_model_weights",
           "read_trainer_state"]
