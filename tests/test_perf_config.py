"""Config switches of the GPU path, the precision policy, the slurm template and the GPU check's CPU smoke run."""
import contextlib
import subprocess
import sys

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.loop.step import precision_context
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_new_switches_validate_with_clear_messages():
    with pytest.raises(ConfigError, match="async_tp=true needs parallel.tp > 1 and parallel.compile=true"):
        load_config(TINY, ["parallel.async_tp=true", "parallel.tp=2"])
    assert load_config(TINY, ["parallel.async_tp=true", "parallel.tp=2", "parallel.compile=true"]).parallel.async_tp
    with pytest.raises(ConfigError, match="diffusion.ce_chunk=-1 must be >= 0"):
        load_config(TINY, ["diffusion.ce_chunk=-1"])
    with pytest.raises(ConfigError, match="parallel.timeout_s=-5 must be >= 0"):
        load_config(TINY, ["parallel.timeout_s=-5"])
    with pytest.raises(ConfigError, match="auto, sdpa, flex, flash"):
        load_config(TINY, ["model.attn_backend=xformers"])
    with pytest.raises(ConfigError, match="none, full, selective, op"):
        load_config(TINY, ["parallel.activation_checkpoint=some"])
    with pytest.raises(ConfigError, match="parallel.float8=true runs with the native engine and data parallelism"):
        load_config(TINY, ["parallel.float8=true", "parallel.tp=2"])
    assert load_config(TINY, ["parallel.float8=true"]).parallel.float8


def test_float8_refuses_a_machine_without_float8_tensor_cores():
    from model import ModelConfig, Transformer
    from pretrain.engines.parallel import apply_float8
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("a float8-capable GPU is present: the GPU check measures this path")
    with pytest.raises(RuntimeError, match="parallel.float8=true needs"):
        apply_float8(Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=10, mask_id=9)))


def test_one_precision_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # fp32 everywhere: nothing
    assert precision_context(cpu, False, fsdp=False) is contextlib.nullcontext
    # FSDP casts the parameters itself: no autocast on top
    assert precision_context(cuda, True, fsdp=True) is contextlib.nullcontext
    # one device or TP only: bf16 autocast over fp32 master weights
    ctx = precision_context(cpu, True, fsdp=False)()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_slurm_template_prepares_data_once_and_sets_cluster_switches():
    out = subprocess.run([sys.executable, "-m", "launch.slurm", "--nodes", "2", "--gpus-per-node", "8", "--config",
                          "configs/tiny.yaml", "--socket-ifname", "ib0", "--flight-recorder", "2000"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
    prep = out.index("python -m launch.prepare_data")
    assert prep < out.index("torchrun")
    assert "export NCCL_SOCKET_IFNAME=ib0" in out and "export GLOO_SOCKET_IFNAME=ib0" in out
    assert "parallel.flight_recorder=2000" in out and "TORCH_FR_DUMP_TEMP_FILE" in out


def test_gpu_check_dry_run_on_cpu(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("correctness.json", "speed.json", "memory.json", "tables.md"):
        assert (tmp_path / name).exists(), name
    tables = (tmp_path / "tables.md").read_text()
    assert "Table 1" in tables and "Table 2" in tables and "Table 3" in tables
    assert "sdpa" in tables
