"""DeepSpeed ZeRO (stage 0-3) as an alternative engine: same model, loss, loader and loop as the native one.

`parallel.engine: deepspeed` swaps what runs backward, the optimizer step and checkpoints; the model is
built and initialized exactly as for the native engine (same seed, same weights), and the optimizer is our
own torch AdamW with the same parameter groups, handed to DeepSpeed as its client optimizer (so no fused
DeepSpeed op has to be compiled, and the update rule is bit-for-bit the native one).

Data parallelism only: tensor parallelism and HSDP are native-engine features. Checkpoints are DeepSpeed's
own format in unmask's directory scheme (step_XXXXXXXX, written to .tmp and renamed, trainer_state.json), so
they resume within this engine at the same data-parallel size, are refused by the native engine with a
clear message, and export to safetensors through DeepSpeed's zero_to_fp32 reassembly
(pretrain/checkpoint/weights.py, for pretrain/interop/export.py and evaluation).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.store import (CheckpointError, Checkpointer, CorruptCheckpoint, EngineMismatch, all_finite,
                                barrier, check_engine, read_trainer_state, verify_checkpoint)
from ..checkpoint.weights import import_deepspeed


def deepspeed_config(cfg, *, micro: int, accum: int, dp_size: int, use_bf16: bool) -> dict:
    """Translate our config into a DeepSpeed config. Batch sizes are given in all three forms DeepSpeed checks
    against each other; gradients are reduced in fp32 as in the native engine."""
    zero = {"stage": cfg.parallel.zero_stage, "contiguous_gradients": True, "overlap_comm": torch.cuda.is_available()}
    if cfg.parallel.zero_stage == 3:
        # Gather every parameter at forward time and release it afterwards (no persistence threshold), the same
        # memory behaviour as FSDP2 resharding after forward.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_batch_size": micro * accum * dp_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),  # 0 disables, as for us
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_bf16)},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,  # our torch AdamW as client optimizer
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg, model, optimizer, *, ckpt_dir: Path, accum: int, micro: int, dp_size: int,
                 use_bf16: bool):
        p = cfg.parallel
        if p.tp != 1 or p.dp_replicate != 1:
            raise ValueError("parallel.engine=deepspeed runs ZeRO data parallelism only: set parallel.tp=1 and "
                             "parallel.dp_replicate=1 (tensor parallelism and HSDP are native-engine features)")
        device = next(model.parameters()).device
        deepspeed = import_deepspeed(device)
        if not dist.is_initialized():
            # A single process: DeepSpeed still wants a process group; a private one needs no rendezvous.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts a launcher set it
        self.config = deepspeed_config(cfg, micro=micro, accum=accum, dp_size=dp_size, use_bf16=use_bf16)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                    dist_init_required=False)
        self.model = self.engine  # forward goes through the engine (ZeRO-3 gathers parameters in its hooks)
        self.dp_size = dp_size
        self.zero_stage = p.zero_stage
        self.ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints, keep_every=cfg.train.keep_every,
                                 verify=cfg.train.verify_checkpoint)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        # DeepSpeed knows the accumulation boundary itself (gradient_accumulation_steps); `last` is implied.
        # DeepSpeed divides by gradient_accumulation_steps itself, and wants step() after every micro-batch:
        # it reduces gradients and updates only at the accumulation boundary.
        self.engine.backward(loss)
        self.engine.step()

    def step(self, guard=None) -> torch.Tensor:
        """The update already ran at the accumulation boundary inside backward(); ZeRO (stages 1-3) drops an
        update whose gradient norm is not finite by itself. The guard only records such a step as skipped."""
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        if guard is not None and self.engine.get_global_grad_norm() is not None:
            guard(norm)
        return norm

    def save(self, step: int, trainer_state: dict, *, blocking: bool = True) -> Path:
        if not all_finite(self.engine.module):
            raise CheckpointError(f"the weights at step {step} are not finite: not writing a checkpoint from them; "
                                  f"roll back to an earlier one (python -m pretrain ... --rollback STEP)")
        tmp, final = self.ckpt.stage(step)
        # save_latest=False: "latest" pointers are ours (the newest complete step_* directory).
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
        state = {**trainer_state, "engine": self.name, "zero_stage": self.zero_stage, "dp_size": self.dp_size}
        self.ckpt.commit(tmp, final, state)
        return final

    def wait(self) -> None:
        """Saves are synchronous here."""

    def load(self, path: Path) -> dict:
        path = Path(path)
        state = read_trainer_state(path)
        check_engine(path, state, self.name)
        if state.get("dp_size") != self.dp_size:
            raise EngineMismatch(f"{path} holds ZeRO partitions for {state.get('dp_size')} data-parallel ranks but "
                                 f"this run has {self.dp_size}: DeepSpeed checkpoints resume at the same size (the "
                                 f"native engine reshards freely; DeepSpeed offers ds_to_universal for this)")
        verify_checkpoint(path, self.ckpt.verify)
        try:
            load_path, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        except (OSError, RuntimeError, ValueError, KeyError) as e:  # unreadable files: a fallback may follow
            raise CorruptCheckpoint(f"checkpoint {path} could not be read by DeepSpeed: {e}") from e
        if load_path is None:
            raise CorruptCheckpoint(f"DeepSpeed could not load the checkpoint in {path}")
        barrier()
        return state
