"""What the training loop drives: backward, optimizer step, checkpoints — for either engine.

The loop is engine-agnostic: it computes the loss with `engine.model` and calls

    engine.set_lr(lr); engine.backward(loss) per micro-batch; grad_norm = engine.step();
    engine.save(step, trainer_state) / engine.load(path) / engine.wait()

`NativeEngine` is plain PyTorch on the parallelized model (FSDP2 / TP from pretrain/parallel.py);
`pretrain.deepspeed_engine.DeepSpeedEngine` is DeepSpeed ZeRO with the same model, loss and loader.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpointer


class NativeEngine:
    name = "native"

    def __init__(self, model, optimizer: torch.optim.Optimizer, *, grad_clip: float, accum: int,
                 checkpointer: Checkpointer):
        self.model, self.optimizer = model, optimizer
        self.grad_clip, self.accum, self.ckpt = grad_clip, accum, checkpointer

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()  # micro-batch losses are means: the step's gradient is their mean

    def step(self) -> torch.Tensor:
        """Clip (if configured), update, clear gradients. Returns the pre-clip global gradient norm (a DTensor
        under FSDP/TP: call .full_tensor() for its value)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, step: int, trainer_state: dict, *, blocking: bool = False) -> Path:
        return self.ckpt.save(step, self.model, self.optimizer, {**trainer_state, "engine": self.name},
                              blocking=blocking)

    def wait(self) -> None:
        self.ckpt.wait()

    def load(self, path: Path) -> dict:
        return self.ckpt.load(path, self.model, self.optimizer, engine=self.name)


def build_engine(cfg, model, optimizer, *, ckpt_dir: Path, accum: int, micro: int, dp_size: int, use_bf16: bool,
                 process_group=None):
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(cfg, model, optimizer, ckpt_dir=ckpt_dir, accum=accum, micro=micro, dp_size=dp_size,
                               use_bf16=use_bf16)
    ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints, async_save=cfg.parallel.async_save,
                        process_group=process_group)
    return NativeEngine(model, optimizer, grad_clip=cfg.optim.grad_clip, accum=accum, checkpointer=ckpt)
