"""Load a trained model for evaluation from a run directory, a checkpoint, or a consolidated export.

Distributed checkpoints (any data/tensor-parallel layout) are resharded into one process on load."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from data import load_run_tokenizer
from model import Transformer
from pretrain.checkpoint import latest_checkpoint, load_model_weights, read_trainer_state
from pretrain.config import Config, from_dict


@dataclass
class Loaded:
    model: Transformer
    cfg: Config
    tokenizer: Any  # encode / decode / mask_id / eos_id / bos_id / vocab_size
    step: Optional[int]
    path: Path  # the checkpoint folder or .safetensors file the weights came from
    run_dir: Path  # where its config.yaml and tokenizer live; evaluation results go here
    weights: str = "raw"  # "ema": the checkpoint's EMA weights (preferred when present, as MDLM evaluates)

    @property
    def is_ar(self) -> bool:
        return self.cfg.diffusion.objective == "ar"


def _find(path: Path) -> tuple[Path, Path]:
    """(run directory, weights: a checkpoint folder or a .safetensors file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory (runs/NAME), a checkpoint folder "
                                f"(runs/NAME/checkpoints/step_N) or an exported .safetensors file")
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent, path
    if (path / "trainer_state.json").is_file():  # a checkpoint folder inside runs/NAME/checkpoints
        return path.parent.parent, path
    if (path / "config.yaml").is_file():
        if (path / "model.safetensors").is_file() and not (path / "checkpoints").is_dir():
            return path, path / "model.safetensors"
        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            if (path / "model.safetensors").is_file():
                return path, path / "model.safetensors"
            raise FileNotFoundError(f"{path} has no complete checkpoint under checkpoints/ and no model.safetensors")
        return path, ckpt
    raise FileNotFoundError(f"{path} is neither a run directory (with config.yaml), a checkpoint folder "
                            f"(with trainer_state.json) nor a .safetensors file")


def _load_llada(path, device, dtype) -> Loaded:
    """A LLaDA-format Hugging Face folder (or hub id), converted to unmask's model on the fly."""
    from pretrain.convert import ConvertError, load_llada_model, run_config
    try:
        model, mcfg, tok, _ = load_llada_model(path, device=device, dtype=dtype)
    except ConvertError as e:
        raise FileNotFoundError(str(e)) from None
    if tok is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json: it is needed to tokenize evaluation text")
    cfg = run_config(mcfg, Path(path), mcfg.max_seq_len)
    return Loaded(model, cfg, tok, None, Path(path), Path(path))


def load(path, device="cpu", dtype: torch.dtype = torch.float32, ema: bool = True) -> Loaded:
    """ema: use the checkpoint's EMA weights when it has them (Loaded.weights says which were used)."""
    from pretrain.convert import is_llada_folder, looks_like_hub_id
    if is_llada_folder(path) or looks_like_hub_id(path):
        return _load_llada(path, device, dtype)
    run_dir, weights = _find(Path(path))
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: cannot rebuild the model shape")
    cfg = from_dict(Config, yaml.safe_load(cfg_file.read_text()))
    model = Transformer(cfg.model)
    step, which = None, "raw"
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(weights)), strict=True)
    else:
        from pretrain.checkpoint import load_ema_weights
        which = "ema" if ema and load_ema_weights(weights, model) else "raw"
        if which == "raw":
            load_model_weights(weights, model)
        step = read_trainer_state(weights)["step"]
    model.to(device=device, dtype=dtype).eval()
    return Loaded(model, cfg, load_run_tokenizer(run_dir, cfg), step, weights, run_dir, which)
