"""The layout planner and layout validation (launch/plan.py, pretrain/engines/parallel.py)."""
import json

import pytest

from dist_launch import load, run_once


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_once(tmp_path_factory, "four", 4, "four")


def plan(*args: str) -> dict:
    """launch.plan's JSON, computed in this process (it brings up and tears down its own fake process group)."""
    import contextlib
    import io

    from launch.plan import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main([*args, "--json"])
    return json.loads(buf.getvalue())


def test_exact_bytes_match_the_real_sharded_tensors(four):
    """The planner (meta device, fake process group of 4) against a real DP=2 x TP=2 run on 4 gloo ranks after
    one optimizer step: parameters, gradients and AdamW state of rank 0, to the byte."""
    real = load(four / "sharded_bytes.json")
    p = plan("--model", "tiny", "--vocab-size", str(real["vocab_size"]), "--nodes", "1", "--gpus-per-node", "4",
             "--tp", "2", "--seq-len", "64")
    rank0 = real["per_rank"][0]
    assert p["exact"]["params"] == rank0["params"]
    assert p["exact"]["grads"] == rank0["grads"]
    assert p["exact"]["optimizer"] == rank0["optimizer"]
    # Rank 0 is the worst case: uneven dimensions (vocab 65 here) give their remainder to the first ranks.
    assert all(r["params"] <= rank0["params"] for r in real["per_rank"])
    assert rank0["params"] > real["per_rank"][-1]["params"]


def test_llada_8b_on_64_gpus():
    p = plan("--model", "llada-8b", "--nodes", "8", "--gpus-per-node", "8", "--tp", "2", "--global-batch", "1280",
             "--ac", "full")
    assert p["dims"] == {"dp_replicate": 1, "dp_shard": 32, "tp": 2, "dp": 32}
    assert p["tokens_per_step"] == 1280 * 4096 and p["grad_accum"] == 40
    n_params = 8_015_794_176  # 6.98B non-embedding + 2 x 126464 x 4096
    # fp32 sharded over all 64 ranks, rounded up by the uneven split of a few dimensions
    assert n_params * 4 / 64 <= p["exact"]["params"] < n_params * 4 / 64 * 1.01
    assert p["exact"]["optimizer"] >= 2 * p["exact"]["params"]
    assert p["activations"]["full"] < p["activations"]["selective"] < p["activations"]["none"]
    assert not p["warnings"]


def test_warns_when_a_layout_cannot_fit_80gb():
    p = plan("--model", "llada-8b", "--nodes", "1", "--gpus-per-node", "8", "--micro-batch", "4", "--ac", "none")
    assert p["total"] > 80 * 1024 ** 3
    assert p["warnings"] and "exceeds" in p["warnings"][0]


def test_layout_validation_messages():
    from model.config import get_preset
    from pretrain.config import ParallelConfig
    from pretrain.engines.parallel import ParallelDims
    with pytest.raises(ValueError, match="does not match the world size"):
        ParallelDims.from_config(ParallelConfig(dp_shard=3, tp=2), 4)
    with pytest.raises(ValueError, match="not divisible by parallel.dp_replicate"):
        ParallelDims.from_config(ParallelConfig(tp=3), 4)
    dims = ParallelDims.from_config(ParallelConfig(tp=3), 6)
    assert (dims.dp_shard, dims.dp) == (2, 2)
    with pytest.raises(ValueError, match="model.n_heads=4 is not divisible by parallel.tp=3"):
        dims.validate_model(get_preset("tiny"))
    llada = get_preset("1028M")  # 14 heads
    with pytest.raises(ValueError, match="n_heads=14"):
        ParallelDims.from_config(ParallelConfig(tp=4), 8).validate_model(llada)
    with pytest.raises(ValueError, match="data.seq_len=66"):
        ParallelDims.from_config(ParallelConfig(tp=4), 4).validate_model(get_preset("tiny"), seq_len=66)


def test_unsupported_combinations_are_refused_up_front():
    from pretrain.config import ParallelConfig
    from pretrain.engines.parallel import ParallelDims
    # compile with tensor parallelism is supported (tests/test_perf_dist.py); async TP needs both
    assert ParallelDims.from_config(ParallelConfig(tp=2, compile=True), 2).tp == 2
    with pytest.raises(ValueError, match="engine=deepspeed runs ZeRO data parallelism only"):
        ParallelDims.from_config(ParallelConfig(tp=2, engine="deepspeed"), 2)
