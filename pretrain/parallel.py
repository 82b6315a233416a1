"""Process groups, the device mesh, and parallelism applied to the plain model from outside.

Order (torchtitan's): tensor/sequence parallel -> activation checkpointing -> compile -> FSDP2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class ParallelDims:
    """One description of the layout. dp = dp_replicate * dp_shard ranks see different data."""
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, pcfg, world_size: int) -> "ParallelDims":
        dp_shard = pcfg.dp_shard
        if dp_shard == -1:
            if world_size % (pcfg.dp_replicate * pcfg.tp):
                raise ValueError(f"world size {world_size} is not divisible by parallel.dp_replicate="
                                 f"{pcfg.dp_replicate} x parallel.tp={pcfg.tp}")
            dp_shard = world_size // (pcfg.dp_replicate * pcfg.tp)
        dims = cls(pcfg.dp_replicate, dp_shard, pcfg.tp, world_size)
        if dims.dp_replicate * dims.dp_shard * dims.tp != world_size:
            raise ValueError(f"parallel.dp_replicate={dims.dp_replicate} x parallel.dp_shard={dims.dp_shard} x "
                             f"parallel.tp={dims.tp} = {dims.dp_replicate * dims.dp_shard * dims.tp} does not "
                             f"match the world size {world_size}")
        return dims

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


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


def build_mesh(dims: ParallelDims, device: torch.device):
    if dims.world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (dims.dp_replicate, dims.dp_shard, dims.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))


def dp_coordinates(mesh, dims: ParallelDims) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process."""
    if mesh is None:
        return 0, 1
    rep = mesh["dp_replicate"].get_local_rank()
    shard = mesh["dp_shard"].get_local_rank()
    return rep * dims.dp_shard + shard, dims.dp


def parallelize(model: nn.Module, pcfg, dims: ParallelDims, mesh, *, param_dtype: Optional[torch.dtype] = None
                ) -> nn.Module:
    if dims.tp > 1:
        raise NotImplementedError("tensor parallelism lands with the distributed-training issue")
    if mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model
