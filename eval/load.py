"""Load a trained model for evaluation from a run directory, a checkpoint, or a consolidated export.

Distributed checkpoints (any data/tensor-parallel layout) are resharded into one process on load."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from data import load_run_tokenizer
from model import Transformer
from model.adapters import is_llada_folder
from model.objectives import Objective, build_objective
from pretrain.checkpoint.store import find_checkpoint, read_trainer_state
from pretrain.checkpoint.weights import load_ema_weights, load_model_weights
from pretrain.config import Config, load_run_config


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
    def objective(self) -> Objective:
        """The checkpoint's objective (model/objectives): its bound estimators and reverse process."""
        obj = build_objective(self.cfg.diffusion, mask_id=self.cfg.model.mask_id, vocab_size=self.cfg.model.vocab_size)
        obj.init_modules(self.model)  # an objective's own learned parameters (genmd4's exponents), loaded with it
        return obj

    @property
    def is_ar(self) -> bool:
        return self.objective.causal


def _load_llada(path, device, dtype) -> Loaded:
    """A LLaDA-format Hugging Face folder (or hub id), converted to unmask's model on the fly."""
    from pretrain.interop.convert import ConvertError, load_llada_model, run_config
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
    from pretrain.interop.convert import looks_like_hub_id
    if is_llada_folder(path) or looks_like_hub_id(path):
        return _load_llada(path, device, dtype)
    run_dir, weights = find_checkpoint(path, exports=True)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: cannot rebuild the model shape")
    cfg = load_run_config(run_dir)
    model = Transformer(cfg.model)
    build_objective(cfg.diffusion, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size).init_modules(model)
    step, which = None, "raw"
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(weights)), strict=True)
    else:
        which = "ema" if ema and load_ema_weights(weights, model) else "raw"
        if which == "raw":
            load_model_weights(weights, model)
        step = read_trainer_state(weights)["step"]
    model.to(device=device, dtype=dtype).eval()
    return Loaded(model, cfg, load_run_tokenizer(run_dir, cfg), step, weights, run_dir, which)
