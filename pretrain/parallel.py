"""Process groups, the device mesh, and parallelism applied to the plain model from outside.

One 3-D mesh (dp_replicate, dp_shard, tp). Applied in this order (torchtitan's), each step optional:

1. tensor + sequence parallel (`parallelize_module`): column-wise wq/wk/wv and w1/w3, row-wise wo and w2,
   RMSNorms run on sequence shards, vocab-parallel embedding and output head, loss-parallel cross-entropy;
2. activation checkpointing of whole blocks (every block, or every N-th);
3. `torch.compile` per block;
4. FSDP2 `fully_shard` per block, then the root, over the data-parallel dims (HSDP when dp_replicate > 1),
   with bf16 parameters / fp32 gradient reduction on CUDA and fp32 throughout on CPU.

The model file knows none of this. Two things cross the boundary and live here:
- `init_weights`: the model's own initializer, made layout-independent (a seed gives the same weights under
  every layout, and the same as an unsharded model);
- `loss_scope`: under tensor parallelism the head returns vocab-sharded logits and cross-entropy runs
  loss-parallel inside this scope; outside it the head returns ordinary full logits (generation, evaluation).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class ParallelDims:
    """One description of the layout. dp = dp_replicate * dp_shard ranks see different data; the tp ranks
    of one data-parallel group see the same rows."""
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, pcfg, world_size: int) -> "ParallelDims":
        for key in ("dp_replicate", "tp"):
            if getattr(pcfg, key) < 1:
                raise ValueError(f"parallel.{key}={getattr(pcfg, key)} must be >= 1")
        dp_shard = pcfg.dp_shard
        if dp_shard == -1:
            if world_size % (pcfg.dp_replicate * pcfg.tp):
                raise ValueError(f"world size {world_size} is not divisible by parallel.dp_replicate="
                                 f"{pcfg.dp_replicate} x parallel.tp={pcfg.tp}")
            dp_shard = world_size // (pcfg.dp_replicate * pcfg.tp)
        if dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={dp_shard} must be >= 1 (or -1: whatever the world size leaves)")
        dims = cls(pcfg.dp_replicate, dp_shard, pcfg.tp, world_size)
        if pcfg.tp > 1 and pcfg.compile:
            # Checked on torch 2.13 (CPU): compiled blocks holding DTensor TP layers fail in backward
            # ("'Tensor' object has no attribute '_local_tensor'" in Redistribute.backward). Refuse up front.
            raise ValueError("parallel.compile=true with parallel.tp > 1 is not supported (torch 2.13 fails in the "
                             "backward of compiled tensor-parallel blocks); compile with data parallelism only, or "
                             "use tp without compile")
        if pcfg.tp > 1 and pcfg.engine == "deepspeed":
            raise ValueError("parallel.engine=deepspeed runs ZeRO data parallelism only: set parallel.tp=1")
        if dims.dp_replicate * dims.dp_shard * dims.tp != world_size:
            raise ValueError(f"parallel.dp_replicate={dims.dp_replicate} x parallel.dp_shard={dims.dp_shard} x "
                             f"parallel.tp={dims.tp} = {dims.dp_replicate * dims.dp_shard * dims.tp} does not "
                             f"match the world size {world_size}")
        return dims

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def validate_model(self, mcfg, seq_len: Optional[int] = None) -> None:
        """Tensor parallelism splits heads, KV heads and the FFN hidden size across tp ranks, and sequence
        parallelism splits the sequence: each must divide evenly (the vocabulary need not)."""
        tp = self.tp
        if tp == 1:
            return
        checks = [("model.n_heads", mcfg.n_heads), ("model.n_kv_heads", mcfg.kv_heads), ("model.ffn_dim", mcfg.ffn_dim)]
        if seq_len is not None:
            checks.append(("data.seq_len", seq_len))
        for key, value in checks:
            if value % tp:
                raise ValueError(f"{key}={value} is not divisible by parallel.tp={tp}: tensor parallelism gives "
                                 f"each tp rank an equal slice; pick a tp that divides it")


def init_distributed(device_pref: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (if any). Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


_CPU_GROUPS: dict = {}


def cpu_group(purpose: str):
    """A gloo group over all ranks for host-side work off the training collectives: "signals" (the per-step
    preemption flag) and "checkpoint" (the background thread of asynchronous saves). One group per purpose:
    collectives from two threads on one group would interleave and deadlock. Create them in the same order
    on every rank (new_group is collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if purpose not in _CPU_GROUPS:
        _CPU_GROUPS[purpose] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[purpose]


def build_mesh(dims: ParallelDims, device: torch.device):
    if dims.world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (dims.dp_replicate, dims.dp_shard, dims.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    if dims.dp_shard > 1 and dims.tp > 1 and hasattr(mesh, "_flatten"):
        # Reductions over FSDP x TP shards (the gradient norm) then take one collective instead of two.
        mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    return mesh


def dp_coordinates(mesh, dims: ParallelDims) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process."""
    if mesh is None:
        return 0, 1
    rep = mesh["dp_replicate"].get_local_rank()
    shard = mesh["dp_shard"].get_local_rank()
    return rep * dims.dp_shard + shard, dims.dp


# ----------------------------------------------------------------------------- tensor + sequence parallel

_LOSS_PARALLEL = False


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Megatron-style TP with sequence parallelism, expressed as DTensor layouts.

    Between blocks the residual stream is sharded along the sequence (Shard(1)); RMSNorms run on their
    sequence shard. Each attention/FFN gathers the sequence, runs column-parallel in-projections (a slice of
    heads / hidden units per rank; Attention views with -1 heads for this) and a row-parallel out-projection
    whose partial sums are reduce-scattered back to sequence shards.

    The head: the loss selects masked positions *before* the output projection (`logits_at`), and a boolean
    selection cannot run on a sequence-sharded tensor. So the final norm's output is gathered to the full
    sequence (identical on every tp rank), the selection runs on that plain tensor, and the column-parallel
    head turns the selected (N, dim) rows into vocab-sharded (N, V/tp) logits for the loss-parallel
    cross-entropy. Only the (N, dim) hidden state is replicated; the (N, V) logits never are."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    })
    # A second style on the final norm: its DTensor output (sequence shards) is gathered to a plain tensor.
    parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1),
                                                                desired_output_layouts=Replicate(),
                                                                use_local_output=True))
    model.output.register_forward_hook(_gather_logits_outside_loss)
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
        # Attention and FFN take the normed residual (sequence shards) first; whatever follows (rope table,
        # per-token masks) is a plain full-sequence tensor and passes untouched.
        block.attention.register_forward_pre_hook(_gather_sequence)
        block.feed_forward.register_forward_pre_hook(_gather_sequence)


def _gather_sequence(module, args):
    from torch.distributed.tensor import Replicate
    x, *rest = args
    return (x.redistribute(placements=[Replicate()] * x.device_mesh.ndim), *rest)


def _gather_logits_outside_loss(module, args, out):
    # Outside `loss_scope` callers (sampling, evaluation harnesses) get ordinary full logits.
    if _LOSS_PARALLEL:
        return out
    return out.full_tensor() if hasattr(out, "full_tensor") else out


@contextlib.contextmanager
def loss_scope(enabled: bool):
    """Wrap the loss forward *and* backward. Under tensor parallelism the head yields vocab-sharded DTensor
    logits here and `F.cross_entropy` runs loss-parallel (max, log-sum-exp and target logit reduced across tp
    ranks; the full (N, V) logits are never formed). Plain tensors the loss mixes in (targets, weights) count
    as replicated. Without tensor parallelism this does nothing."""
    global _LOSS_PARALLEL
    if not enabled:
        yield
        return
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import loss_parallel
    previous = _LOSS_PARALLEL
    _LOSS_PARALLEL = True
    try:
        with loss_parallel(), implicit_replication():
            yield
    finally:
        _LOSS_PARALLEL = previous


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """A loss-parallel loss is a replicated DTensor; its local value is the loss (same on every tp rank), and
    gradients flow through to_local."""
    return loss.to_local() if hasattr(loss, "to_local") else loss


def sequence_length(length: int, dims: ParallelDims) -> int:
    """Sequence parallelism shards the sequence evenly: a random-length batch is cut to a multiple of tp."""
    if dims.tp == 1:
        return length
    return max(dims.tp, length - length % dims.tp)


# ----------------------------------------------------------------------------- activation checkpointing, compile

def apply_ac(model: nn.Module, mode: str, every: int = 1) -> None:
    """Recompute whole blocks in the backward pass: all of them ("full"), or every `every`-th ("selective",
    blocks every-1, 2*every-1, ...), trading compute for activation memory. The wrapper's name disappears from
    state dicts, so checkpoints do not depend on this setting."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.activation_checkpoint={mode!r}; choose none, full or selective")
    if mode == "selective" and every < 1:
        raise ValueError(f"parallel.ac_every={every} must be >= 1")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, block in enumerate(model.layers):
        if mode == "full" or (i + 1) % every == 0:
            # preserve_rng_state=False: the blocks draw no random numbers (no dropout), so nothing to replay.
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (they share one graph, so it compiles once): the loop over blocks and
    FSDP's per-block collectives stay in eager Python. In-place, so parameter names are unchanged."""
    for block in model.layers:
        block.compile(fullgraph=False)


# ----------------------------------------------------------------------------- FSDP2

def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: Optional[torch.dtype]) -> None:
    """Shard every block, then the root (embedding, final norm, head). Parameters are gathered per block just
    in time in `param_dtype` and gradients reduce-scattered in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at the start of backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def dp_mesh_of(mesh, dims: ParallelDims):
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def parallelize(model: nn.Module, pcfg, dims: ParallelDims, mesh, *, param_dtype: Optional[torch.dtype] = None
                ) -> nn.Module:
    """Apply the layout to a model built on the meta device (materialize afterwards with to_empty +
    init_weights). param_dtype: the compute dtype of gathered parameters (bf16 on CUDA), None for fp32."""
    validate_for_model = getattr(model, "cfg", None)
    if validate_for_model is not None:
        dims.validate_model(validate_for_model)
    if getattr(pcfg, "engine", "native") == "deepspeed":
        # DeepSpeed shards (ZeRO) and reduces gradients itself; only the model-side choices apply.
        apply_ac(model, pcfg.activation_checkpoint, pcfg.ac_every)
        if pcfg.compile:
            apply_compile(model)
        return model
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    apply_ac(model, pcfg.activation_checkpoint, pcfg.ac_every)
    if pcfg.compile:
        apply_compile(model)
    if mesh is not None and dims.dp > 1:
        apply_fsdp(model, dp_mesh_of(mesh, dims), param_dtype)
    return model


# ----------------------------------------------------------------------------- layout-independent init

class _FullTensorRandom(torch.overrides.TorchFunctionMode):
    """Random in-place initializers on DTensor parameters draw the *full* tensor from the caller's generator
    and keep this rank's slice. Parameters are initialized in named_parameters order with one generator,
    exactly as the unsharded model does, so a seed gives bit-identical weights under every layout. (DTensor's
    own random ops would give each shard different numbers from the same generator.) Costs one full
    parameter of transient memory at a time."""
    _RANDOM = {torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if func in self._RANDOM and hasattr(target, "device_mesh"):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            local = target.to_local()
            full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
            func(full, *args[1:], **kwargs)
            shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                  target.placements)
            local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
            return target
        return func(*args, **kwargs)


def init_weights(model: nn.Module, seed: int) -> None:
    """model.init_weights(seed) with the same result whatever the layout."""
    with _FullTensorRandom():
        model.init_weights(seed=seed)
