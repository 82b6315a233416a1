"""Process groups, the device mesh, and parallelism applied to the plain model from outside.

One 3-D mesh (dp_replicate, dp_shard, tp). Applied in this order (torchtitan's), each step optional:

1. tensor + sequence parallel (`parallelize_module`): column-wise wq/wk/wv and w1/w3, row-wise wo and w2,
   RMSNorms run on sequence shards, vocab-parallel embedding and output head, loss-parallel cross-entropy;
2. activation checkpointing: whole blocks (every block, or every N-th), or op-level (every block, keeping
   matmul and attention outputs);
3. `torch.compile` per block (with TP too; async TP as a CUDA switch);
4. FSDP2 `fully_shard` units like torchtitan's: the embedding, each block, [final norm + output head], then
   the root, over the data-parallel dims (HSDP when dp_replicate > 1), with bf16 parameters / fp32 gradient
   reduction when training in bf16 (and then no autocast: pretrain/loop/step.py), fp32 throughout otherwise.

The model file knows none of this. Two things cross the boundary and live here:
- `init_weights`: the model's own initializer, made layout-independent (a seed gives the same weights under
  every layout, and the same as an unsharded model);
- `loss_scope`: under tensor parallelism the head returns vocab-sharded logits and cross-entropy runs
  loss-parallel inside this scope; outside it the head returns ordinary full logits (generation, evaluation).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from data.dist import distributed


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


def init_distributed(device_pref: str = "auto", *, timeout_s: int = 0, flight_recorder: int = 0,
                     one_rank_group: Optional[bool] = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (if any). Returns (rank, world_size, device).
    timeout_s: how long a collective may wait before it fails (0: torch's default, 10 minutes for NCCL).
    flight_recorder: NCCL keeps the last N collectives per rank and dumps them (to TORCH_FR_DUMP_TEMP_FILE,
    default /tmp/nccl_trace_rank_<r>) when a collective times out: which rank stopped where.
    one_rank_group: a single process still gets a (1-rank) process group, so FSDP2 can shard over a size-1
    mesh; None: on CUDA (the one precision path, see uses_fsdp)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if flight_recorder > 0:  # read by NCCL's process group when it is created
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", str(flight_recorder))
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", "/tmp/nccl_trace_rank_")
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s > 0 else {}
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", **kwargs)
    elif world == 1 and not dist.is_initialized() and (use_cuda if one_rank_group is None else one_rank_group):
        # No torchrun rendezvous to read: an in-process store serves the one rank.
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                **kwargs)
    return rank, world, device


_CPU_GROUPS: dict = {}


def cpu_group(purpose: str):
    """A gloo group over all ranks for host-side work off the training collectives: "signals" (the per-step
    preemption flag) and "checkpoint" (the background thread of asynchronous saves). One group per purpose:
    collectives from two threads on one group would interleave and deadlock. Create them in the same order
    on every rank (new_group is collective)."""
    if not distributed():
        return None
    if purpose not in _CPU_GROUPS:
        _CPU_GROUPS[purpose] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[purpose]


def build_mesh(dims: ParallelDims, device: torch.device):
    """The (dp_replicate, dp_shard, tp) mesh; None for one process without a process group (plain PyTorch)."""
    if dims.world_size == 1 and not dist.is_initialized():
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
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)
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
    model.tok_embeddings.register_forward_hook(_settle_async_output)
    model.output.vocab_parallel = True  # the model computes its cross-entropy loss-parallel, unchunked
    # Attention and FFN take the normed residual (sequence shards) first and gather it to the full sequence;
    # whatever follows (the complex RoPE table, the per-batch attention masks) is a plain tensor and passes
    # untouched. A parallel style (not a hand-written hook) so that compiled blocks trace it.
    gather_attention = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                          desired_input_layouts=(Replicate(), None, None))
    gather_ffn = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    # Time conditioning (model.time_conditioning=adaln): the block norms hand their sequence shard over as a
    # plain tensor, modulated there by the block's replicated modulation before attention / FFN gather it.
    conditioned = getattr(model, "time_embed", None) is not None
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attention": gather_attention,
            "feed_forward": gather_ffn,
            "attention_norm": SequenceParallel(use_local_output=conditioned),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(use_local_output=conditioned),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
        if conditioned:
            _replicate_conditioning(block.modulation, tp_mesh, sequence_shard=True)
    if conditioned:
        _replicate_conditioning(model.time_embed, tp_mesh, sequence_shard=False)
        _replicate_conditioning(model.final_modulation, tp_mesh, sequence_shard=False)
    if hasattr(model, "noise_schedule"):
        # An objective's own parameters (genmd4's per-token exponents, read by calling the module outside the
        # model's forward) are replicated on the tp ranks: every rank computes the same loss rows from the
        # gathered logits, so their gradient is already the full one on each (Replicate, no reduction).
        from torch.distributed.tensor import distribute_module
        distribute_module(model.noise_schedule, tp_mesh)


def _replicate_conditioning(module: nn.Module, tp_mesh, *, sequence_shard: bool) -> None:
    """Time conditioning under TP: the module (time embedding or a modulation Linear, small) is replicated:
    its parameters become replicated DTensors on the tp mesh, its input (the same plain tensor on every tp
    rank) a replicated DTensor, its output a plain tensor again. sequence_shard: the output modulates this
    rank's sequence shard (the blocks), so its gradient here is this rank's partial sum over the sequence,
    declared Partial and summed across the tp ranks in backward; otherwise (the time embedding, the final
    norm's modulation, applied to the gathered sequence) the gradient is already the same full sum on every
    rank (Replicate)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_module

    def inputs(mod, args, mesh):
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                     if torch.is_tensor(a) and not isinstance(a, DTensor) else a for a in args)

    def outputs(mod, out, mesh):
        return out.to_local(grad_placements=[Partial()] if sequence_shard else None)
    distribute_module(module, tp_mesh, input_fn=inputs, output_fn=outputs)



def _settle_async_output(module, args, out):
    # The embedding's reduce-scatter is asynchronous: its local output is an AsyncCollectiveTensor. Handed to a
    # compiled block as is, its gradient reaches the reduce-scatter's backward as a plain tensor and fails
    # (torch 2.13, CPU); one cheap op here waits for it and gives the block an ordinary tensor.
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    return out.clone() if isinstance(out, AsyncCollectiveTensor) else out


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
    """Recompute in the backward pass, trading compute for activation memory:
    - full: whole blocks, all of them; selective: whole blocks, every `every`-th (blocks every-1, 2*every-1, ...);
    - op: every block, but the outputs of matmuls and attention kernels are saved (the expensive FLOPs run
      once); norms, RoPE, SwiGLU's activation and the residual adds are recomputed (torchtitan's op-level
      selective checkpointing, with a save-all-matmuls policy).
    The wrapper's name disappears from state dicts, so checkpoints do not depend on this setting."""
    if mode == "none":
        return
    if mode not in ("full", "selective", "op"):
        raise ValueError(f"parallel.activation_checkpoint={mode!r}; choose none, full, selective or op")
    if mode == "selective" and every < 1:
        raise ValueError(f"parallel.ac_every={every} must be >= 1")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    extra = {}
    if mode == "op":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts
        extra = {"context_fn": lambda: create_selective_checkpoint_contexts(_op_sac_policy)}
    for i, block in enumerate(model.layers):
        if mode in ("full", "op") or (i + 1) % every == 0:
            # preserve_rng_state=False: the blocks draw no random numbers (no dropout), so nothing to replay.
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)


def _saved_ops() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
           aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default}
    for name in ("_c10d_functional.reduce_scatter_tensor.default",):  # TP: no second reduce-scatter in recompute
        ns, op, overload = name.split(".")
        ops.add(getattr(getattr(getattr(torch.ops, ns), op), overload))
    ops.add(aten.max.default)  # float8's amax: recomputing it would change the scales
    from model.attention import flex_sac_ops
    ops |= flex_sac_ops()  # the flex HOP (compiled blocks) and the compiled flex region (eager blocks)
    return ops


_SAVED_OPS: Optional[set] = None


def _op_sac_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    global _SAVED_OPS
    if _SAVED_OPS is None:
        _SAVED_OPS = _saved_ops()
    if op in _SAVED_OPS or "flex_attention" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same tracing and autograd, no C++ code generation


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (they share one graph, so it compiles once): the loop over blocks and
    FSDP's per-block collectives stay in eager Python. In-place, so parameter names are unchanged. Works
    with tensor parallelism: the sequence gather is a parallel style (PrepareModuleInput) that dynamo traces
    into the block's graph, and the embedding's asynchronous output is settled before the first block."""
    for block in model.layers:
        # fullgraph: a graph break inside a block (e.g. a lazily created kernel) fails loudly instead of
        # silently splitting the graph and adding a guard-triggered recompile on the next step.
        block.compile(fullgraph=True, backend=COMPILE_BACKEND)


def enable_async_tp(tp_mesh) -> None:
    """Async TP (CUDA): the compiler fuses TP all-gathers/reduce-scatters with the adjacent matmuls over
    symmetric memory. Needs compile (validated in the config) and an NCCL tp group."""
    from torch._inductor import config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def apply_float8(model: nn.Module) -> None:
    """Float8 training (torchao, H100 and newer): the blocks' nn.Linear layers become Float8Linear (dynamic
    tensorwise scaling; weights stay fp32 masters, matmuls run in float8). The output head stays in bf16 (the
    logits' precision matters most for the loss), as in torchtitan. Gathers stay bf16 under FSDP (torchao's
    float8 all-gather would need a scale precompute after every optimizer step)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("parallel.float8=true needs torchao (pip install torchao) and a CUDA device with "
                           "float8 tensor cores (H100 or newer)") from e
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("parallel.float8=true needs a CUDA device with float8 tensor cores (sm_89 / H100 or "
                           "newer)")

    def in_blocks(module, fqn: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16; a block's time-conditioning modulation (one row
        # per sequence, not per token) stays in bf16
        return (fqn.startswith("layers.") and ".modulation." not in f"{fqn}." and module.in_features % 16 == 0
                and module.out_features % 16 == 0)
    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=in_blocks)


# ----------------------------------------------------------------------------- FSDP2

def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: Optional[torch.dtype], reshard: str = "default") -> None:
    """torchtitan's units: the embedding, each block, [final norm + output head] together, then the root
    (which then holds no parameters, or with time conditioning the time embedding and the final norm's
    modulation; each block's modulation is in its block's unit; an objective's own parameters, genmd4's
    exponents, are an fp32 unit kept gathered after its forward). Parameters are gathered per unit just in time
    in `param_dtype` and gradients reduce-scattered in fp32, each unit's reduce-scatter overlapping the
    backward of the next.

    reshard_after_forward, chosen per unit: "default" frees the gathered parameters of the embedding and of
    every block after their forward except the last block's and the head's (backward starts with those at
    once, so freeing and re-gathering them would only add all-gathers); "always" frees all (least memory);
    "never" keeps all gathered (ZeRO-2-like: no all-gathers in backward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if reshard not in ("default", "always", "never"):
        raise ValueError(f"parallel.reshard_after_forward={reshard!r}; choose default, always or never")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    body = reshard != "never"
    tail = reshard == "always"  # the last block and the head
    n = len(model.layers)
    fully_shard(model.tok_embeddings, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=body)
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=body if i < n - 1 else tail)
    fully_shard([model.norm, model.output], mesh=dp_mesh, mp_policy=mp, reshard_after_forward=tail)
    schedule = getattr(model, "noise_schedule", None)  # genmd4's exponents: a unit of their own, always fp32
    if schedule is not None:
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fully_shard(schedule, mesh=dp_mesh, mp_policy=fp32, reshard_after_forward=False)
    # The root leaves its forward inputs as they are: the noise level t of a time-conditioned model stays fp32
    # for its sinusoidal embedding (bf16 would round 1000 t by up to 4); the other inputs are integer/boolean.
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(model, mesh=dp_mesh, mp_policy=root_mp, reshard_after_forward=body)
    if schedule is not None:
        # The objective calls this unit before the model's forward (the masks depend on w). FSDP2 takes the
        # first unit to run forward as the root, so the real root is initialised first (idempotent, cheap).
        schedule.register_forward_pre_hook(lambda module, args: model._get_fsdp_state()._lazy_init(), prepend=True)


def dp_mesh_of(mesh, dims: ParallelDims):
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def uses_fsdp(pcfg, dims: ParallelDims, mesh) -> bool:
    """Whether parallelize() shards the model with FSDP2 (and so owns the bf16 cast): with data parallelism, and
    on CUDA at every degree, TP-only and one GPU included (a size-1 dp mesh), as torchtitan does: one precision
    path (bf16 parameters gathered per unit, fp32 master weights and gradient reduction) for every layout, and
    no autocast in training. parallel.fsdp_one_rank forces the size-1 path on the CPU."""
    if getattr(pcfg, "engine", "native") != "native" or mesh is None:
        return False
    return dims.dp > 1 or mesh.device_type == "cuda" or bool(getattr(pcfg, "fsdp_one_rank", False))


def lower_timeouts(seconds: int, mesh) -> None:
    """After the first step: NCCL collectives (the default group and the mesh's) fail after `seconds`, so a hung
    rank is found quickly once start-up (compilation, loading) is over. Gloo groups keep theirs."""
    if seconds <= 0 or not dist.is_initialized() or dist.get_backend() != "nccl":
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout
    timeout = datetime.timedelta(seconds=seconds)
    _set_pg_timeout(timeout, None)
    if mesh is not None:
        for name in mesh.mesh_dim_names:
            _set_pg_timeout(timeout, mesh[name].get_group())


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
    if getattr(pcfg, "float8", False):
        apply_float8(model)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
        if getattr(pcfg, "async_tp", False):
            enable_async_tp(mesh["tp"])
    apply_ac(model, pcfg.activation_checkpoint, pcfg.ac_every)
    if pcfg.compile:
        apply_compile(model)
    if uses_fsdp(pcfg, dims, mesh):
        apply_fsdp(model, dp_mesh_of(mesh, dims), param_dtype, getattr(pcfg, "reshard_after_forward", "default"))
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
