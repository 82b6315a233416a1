"""The GPU-path fixes that a CPU can check, on 2 gloo processes (tests/dist_worker.py scenario `perf`):
fewer collectives per step with gradient accumulation (same losses and gradients), the RoPE table under
FSDP's bf16 input cast, compiled tensor parallelism and the random-length cut through the trainer's step."""
import pytest

from dist_launch import GRAD_TOL, LOSS_TOL, check_equivalence as check, load, run_once


@pytest.fixture(scope="module")
def perf(tmp_path_factory):
    return run_once(tmp_path_factory, "perf", 2, "perf")


def test_accumulation_reduces_gradients_once_per_step(perf):
    comm = load(perf / "perf.json")["comm"]
    fsdp = comm["dp2_accum4"]
    accum = fsdp["after"]["accum"]
    assert accum == 4
    # one reduce-scatter per parameter-holding unit per step (embedding, 2 blocks, norm + head), instead of
    # one per unit per micro-batch
    assert fsdp["after"]["counts"]["reduce_scatter_single"] == 4
    assert fsdp["before"]["counts"]["reduce_scatter_single"] == 3 * accum
    assert fsdp["after"]["bytes"]["reduce_scatter_single"] < fsdp["before"]["bytes"]["reduce_scatter_single"] / 2
    hsdp = comm["hsdp2x1_accum2"]  # replicas: all-reduce across them, once per step and unit
    assert hsdp["after"]["counts"]["all_reduce"] == 4
    assert hsdp["before"]["counts"]["all_reduce"] == 3 * hsdp["before"]["accum"]
    for layout in (fsdp, hsdp):
        assert layout["loss_diff"] < LOSS_TOL and layout["grad_diff"] < GRAD_TOL


def test_rope_table_reaches_blocks_unrounded_under_fsdp_bf16(perf):
    rope = load(perf / "perf.json")["rope"]
    assert rope["dtype"] == "torch.complex64"
    assert rope["max_error"] == 0.0
    # the failure it prevents: a real fp32 table passed to an FSDP unit the same way is cast to bf16
    assert rope["real_table_arrives_as"] == "torch.bfloat16"


def test_compiled_tp2_and_compiled_dp2_with_accumulation_match_single_process(perf):
    rep = load(perf / "equivalence_compile.json")
    check(rep, "tp2_compile", 2)
    check(rep, "dp2_compile_accum2", 2)


def test_random_length_cut_through_the_trainer_step(perf):
    rep = load(perf / "equivalence_random_length.json")
    assert all(length < 64 for length in rep["_ref_length"])  # every step was cut
    check(rep, "dp2_random_length_accum2", 2)
