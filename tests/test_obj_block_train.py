"""Block diffusion through the trainer and the evaluation commands (model/objectives/block.py):

- BD3-LM's clipped-interval search at validation (diffusion.block_clip_search): the least-variance interval is
  adopted for training, kept in checkpoints for an exact resume, and the logged bound stays the unbiased
  (eps, 1) NELBO;
- `python -m eval.ppl` on a block checkpoint (the row names the objective and its estimator, the bound is finite
  and above the true entropy), `eval.generate` with the exact cache equal to without it (LLaDA and ReMDM);
- parallel.compile=true and the DeepSpeed engine train it with the eager native run's losses.
"""
import contextlib
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from pretrain.config import load_config
from pretrain.loop.train import train
from tests.conftest import ROOT

BLOCK = ["diffusion.objective=block", "diffusion.block_size=4"]
SEARCH = ["diffusion.block_clip_search=true", "diffusion.block_clip_widths=[0.9]"]  # (eps, 1) and 3 of width 0.9
RUN = ["train.steps=2", "train.eval_every=1", "train.save_every=1", "train.log_every=1", "train.samples=0",
       "logging.plot=false", "logging.progress_bar=false", "train.threads=1", "train.peak_flops=1e12"]


def run(out, name, *extra):
    return train(load_config(str(ROOT / "configs" / "tiny.yaml"), [*BLOCK, *RUN, f"train.out_dir={out}",
                                                                   f"train.name={name}", *extra]))


def records(run_dir):
    """step -> {"loss": ..., "val": ..., the adopted interval ...}; a resumed run's later records win."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k != "step"})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("block_runs")
    run(out, "plain")
    run(out, "search", *SEARCH)
    return out


def test_clip_search_is_adopted_resumed_and_the_bound_stays_unbiased(runs):
    plain, search = records(runs / "plain"), records(runs / "search")
    # the bound logged at step 1 (same weights) does not depend on the search: the unbiased (eps, 1) NELBO
    assert search[1]["val/valid"] == plain[1]["val/valid"]
    candidates = {(1e-3, 1.0), (1e-3, 0.9), (0.05, 0.95), (0.1, 1.0)}
    for step in (1, 2):
        rec = search[step]
        assert (rec["block_t_min"], rec["block_t_max"]) in candidates
        assert rec["clip_variance"] <= rec["clip_variance_unclipped"]
    adopted = (search[1]["block_t_min"], search[1]["block_t_max"])
    assert adopted != (1e-3, 1.0)  # (this run: the searched interval beats the unclipped one)
    # step 2 trains on the adopted interval; step 1 (before any validation) on (eps, 1)
    assert search[1]["loss"] == plain[1]["loss"] and search[2]["loss"] != plain[2]["loss"]
    from pretrain.checkpoint.store import read_trainer_state
    state = read_trainer_state(runs / "search" / "checkpoints" / "step_00000001")
    assert (state["objective"]["block_t_min"], state["objective"]["block_t_max"]) == adopted
    # resumed from the step-1 checkpoint: step 2 is trained on the adopted interval again, bit for bit
    resumed = runs / "search_resumed"
    shutil.copytree(runs / "search", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002")
    (resumed / "metrics.jsonl").unlink()
    run(runs, "search_resumed", *SEARCH)
    again = records(resumed)
    assert "loss" not in again.get(1, {}) and again[2]["loss"] == search[2]["loss"]  # (a fresh start: step 1)


def test_search_variants_sums_per_batch_variances_over_the_global_batch():
    """The variance arithmetic of pretrain.loop.evaluate.search_variants, with per-unit losses set by hand."""
    from data import build_data
    from pretrain.loop.evaluate import search_variants
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [*BLOCK, "train.eval_batches=3"])
    data = build_data(cfg.data, cfg.train.seed)
    G = cfg.train.global_batch_size
    spread = {"a": 1.0, "b": 0.25, "c": 2.0}
    seen = []

    class Variant:
        def __init__(self, key):
            self.key = key

        def noise(self, x0, rows, doc):
            from model.objectives import Noised
            return Noised(x0=x0, xt=x0)

        def unit_losses(self, model, batch, ce_chunk=0):
            B = batch.x0.shape[0]
            i = len([k for k in seen if k == self.key])
            seen.append(self.key)
            return spread[self.key] * (torch.arange(B * 3, dtype=torch.float64).view(B, 3) + i)

    class Searched:
        def variants(self):
            return {k: Variant(k) for k in spread}

        def draw(self, *a, **k):
            return type("N", (), {"rows": lambda self, r: None})()

        def adopt(self, variances):
            self.variances = variances
            return {"key": min(variances, key=variances.get)}
    obj = Searched()
    model = torch.nn.Linear(1, 1)
    out = search_variants(model, cfg, next(iter(data.valid.values())), dp_rank=0, dp_size=1, micro=G // 2,
                          device=torch.device("cpu"), autocast=contextlib.nullcontext(), objective=obj)
    # per batch: two micro-batches of G/2 rows x 3 units, shifted by the call index; variance over the batch
    for key, c in spread.items():
        expected = 0.0
        for b in range(3):
            units = torch.cat([c * (torch.arange(G // 2 * 3, dtype=torch.float64) + 2 * b + m) for m in range(2)])
            expected += float(units.var())
        assert obj.variances[key] == pytest.approx(expected, rel=1e-12)
    assert out == {"key": "b"}


def test_eval_ppl_on_a_block_checkpoint(runs, tmp_path):
    args = [sys.executable, "-m", "eval.ppl", "--ckpt", str(runs / "plain"), "--datasets", "synthetic", "--seq-len",
            "64", "--max-blocks", "16", "--samples", "2", "--seed", "3", "--batch-size", "16", "--threads", "1",
            "--device", "cpu", "--no-progress", "--method", "count,t", "--out", str(tmp_path)]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "ppl.json").read_text())["results"]
    assert [(r["objective"], r["method"]) for r in rows] == [("block", "count"), ("block", "t")]
    for r in rows:
        assert r["bound"] and math.isfinite(r["nelbo"]) and r["stderr"] > 0
        assert r["nelbo"] >= r["true_entropy"] - 4 * r["stderr"]


@pytest.mark.parametrize("flags", [[], ["--sampler", "remdm", "--remdm-strategy", "rescale", "--eta", "0.3"]])
def test_eval_generate_exact_cache_equals_no_cache(runs, capsys, flags):
    from eval.generate import main
    texts = []
    for cache in ("none", "prefix"):
        assert main(["--ckpt", str(runs / "plain"), "--prompt", "ba be bi", "--num-samples", "2", "--gen-length",
                     "24", "--steps", "24", "--temperature", "1.0", "--seed", "7", "--threads", "1", "--device",
                     "cpu", "--kv-cache", cache, *flags]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "block 4" in lines[0] and ("exact KV cache" in lines[0]) == (cache != "none")
        texts.append([line for line in lines if not line.startswith("#")])
    assert texts[0] == texts[1] and len(texts[0]) == 5  # two samples between three separators


def test_compiled_blocks_train_block_diffusion_as_eager(runs, monkeypatch, tmp_path):
    """parallel.compile=true (dynamo + AOT autograd, the tracing inductor sees; no C++ code generation on CPU)
    gives the eager run's losses: the 2L input with its prebuilt mask and explicit positions compiles."""
    import pretrain.engines.parallel as parallel
    monkeypatch.setattr(parallel, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    try:
        run(tmp_path, "compiled", "parallel.compile=true")
    finally:
        torch._dynamo.reset()
    eager, compiled = records(runs / "plain"), records(tmp_path / "compiled")
    for step in (1, 2):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], abs=1e-6)
        assert compiled[step]["val/valid"] == pytest.approx(eager[step]["val/valid"], abs=1e-6)


def test_deepspeed_engine_trains_block_diffusion(runs, tmp_path):
    """One process (ZeRO's own backward and step, the engine-wrapped forward): the native run's losses."""
    pytest.importorskip("deepspeed", reason="the DeepSpeed engine needs pip install -e .[deepspeed]")
    args = [sys.executable, "-m", "pretrain", "--config", "configs/tiny.yaml", *BLOCK, *RUN,
            f"train.out_dir={tmp_path}", "train.name=ds", "parallel.engine=deepspeed"]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    native, ds = records(runs / "plain"), records(tmp_path / "ds")
    for step in (1, 2):
        assert ds[step]["loss"] == pytest.approx(native[step]["loss"], abs=1e-5)
        assert ds[step]["val/valid"] == pytest.approx(native[step]["val/valid"], abs=1e-5)
