"""One precision path: on CUDA the native engine always shards with FSDP2 (a size-1 data-parallel mesh on one
GPU or under TP only), so bf16 comes from FSDP's MixedPrecisionPolicy and never from autocast.
`parallel.fsdp_one_rank=true` takes that path on the CPU in fp32; it must train like the plain fp32 path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.engines.parallel import ParallelDims, uses_fsdp
from pretrain.config import ParallelConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
COMMON = ["train.steps=5", "train.log_every=1", "train.samples=0", "logging.plot=false", "logging.progress_bar=false",
          "data.random_length_prob=0", "train.peak_flops=1e12", "train.eval_every=5"]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_one_rank_fsdp_trains_like_the_plain_fp32_path(tmp_path):
    for flag in ("false", "true"):
        subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/tiny.yaml", *COMMON,
                        f"train.out_dir={tmp_path}", f"train.name=fsdp_{flag}", f"parallel.fsdp_one_rank={flag}"],
                       cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    plain, sharded = losses(tmp_path / "fsdp_false"), losses(tmp_path / "fsdp_true")
    assert len(plain) == len(sharded) == 5
    for a, b in zip(plain, sharded):
        assert abs(a - b) <= 1e-6 * abs(a), (plain, sharded)


def test_one_rank_fsdp_really_shards(tmp_path):
    """The flag is not a no-op: setup() builds a size-1 mesh and FSDP2 turns the parameters into DTensors."""
    code = ("from pretrain.config import load_config\nfrom pretrain.loop.train import setup\n"
            f"cfg = load_config('configs/tiny.yaml', ['parallel.fsdp_one_rank=true', 'train.out_dir={tmp_path}'])\n"
            "run = setup(cfg)\n"
            "p = next(run.model.parameters())\n"
            "print(type(p).__name__, run.mesh is not None, run.precision().__class__.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, check=True, capture_output=True,
                         text=True, timeout=600).stdout.split()
    assert out[-3:] == ["DTensor", "True", "nullcontext"], out


def test_cuda_always_takes_fsdp_and_cpu_only_when_asked():
    class Mesh:
        def __init__(self, kind):
            self.device_type = kind
    one = ParallelDims(1, 1, 1, 1)
    assert uses_fsdp(ParallelConfig(), one, Mesh("cuda"))
    assert not uses_fsdp(ParallelConfig(), one, Mesh("cpu"))
    assert uses_fsdp(ParallelConfig(fsdp_one_rank=True), one, Mesh("cpu"))
    assert not uses_fsdp(ParallelConfig(engine="deepspeed"), one, Mesh("cuda"))
    assert not uses_fsdp(ParallelConfig(), one, None)
    assert torch.distributed.is_available()
