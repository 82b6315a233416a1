"""One optimizer step of the trainer: used by train() and, unchanged, by the distributed tests.

    result = train_step(engine, cfg, loader, step=..., consumed=..., micro=..., accum=..., dims=...,
                        device=..., objective=..., precision=...)

Everything a step does lives here, in order: draw the step's noise (a pure function of (seed, step)), cut the
batch to this step's length, copy each micro-batch to the device, forward + backward per micro-batch under
the precision context (gradients synchronized only on the last one), then the optimizer step. Extensions
(skipping non-finite steps, an EMA of the weights) hook in around `engine.step()`, the one place the weights
change.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from model.attention import needs_mask
from model.objectives import Noised, Objective, StepNoise

from ..engines.parallel import local_loss, loss_scope, sequence_length


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean micro-batch loss (detached, fp32, on the device)
    grad_norm: torch.Tensor  # pre-clip global gradient norm (a DTensor under FSDP/TP: .full_tensor())
    length: int  # tokens per row this step (the random-length cut, rounded for sequence parallelism)
    noise: StepNoise
    skipped: str = ""  # why the update was skipped (pretrain/loop/guard.py); "": the weights were updated
    stats: dict = field(default_factory=dict)  # the last micro-batch's detached loss statistics (objective-defined)


def precision_context(device: torch.device, use_bf16: bool, fsdp: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """The compute-precision policy (torchtitan's): weights are fp32 masters everywhere and the loss is fp32.
    Under FSDP the bf16 compute comes from its MixedPrecisionPolicy (bf16 parameters gathered per unit, fp32
    gradient reduction) and autocast stays off, so nothing is cast twice. Without FSDP (one device, TP only)
    bf16 autocast gives the same bf16 matmuls on the fp32 master weights. Returns a factory: a fresh context
    per use."""
    if not use_bf16 or fsdp:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def ce_chunk_for(cfg) -> int:
    """diffusion.ce_chunk, except under DeepSpeed ZeRO-3: it partitions the head's weight again after the
    forward, and a chunk recomputed in backward would find it empty (FSDP2 re-gathers it before backward)."""
    p = getattr(cfg, "parallel", None)
    if p is not None and p.engine == "deepspeed" and p.zero_stage == 3:
        return 0
    return cfg.diffusion.ce_chunk


def objective_loss(model, cfg, objective: Objective, batch: Noised):
    """The objective's loss of one noised micro-batch. Under tensor parallelism call inside
    parallel.loss_scope (forward and backward)."""
    loss, stats = objective.loss(model, batch, ce_chunk=ce_chunk_for(cfg))
    return local_loss(loss), stats


def check_token_ids(x0: torch.Tensor, vocab_size: Optional[int], consumed: int) -> None:
    """A corrupt shard (altered bytes of the same size pass every format check) shows up as ids outside the
    vocabulary: stop with the batch position instead of an index error deep in the embedding. On the host
    copy, before the transfer: a max over one micro-batch."""
    if vocab_size and x0.numel() and (top := int(x0.max())) >= vocab_size:
        from data.shards import DataError
        raise DataError(f"the batch at global sample position {consumed} holds token id {top}, outside the "
                        f"vocabulary of {vocab_size}: the prepared data is corrupt (a shard was altered or "
                        f"mixed with another dataset's). Prepare it again from its sources")


def train_step(engine, cfg, loader, *, step: int, consumed: int, micro: int, accum: int, dims, device,
               objective: Objective, precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               noise: Optional[StepNoise] = None, guard=None, ema=None) -> StepResult:
    """Forward/backward over `accum` micro-batches of this rank's rows of global batch `step` (samples
    consumed..consumed+G of the global order), then one optimizer step. `noise` overrides the drawn noise
    (tests); `precision` is a factory from precision_context; `ema` (pretrain/checkpoint/ema.py) is updated after an
    applied update only."""
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    if noise is None:  # on the host: a pure function of (seed, step), the same on every device and rank
        noise = objective.draw(cfg.train.seed, step, G, L, stratified=cfg.diffusion.t_sampling == "stratified",
                               random_length_prob=cfg.data.random_length_prob)
    length = sequence_length(noise.length, dims)  # sequence parallelism needs a multiple of tp
    rank_rows = loader.rank_positions(0, G)  # this rank's rows of the global batch
    total = torch.zeros((), device=device)
    stats: dict = {}
    for m in range(accum):
        x0, doc = loader.micro_batch(consumed, G, micro, m)
        check_token_ids(x0, cfg.model.vocab_size, consumed)
        rows = rank_rows[m * micro:(m + 1) * micro]
        doc = doc[:, :length] if doc is not None else None
        if doc is not None and not needs_mask(doc, None):
            doc = None  # one document per row: no mask to build (decided here, on the host copy)
        # Noised on the host (the objective's forward process: masks, targets, flat positions), then one copy
        # to the device; nothing in this loop waits for the device.
        batch = objective.noise(x0[:, :length], noise.rows(rows, length), doc)
        batch.mask_known = True
        batch = batch.to(device)
        with loss_scope(dims.tp > 1):  # vocab-parallel cross-entropy under TP, forward and backward
            with precision():
                loss, stats = objective_loss(engine.model, cfg, objective, batch)
            # Gradients are reduced across data-parallel ranks only after the last micro-batch.
            engine.backward(loss, last=m == accum - 1)
        # An objective that differentiates a surrogate (genmd4's REINFORCE term) reports its NELBO: log that.
        total += (local_loss(stats["nelbo"]) if "nelbo" in stats else loss).detach().float() / accum
    if guard is None:
        grad_norm = engine.step()  # clip, update, zero the gradients: the one place the weights change
        if ema is not None:
            ema.update()
        return StepResult(total, grad_norm, length, noise, stats=stats)
    # A bad-step guard (pretrain/loop/guard.py) judges the global loss and gradient norm before the update.
    verdicts: list[str] = []

    def apply(grad_norm) -> bool:
        verdicts.append(guard.verdict(total, grad_norm))
        return not verdicts[-1]
    grad_norm = engine.step(guard=apply)
    skipped = verdicts[-1] if verdicts else ""
    if ema is not None and not skipped:  # a skipped step changed no weights: the average must not move either
        ema.update()
    return StepResult(total, grad_norm, length, noise, skipped=skipped, stats=stats)
