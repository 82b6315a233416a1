"""Exponential moving average of the weights (MDLM evaluates EMA 0.9999), sharded like the model.

    ema = EMA(model, decay=0.9999)      # after parallelize(): one shadow tensor per parameter, same placement
    ema.update()                        # after every applied optimizer step (never after a skipped one)

shadow <- shadow + (1 - d) (param - shadow), with MDLM's warm-up d = min(decay, (1 + n) / (10 + n)) after the
n-th update, so early averages are not dominated by the random initialization.

Checkpoint format (DCP): the state dict holds an entry "ema": {parameter FQN: tensor}, the FQNs those of
`model.named_parameters()` with wrapper prefixes removed (the same names as the "model" entry), each tensor a
DTensor placed like its parameter. DCP reshards it on load like the model, so an EMA saved on 4 ranks resumes on
2. trainer_state.json records "ema_decay" and "ema_updates". `load_ema_weights(ckpt, model)`
(pretrain/checkpoint/weights.py) puts the EMA into a model for evaluation and export.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .store import clean_name

STATE_KEY = "ema"


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.warmup, self.updates = float(decay), warmup, 0
        self.params = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        w = 1.0 - self.current_decay()
        self.updates += 1
        # One fused update over the local shards (a DTensor per parameter would cost a dispatch each).
        names = list(self.params)
        torch._foreach_lerp_([_local(self.shadow[n]) for n in names], [_local(self.params[n].detach()) for n in names], w)

    def state_dict(self) -> dict:
        """The DCP entry: loaded in place, so the same dict serves saving and loading."""
        return self.shadow

    def trainer_state(self) -> dict:
        return {"ema_decay": self.decay, "ema_updates": self.updates}

    def load_trainer_state(self, state: dict) -> None:
        self.updates = int(state.get("ema_updates", 0))

    @contextlib.contextmanager
    def swapped(self):
        """The model holds the EMA weights inside the block (validation, as MDLM validates), its own after."""
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    @torch.no_grad()
    def reset_to_model(self) -> None:
        """Start the average from the current weights (a resumed checkpoint that has no EMA yet)."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach())
        self.updates = 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def checkpoint_has_ema(path: Path) -> bool:
    from torch.distributed.checkpoint import FileSystemReader
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception:  # noqa: BLE001 - not a DCP folder (DeepSpeed, export): no EMA
        return False
    return any(k.startswith(STATE_KEY + ".") for k in meta.state_dict_metadata)
