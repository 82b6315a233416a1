"""A checkpoint's weights, whichever engine wrote it: for evaluation, export and continued pretraining.

- `load_model_weights(ckpt, model)`: the trained weights into `model` in any layout (DCP reshards a native
  checkpoint; a DeepSpeed one is reassembled on the CPU from its ZeRO partitions by DeepSpeed's zero_to_fp32);
- `load_ema_weights(ckpt, model)`: the EMA in place of the trained weights, when the checkpoint holds one;
- `export_safetensors(ckpt, model, file)`: the full weights as one safetensors file;
- `load_init_weights(path, model, mcfg)`: train.init_from (weights only, the optimizer starts fresh).

No optimizer state is read here: resuming a run is the engines' (pretrain/engines/).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from data.dist import rank
from model.adapters import is_llada_folder
from model.config import ModelConfig

from ..config import ConfigError
from .ema import STATE_KEY, checkpoint_has_ema
from .store import STATE_FILE, barrier, clean_name, find_checkpoint, read_trainer_state


def import_deepspeed(device: torch.device):
    """The deepspeed module, set up for `device` (its engine and its checkpoint reader both import it here)."""
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import; on a CPU run it must be the CPU one (gloo collectives).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError("parallel.engine=deepspeed needs DeepSpeed: pip install 'unmask[deepspeed]'") from e
    if device.type == "cpu" and os.environ.get("UNMASK_DEEPSPEED_SHM", "0") != "1":
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op when its communication
        # backend starts (1-2 minutes and a C++ toolchain on first use). It only speeds up intra-node CPU
        # collectives; CPU runs here are tests and smoke runs, for which gloo is enough. UNMASK_DEEPSPEED_SHM=1
        # keeps DeepSpeed's default.
        import importlib
        # (by module path: the attribute deepspeed.comm.torch is the torch package itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def deepspeed_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a DeepSpeed checkpoint directory, on the CPU, without a process group."""
    path = Path(path)
    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {clean_name(k): v for k, v in sd.items()}


def load_model_weights(path: Path, model) -> None:
    """Load only the model from a checkpoint (any layout, either engine) into `model` (any layout)."""
    path = Path(path)
    state = read_trainer_state(path) if (path / STATE_FILE).is_file() else {}
    if state.get("engine", "native") == "deepspeed":
        full = deepspeed_state_dict(path)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(path))
    set_model_state_dict(model, sd, options=StateDictOptions(strict=True))


@torch.no_grad()
def load_ema_weights(path: Path, model: torch.nn.Module) -> bool:
    """Load a checkpoint into `model` (any layout) with its EMA in place of the trained parameters; False (model
    untouched) when the checkpoint has none. Buffers, which are not averaged, come from the model entry."""
    path = Path(path)
    if not checkpoint_has_ema(path):
        return False
    load_model_weights(path, model)
    # DCP loads in place into the parameters' own storage (DTensor shards under a parallel layout).
    state = {STATE_KEY: {clean_name(n): p.data for n, p in model.named_parameters()}}
    dcp.load(state, checkpoint_id=str(path))
    return True


def export_safetensors(path: Path, model, out_file: Path, dtype: Optional[torch.dtype] = None) -> None:
    """Load checkpoint `path` into `model` (any layout) and write its full weights to one safetensors file
    (rank 0 writes, atomically). dtype: cast floating tensors (e.g. bf16 to halve the file), None keeps fp32."""
    from safetensors.torch import save_file
    load_model_weights(path, model)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        out_file = Path(out_file)
        tmp = out_file.with_suffix(out_file.suffix + ".tmp")
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                   for k, v in sd.items()}
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_file)
    barrier()


# ----------------------------------------------------------------------------- continued pretraining

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "vocab_size", "mask_id", "rope_theta", "norm_eps")


def init_checkpoint(path) -> Path:
    """The checkpoint folder `train.init_from` names: a checkpoint, or a run directory (its latest)."""
    if is_llada_folder(path):
        raise ConfigError(f"train.init_from={path} is a LLaDA-format folder: convert it once with python -m "
                          f"pretrain.interop.convert from-llada {path} runs/NAME, then use train.init_from=runs/NAME")
    try:
        return find_checkpoint(path)[1]
    except FileNotFoundError as e:
        raise ConfigError(f"train.init_from: {e}") from None


def check_init_shape(ckpt: Path, mcfg: ModelConfig) -> None:
    """Refuse, before any loading, a source whose model shape differs from this run's. Reads the raw model
    section of the source's saved config, so a source written under older config keys still compares."""
    src = dict((read_trainer_state(ckpt).get("config") or {}).get("model") or {})
    if not src:
        return
    src["kv_heads"] = src.get("n_kv_heads") or src.get("n_heads")
    diff = [f"{k}: {src[k]} in the source, {getattr(mcfg, k)} here" for k in SHAPE_KEYS
            if k in src and src[k] != getattr(mcfg, k)]
    if diff:
        raise ConfigError(f"train.init_from={ckpt} has another model shape ({'; '.join(diff)}). Set the model "
                          f"keys to the source's (its config.yaml), e.g. model.preset=llada-8b for LLaDA-8B")


def load_init_weights(path, model, mcfg: ModelConfig) -> Path:
    """Weights only (any source layout into this run's layout, either engine's checkpoints): the optimizer
    starts fresh and the step at zero. ConfigError names what is wrong with train.init_from."""
    ckpt = init_checkpoint(path)
    check_init_shape(ckpt, mcfg)
    load_model_weights(ckpt, model)
    return ckpt
