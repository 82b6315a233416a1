"""Checkpoints with torch.distributed.checkpoint: sharded, resharded on load, written atomically, verified.

Layout: <run>/checkpoints/step_00001000/ holds the shards, trainer_state.json and manifest.json. A checkpoint
is written into step_XXXXXXXX.tmp and renamed only after every rank finished and the trainer state and the
manifest were flushed, so a crash mid-save (a kill during an asynchronous write included) leaves the previous
checkpoint intact and the half-written one ignored (stale .tmp folders are removed when a run starts).

What a checkpoint holds, and why that is everything:
- model and optimizer state (DCP, one entry per parameter in its global shape, so it loads into any DP/TP
  layout: DCP reads each rank's slice of every saved tensor);
- trainer_state.json: step, `consumed` (the loader's whole state: the global sample position), seed, engine,
  world size, the config. The LR schedule is a pure function of the step and every random draw of a step is a
  pure function of (seed, step) (model/objectives: the objective's `draw`), so there is no scheduler or RNG state to save:
  resuming, under any layout, reproduces them exactly;
- manifest.json: the size and SHA-256 of every other file, written at commit and checked before loading
  (the ranks hash disjoint shares of the files, so the cost is spread over the job).

Failures are collective: a failed write or commit on any rank (a full disk, a lost mount) is raised on every
rank at once as a CheckpointError naming the checkpoint and the cause, instead of leaving the others in a
barrier until the collective timeout. Rotation keeps the newest `keep` checkpoints plus every
`keep_every`-th step as a milestone that is never rotated away.

The DeepSpeed engine writes its own format into the same directory scheme (pretrain/engines/deepspeed.py);
`engine` in trainer_state.json says which, and loading one with the other is refused with an explanation.
Reading the weights of either kind (evaluation, export, train.init_from) is pretrain/checkpoint/weights.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data.dist import distributed, rank, world_size

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^step_(\d+)\.tmp$")
# DCP's collective failure type derives from BaseException; these are the failures a save or load can have.
_FAILURES = (Exception, CheckpointException)
# DCP warns on every single-process save/load; single-process use is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class EngineMismatch(RuntimeError):
    """A checkpoint written by one engine (native / deepspeed) was given to the other."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous one stays the latest) or not be read."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest (missing, truncated or altered)."""


def barrier(group=None):
    if distributed():
        dist.barrier(group=group)


def _all_gather(obj, group=None) -> list:
    """Every rank's `obj` (picklable), on every rank."""
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_from_rank0(obj, group=None):
    """Rank 0's `obj` on every rank (decisions such as which checkpoint to load are taken once, on rank 0)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter's FQN as checkpoints store it: without the prefixes of wrappers applied from outside the
    model (activation checkpointing, torch.compile, FSDP1)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def step_of(path: Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (step_XXXXXXXX)")
    return int(m.group(1))


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


def find_checkpoint(path, *, exports: bool = False) -> tuple[Path, Path]:
    """(run directory, weights) of what a user names: a checkpoint folder, or a run directory (its latest
    complete checkpoint); with exports=True also an exported .safetensors file, or a folder with config.yaml and
    model.safetensors (an export, or a run whose checkpoints are gone). FileNotFoundError says what was expected."""
    path = Path(path)
    if exports and path.is_file() and path.suffix == ".safetensors":
        return path.parent, path
    if (path / STATE_FILE).is_file():  # a checkpoint folder inside runs/NAME/checkpoints
        return path.parent.parent, path
    if (path / "config.yaml").is_file():
        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None and exports and (path / "model.safetensors").is_file():
            return path, path / "model.safetensors"
        if ckpt is None:
            raise FileNotFoundError(f"{path} has no complete checkpoint under checkpoints/"
                                    + (" and no model.safetensors" if exports else ""))
        return path, ckpt
    kinds = (f"a run directory (runs/NAME, with config.yaml), a checkpoint folder (runs/NAME/checkpoints/step_N, "
             f"with {STATE_FILE})" + (" or an exported .safetensors file" if exports else ""))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass {kinds}")
    raise FileNotFoundError(f"{path} is none of {kinds}")


def clean_stale(ckpt_dir: Path) -> list[Path]:
    """Remove the leftovers of interrupted saves (step_*.tmp). Call on rank 0 before anything is written."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if ckpt_dir.is_dir():
        for p in sorted(ckpt_dir.iterdir()):
            if _TMP_DIR.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def read_trainer_state(path: Path) -> dict:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete unmask checkpoint (no {STATE_FILE})")
    try:
        return json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{state_file} is not valid JSON ({e}): the checkpoint is corrupt") from None


def check_engine(path: Path, state: dict, engine: str) -> None:
    written_by = state.get("engine", "native")
    if written_by != engine:
        raise EngineMismatch(
            f"{path} was written by the {written_by} engine but this run uses parallel.engine={engine}. The two "
            f"store optimizer state differently, so training cannot resume across engines. Resume with "
            f"parallel.engine={written_by}, or start a new run from its weights only: "
            f"python -m pretrain.interop.export {path} (then train.resume=none and load the exported weights).")


# ----------------------------------------------------------------------------- manifests

def _checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint except the manifest, as sorted relative paths (DeepSpeed nests folders)."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: Path, group=None) -> dict[str, dict]:
    """{relative path: {size, sha256}} of a checkpoint's files, each rank hashing every world-th file."""
    names = _checkpoint_files(folder)
    mine = {n: {"size": (Path(folder) / n).stat().st_size, "sha256": _sha256(Path(folder) / n)}
            for n in names[rank()::world_size()]}
    merged: dict[str, dict] = {}
    for part in _all_gather(mine, group):
        merged.update(part)
    return merged


def verify_checkpoint(path: Path, level: str = "hash", group=None) -> None:
    """Check a checkpoint against its manifest (collective: every rank checks a share and all agree).
    level: "hash" (sizes and SHA-256), "size" (sizes only: catches truncation and missing files), "none".
    Raises CorruptCheckpoint naming each bad file. A checkpoint from before manifests is accepted."""
    path = Path(path)
    if level == "none":
        return
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        # Written by an older unmask (no manifest): nothing to check against, load it as before.
        return
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{manifest_file} is unreadable ({e}): the checkpoint is corrupt") from None
    names = sorted(files)
    problems = []
    for i, name in enumerate(names):
        f, want = path / name, files[name]
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{name} has {f.stat().st_size} bytes, the manifest records {want['size']}")
        elif level == "hash" and i % world_size() == rank() and _sha256(f) != want["sha256"]:
            problems.append(f"{name} has another SHA-256 than the manifest records (altered or corrupt)")
    found = sorted({p for part in _all_gather(problems, group) for p in part})
    if found:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: " + "; ".join(found[:10]) +
                                (f" (and {len(found) - 10} more)" if len(found) > 10 else ""))


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def all_finite(model) -> bool:
    """Whether every weight on every rank is finite (collective over the default group)."""
    bad = torch.zeros((), dtype=torch.float32)
    device = None
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel():
            device = local.device
            bad = bad.to(device) + (~torch.isfinite(local.detach())).any().float()
    if distributed():
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
        bad = bad.to(device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return float(bad) == 0


class Checkpointer:
    def __init__(self, ckpt_dir: Path, keep: int = 2, async_save: bool = False, process_group=None, *,
                 keep_every: int = 0, verify: str = "hash"):
        """process_group: a gloo group for the asynchronous writer's collectives (see parallel.cpu_group), so
        the background thread never interleaves with the training collectives on the default group.
        keep: newest checkpoints kept (0: all); keep_every: steps that are milestones, never rotated (0: none);
        verify: manifest check before loading ("hash", "size" or "none")."""
        self.dir, self.keep, self.async_save = Path(ckpt_dir), keep, async_save
        self.keep_every, self.verify = keep_every, verify
        self.process_group = process_group
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_save_seconds: Optional[float] = None  # wall time of the last save, write to commit

    def stage(self, step: int) -> tuple[Path, Path]:
        """(temporary directory to write into, final name). Any leftover of an interrupted save is removed."""
        self.wait()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        error = None
        if rank() == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            except OSError as e:
                error = f"checkpoint {final} could not be started: {e}"
        error = broadcast_from_rank0(error, self.process_group)
        if error:
            raise CheckpointError(error)
        return tmp, final

    def save(self, step: int, model, optimizer, trainer_state: dict, *, blocking: bool = False,
             extra: Optional[dict] = None) -> Path:
        """blocking: write synchronously even when async saves are on (the last save before exiting).
        extra: more DCP entries saved and resharded like the model (the EMA: {"ema": {fqn: tensor}}).
        Refuses (CheckpointError) to write non-finite weights: a checkpoint must be one to fall back on."""
        if not all_finite(model):
            raise CheckpointError(
                f"the weights at step {step} are not finite (NaN or inf): not writing a checkpoint from them. "
                f"The newest checkpoint in {self.dir} is {latest_checkpoint(self.dir)}; roll back to a good one "
                f"(python -m pretrain ... --rollback STEP, perhaps with a lower optim.lr)")
        t0 = time.perf_counter()
        tmp, final = self.stage(step)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, **(extra or {})}
        if self.async_save and not blocking:
            # Copies the state to host memory now, writes it in a background thread; training continues. A
            # second thread commits it the moment every rank's write finished, so a crash after that keeps it.
            try:
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.process_group)
            except _FAILURES as e:  # noqa: BLE001 - reported collectively below
                self._fail_write(tmp, final, e)
            self._thread = threading.Thread(target=self._finish_async, args=(future, tmp, final, trainer_state, t0),
                                            name=f"commit-{final.name}", daemon=True)
            self._thread.start()
        else:
            try:
                dcp.save(state, checkpoint_id=str(tmp))
            except _FAILURES as e:  # noqa: BLE001 - DCP gathers every rank's failure and raises it everywhere
                self._fail_write(tmp, final, e)
            self.commit(tmp, final, trainer_state)
            self.last_save_seconds = time.perf_counter() - t0
        return final

    def _fail_write(self, tmp: Path, final: Path, error: BaseException):
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind (and space comes back)
        latest = latest_checkpoint(self.dir)
        raise CheckpointError(f"checkpoint {final.name} could not be written ({_short(error)}); the latest complete "
                              f"checkpoint is still {latest.name if latest else 'none'}. Check the free space and "
                              f"the mount of {self.dir}") from error

    def _finish_async(self, future, tmp: Path, final: Path, trainer_state: dict, t0: float) -> None:
        local_error = None
        try:
            upload = getattr(future, "upload_completion", future)  # AsyncSaveResponse or a plain Future
            upload.result()
        except _FAILURES as e:  # noqa: BLE001 - agreed on by every rank in commit()
            local_error = _short(e)
        try:
            self.commit(tmp, final, trainer_state, local_error=local_error)
            self.last_save_seconds = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until an asynchronous save has been committed; raise its failure, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def commit(self, tmp: Path, final: Path, trainer_state: dict, *, local_error: Optional[str] = None) -> None:
        """Every rank's shards are in `tmp`: hash them (a share per rank), write the trainer state and the
        manifest, then rename (atomic on POSIX). Any rank's failure is raised on every rank."""
        group = self.process_group
        errors = [e for e in _all_gather(local_error, group) if e]
        manifest = None
        if not errors:
            try:
                if rank() == 0:
                    _write_json(tmp / STATE_FILE, trainer_state)
                barrier(group)  # the trainer state is on disk before anyone hashes
                manifest = hash_files(tmp, group)
            except _FAILURES as e:  # noqa: BLE001
                errors = [_short(e)]
        error = errors[0] if errors else None
        if rank() == 0 and error is None:
            try:
                _write_json(tmp / MANIFEST_FILE, {"step": trainer_state.get("step"), "files": manifest})
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.dir)
                self.rotate()
            except _FAILURES as e:  # noqa: BLE001 - e.g. ENOSPC writing the manifest
                error = _short(e)
        if rank() == 0 and error is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        error = broadcast_from_rank0(error, group)
        if error is not None:
            latest = latest_checkpoint(self.dir)
            raise CheckpointError(f"checkpoint {final.name} could not be committed ({error}); the latest complete "
                                  f"checkpoint is still {latest.name if latest else 'none'}. Check the free space "
                                  f"and the mount of {self.dir}")

    def rotate(self) -> list[Path]:
        """Delete all but the newest `keep` checkpoints, sparing milestones (step % keep_every == 0)."""
        if self.keep <= 0:
            return []
        removed = []
        for old in list_checkpoints(self.dir)[:-self.keep]:
            if self.keep_every > 0 and step_of(old) % self.keep_every == 0:
                continue
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        return removed

    def load(self, path: Path, model, optimizer, engine: str = "native", extra: Optional[dict] = None) -> dict:
        """extra: more DCP entries to fill in place (the EMA), as given to save()."""
        path = Path(path)
        trainer_state = read_trainer_state(path)
        check_engine(path, trainer_state, engine)
        verify_checkpoint(path, self.verify, self.process_group)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, **(extra or {})}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except _FAILURES as e:  # noqa: BLE001 - DCP raises the same failure on every rank
            raise CorruptCheckpoint(f"checkpoint {path} could not be read: {_short(e)}") from e
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return trainer_state


def _short(error: BaseException, limit: int = 400) -> str:
    """One line for a failure (DCP wraps each rank's traceback into its message)."""
    text = f"{type(error).__name__}: {error}"
    errno_match = re.search(r"\[Errno \d+\][^\n']*", text)
    if errno_match:
        return errno_match.group(0)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


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
