"""What the training loop drives: backward, optimizer step, checkpoints — for either engine.

The loop is engine-agnostic: it computes the loss with `engine.model` and calls

    engine.set_lr(lr); engine.backward(loss, last=...) per micro-batch; grad_norm = engine.step();
    engine.save(step, trainer_state) / engine.load(path) / engine.wait()

`NativeEngine` is plain PyTorch on the parallelized model (FSDP2 / TP from pretrain/engines/parallel.py);
`pretrain.engines.deepspeed.DeepSpeedEngine` is DeepSpeed ZeRO with the same model, loss and loader.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.ema import EMA, STATE_KEY, checkpoint_has_ema
from ..checkpoint.store import Checkpointer


class NativeEngine:
    name = "native"

    def __init__(self, model, optimizer: torch.optim.Optimizer, *, grad_clip: float, accum: int,
                 checkpointer: Checkpointer, reduce_every_micro_batch: bool = False):
        self.model, self.optimizer = model, optimizer
        self.grad_clip, self.accum, self.ckpt = grad_clip, accum, checkpointer
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self.ema = None  # pretrain.checkpoint.ema.EMA when train.ema_decay > 0 (set by attach_ema)

    def attach_ema(self, decay: float) -> None:
        """Keep an EMA of the (parallelized) weights, saved in and resumed from every checkpoint."""
        self.ema = EMA(self.model, decay)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """Under FSDP2 gradients are reduce-scattered (and all-reduced across replicas under HSDP) only on the
        last micro-batch of a step; before it they accumulate unsharded, in fp32, on this rank."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # an FSDP2 root
            self.model.set_requires_gradient_sync(last or self.reduce_every_micro_batch)
        (loss / self.accum).backward()  # micro-batch losses are means: the step's gradient is their mean

    def step(self, guard=None) -> torch.Tensor:
        """Clip (if configured), update, clear gradients. Returns the pre-clip global gradient norm (a DTensor
        under FSDP/TP: call .full_tensor() for its value). guard: a callable(grad_norm) -> bool (collective,
        the same answer on every rank, see pretrain/loop/guard.py); False skips the update, dropping the gradients."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if guard is None or guard(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, step: int, trainer_state: dict, *, blocking: bool = False) -> Path:
        extra, ema_state = ({STATE_KEY: self.ema.state_dict()}, self.ema.trainer_state()) if self.ema else (None, {})
        return self.ckpt.save(step, self.model, self.optimizer, {**trainer_state, **ema_state, "engine": self.name},
                              blocking=blocking, extra=extra)

    def wait(self) -> None:
        self.ckpt.wait()

    def load(self, path: Path) -> dict:
        if self.ema is None:
            return self.ckpt.load(path, self.model, self.optimizer, engine=self.name)
        if not checkpoint_has_ema(path):  # EMA switched on at a resume: it starts from the resumed weights
            state = self.ckpt.load(path, self.model, self.optimizer, engine=self.name)
            self.ema.reset_to_model()
            return state
        state = self.ckpt.load(path, self.model, self.optimizer, engine=self.name,
                               extra={STATE_KEY: self.ema.state_dict()})
        self.ema.load_trainer_state(state)
        return state


def build_engine(cfg, model, optimizer, *, ckpt_dir: Path, accum: int, micro: int, dp_size: int, use_bf16: bool,
                 process_group=None):
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, model, optimizer, ckpt_dir=ckpt_dir, accum=accum, micro=micro, dp_size=dp_size,
                               use_bf16=use_bf16)
    ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints, async_save=cfg.parallel.async_save,
                        process_group=process_group, keep_every=cfg.train.keep_every,
                        verify=cfg.train.verify_checkpoint)
    return NativeEngine(model, optimizer, grad_clip=cfg.optim.grad_clip, accum=accum, checkpointer=ckpt,
                        reduce_every_micro_batch=cfg.parallel.reduce_every_micro_batch)
