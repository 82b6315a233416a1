"""Where this process stands in a job: its rank and the world size (0 and 1 outside torch.distributed).

The one copy for every package (data, pretrain, eval, the tests); it imports nothing of the project."""
from __future__ import annotations

import torch.distributed as dist


def distributed() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1
