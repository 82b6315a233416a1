"""Checkpoints with torch.distributed.checkpoint: sharded, resharded on load, written atomically.

Layout: <run>/checkpoints/step_00001000/ holds the shards plus trainer_state.json. A checkpoint is written
into step_XXXXXXXX.tmp and renamed only after every rank finished and the trainer state was flushed, so a
crash mid-save (a kill during an asynchronous write included) leaves the previous checkpoint intact and the
half-written one ignored (and removed by the next save of that step).

What a checkpoint holds, and why that is everything:
- model and optimizer state (DCP, one entry per parameter in its global shape, so it loads into any DP/TP
  layout: DCP reads each rank's slice of every saved tensor);
- trainer_state.json: step, `consumed` (the loader's whole state: the global sample position), seed, engine,
  world size, the config. The LR schedule is a pure function of the step and every random draw of a step is a
  pure function of (seed, step) (pretrain/diffusion.py), so there is no scheduler or RNG state to save:
  resuming, under any layout, reproduces them exactly.

The DeepSpeed engine writes its own format into the same directory scheme (pretrain/deepspeed_engine.py);
`engine` in trainer_state.json says which, and loading one with the other is refused with an explanation.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# DCP warns on every single-process save/load; single-process use is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class EngineMismatch(RuntimeError):
    """A checkpoint written by one engine (native / deepspeed) was given to the other."""


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state), oldest first."""
    ckpt_dir = Path(ckpt_dir)
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


def check_engine(path: Path, state: dict, engine: str) -> None:
    written_by = state.get("engine", "native")
    if written_by != engine:
        raise EngineMismatch(
            f"{path} was written by the {written_by} engine but this run uses parallel.engine={engine}. The two "
            f"store optimizer state differently, so training cannot resume across engines. Resume with "
            f"parallel.engine={written_by}, or start a new run from its weights only: "
            f"python -m pretrain.export {path} (then train.resume=none and load the exported weights).")


class Checkpointer:
    def __init__(self, ckpt_dir: Path, keep: int = 2, async_save: bool = False, process_group=None):
        """process_group: a gloo group for the asynchronous writer's collectives (see parallel.cpu_group), so
        the background thread never interleaves with the training collectives on the default group."""
        self.dir, self.keep, self.async_save = Path(ckpt_dir), keep, async_save
        self.process_group = process_group
        self._pending = None  # (future, tmp, final, trainer_state)

    def stage(self, step: int) -> tuple[Path, Path]:
        """(temporary directory to write into, final name). Any leftover of an interrupted save is removed."""
        self.wait()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if _rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        return tmp, final

    def save(self, step: int, model, optimizer, trainer_state: dict, *, blocking: bool = False) -> Path:
        """blocking: write synchronously even when async saves are on (the last save before exiting)."""
        tmp, final = self.stage(step)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save and not blocking:
            # Copies the state to host memory now, writes it in a background thread; training continues.
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.process_group)
            self._pending = (future, tmp, final, trainer_state)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self.commit(tmp, final, trainer_state)
        return final

    def wait(self) -> None:
        """Block until an asynchronous save has been committed."""
        if self._pending is None:
            return
        future, tmp, final, trainer_state = self._pending
        self._pending = None
        upload = getattr(future, "upload_completion", future)  # AsyncSaveResponse or a plain Future
        upload.result()
        self.commit(tmp, final, trainer_state)

    def commit(self, tmp: Path, final: Path, trainer_state: dict) -> None:
        """Every rank's shards are in `tmp`: write the trainer state last, then rename (atomic on POSIX)."""
        _barrier()
        if _rank() == 0:
            state_path = tmp / STATE_FILE
            with open(state_path, "w") as f:
                json.dump(trainer_state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            for old in list_checkpoints(self.dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def load(self, path: Path, model, optimizer, engine: str = "native") -> dict:
        path = Path(path)
        trainer_state = read_trainer_state(path)
        check_engine(path, trainer_state, engine)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return trainer_state


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _deepspeed_full_state(path: Path) -> dict:
    """fp32 weights of a DeepSpeed ZeRO checkpoint, reassembled on the CPU from its partitions."""
    from .deepspeed_engine import consolidated_state_dict
    return consolidated_state_dict(path)


def load_model_weights(path: Path, model) -> None:
    """Load only the model from a checkpoint (any layout, either engine) into `model` (any layout)."""
    path = Path(path)
    state = read_trainer_state(path) if (path / STATE_FILE).is_file() else {}
    if state.get("engine", "native") == "deepspeed":
        full = _deepspeed_full_state(path)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(path))
    set_model_state_dict(model, sd, options=StateDictOptions(strict=True))


def export_safetensors(path: Path, model, out_file: Path, dtype: Optional[torch.dtype] = None) -> None:
    """Load checkpoint `path` into `model` (any layout) and write its full weights to one safetensors file
    (rank 0 writes, atomically). dtype: cast floating tensors (e.g. bf16 to halve the file), None keeps fp32."""
    from safetensors.torch import save_file
    load_model_weights(path, model)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        out_file = Path(out_file)
        tmp = out_file.with_suffix(out_file.suffix + ".tmp")
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                   for k, v in sd.items()}
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_file)
    _barrier()


__all__ = ["Checkpointer", "EngineMismatch", "check_engine", "export_safetensors", "latest_checkpoint",
           "list_checkpoints", "load_model_weights", "read_trainer_state"]
