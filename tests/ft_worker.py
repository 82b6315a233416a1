"""Multi-process scenarios for tests/test_chaos.py, run under torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ft_worker.py SCENARIO OUT_DIR

commit_fails: rank 0's commit fails (a full disk while writing the manifest); every rank must get the same
CheckpointError, promptly, instead of waiting in a barrier. Each rank writes what it got to OUT_DIR/rank<r>.json.
"""
from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pretrain.checkpoint.store as ckmod  # noqa: E402


def commit_fails(out: Path) -> None:
    rank = dist.get_rank()
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    ck = ckmod.Checkpointer(out / "checkpoints", process_group=dist.new_group(backend="gloo"))
    ck.save(1, model, opt, {"step": 1})
    if rank == 0:
        real = ckmod._write_json

        def enospc(path, obj):
            if path.name == ckmod.MANIFEST_FILE:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(path, obj)
        ckmod._write_json = enospc
    t0 = time.perf_counter()
    try:
        ck.save(2, model, opt, {"step": 2})
        got = None
    except ckmod.CheckpointError as e:
        got = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps({"error": got, "seconds": time.perf_counter() - t0}))
    # Both ranks can still work together afterwards (nobody is stuck in a collective).
    flag = torch.ones(1)
    dist.all_reduce(flag)
    assert flag.item() == dist.get_world_size()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"commit_fails": commit_fails}[scenario](out)
    dist.destroy_process_group()
