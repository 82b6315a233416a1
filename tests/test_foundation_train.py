"""End-to-end training behaviour on CPU: overfitting, exact resume, the synthetic oracle."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.synthetic import MarkovLanguage
from model import ModelConfig, Transformer
from pretrain.config import OptimConfig, load_config
from model.objectives import sample_u
from model.objectives.mdm import mdm_loss
from model.objectives.schedules import LinearSchedule
from pretrain.loop.train import build_optimizer, train
from tests.conftest import ROOT


def test_tiny_model_overfits_a_fixed_batch():
    """Two fixed sequences (each row repeated so every step sees many noise levels). The NELBO of memorized
    data is not zero (with every token masked the model can only guess the unigram), but it is far below
    the start: the loss must fall by more than 90%."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=256, vocab_size=33, mask_id=32,
                                    max_seq_len=64))
    model.init_weights(seed=0)
    opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 32, (2, 16), generator=gen).repeat(8, 1)
    sched = LinearSchedule()
    losses = []
    for _ in range(600):
        loss, _ = mdm_loss(model, x0, sample_u(16, gen, stratified=True), torch.rand(16, 16, generator=gen),
                           mask_id=32, schedule=sched, eps=1e-3)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.1 * losses[0], (losses[0], np.mean(losses[-50:]))


def _losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _run(out_dir, *extra):
    args = [sys.executable, "-m", "pretrain", "--config", "configs/tiny.yaml", f"train.out_dir={out_dir}",
            "train.log_every=1", "train.samples=0", "logging.progress_bar=false", "train.threads=1", *extra]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)


def test_save_kill_resume_gives_identical_losses(tmp_path):
    _run(tmp_path, "train.name=straight", "train.steps=16", "train.save_every=100")
    # Stop right after the step-7 checkpoint (as a preemption would), then resume from it in a new process.
    _run(tmp_path, "train.name=resumed", "train.steps=16", "train.save_every=100", "train.stop_after=7",
         "data.random_length_prob=0.3")
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["step_00000007"]
    _run(tmp_path, "train.name=resumed", "train.steps=16", "train.save_every=100", "data.random_length_prob=0.3")
    _run(tmp_path, "train.name=straight_rl", "train.steps=16", "train.save_every=100", "data.random_length_prob=0.3")
    straight, resumed = _losses(tmp_path / "straight_rl"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 17))
    for step in range(8, 17):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])
    # and the random-length option really changed the run
    assert _losses(tmp_path / "straight") != straight


def test_half_written_checkpoint_is_ignored(tmp_path):
    _run(tmp_path, "train.name=r", "train.steps=4", "train.save_every=2")
    ck = tmp_path / "r" / "checkpoints"
    (ck / "step_00000006.tmp").mkdir()  # what a crash mid-save leaves behind
    (ck / "step_00000008").mkdir()  # renamed but without trainer state: not complete either
    from pretrain.checkpoint.store import latest_checkpoint
    assert latest_checkpoint(ck).name == "step_00000004"


def test_synthetic_entropy_matches_empirical_nll():
    lang = MarkovLanguage(32, 3, 0.5, seed=5)
    rng = np.random.default_rng(0)
    seqs = lang.sample(rng.random((4000, 16)))
    nll = -np.log(lang.pi[seqs[:, 0]]) - np.log(lang.P[seqs[:, :-1], seqs[:, 1:]]).sum(1)
    empirical = nll.mean() / 16
    se = nll.std() / 16 / math.sqrt(len(nll))
    assert abs(empirical - lang.entropy_per_token(16)) < 4 * se
    assert lang.valid_transition_rate(seqs[0].tolist()) == 1.0


def test_quickstart_model_learns_and_still_bounds_the_true_entropy(tmp_path):
    cfg = load_config("configs/quickstart.yaml", [f"train.out_dir={tmp_path}", "train.steps=200",
                                                  "train.eval_every=200", "train.save_every=200", "train.samples=2",
                                                  "train.sample_steps=16", "logging.progress_bar=false",
                                                  "train.eval_batches=4"])
    result = train(cfg)
    start = math.log(cfg.model.vocab_size)  # a uniform guess
    assert result["true_entropy"] < result["val_loss"] < start - 1.5, result
    assert len(result["samples"]) == 2 and all(cfg.model.mask_id not in s for s in result["samples"])
    lines = (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()
    assert any("val/valid" in line for line in lines)
    assert (tmp_path / "quickstart" / "config.yaml").is_file()


def test_progress_bar_only_on_a_terminal(tmp_path, capfd):
    """Logs and pipes (slurm's output file, CI) get the step lines but no progress bar."""
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path}", "train.steps=3", "train.log_every=1",
                                            "train.eval_every=3", "train.save_every=3", "train.samples=0",
                                            "logging.progress_bar=true", "logging.plot=false"])
    train(cfg)
    out, err = capfd.readouterr()
    assert re.search(r"step +3/3 \| loss", out), out
    assert "it/s" not in err and "train:" not in err, err


def test_ar_is_compared_with_the_entropy_rate_it_bounds():
    """AR's loss scores tokens 2..L given their prefixes, so what it bounds is the entropy rate, not the
    whole-sequence entropy per token (which includes the first token's larger entropy): with the latter AR
    would sit below its 'bound'. Diffusion objectives score all L tokens."""
    from data import build_data
    from model.objectives import DiffusionConfig, build_objective
    from pretrain.loop.train import true_entropy
    cfg = load_config("configs/tiny.yaml")
    data = build_data(cfg.data, 0)
    lang = data.info["language"]
    ar = build_objective(DiffusionConfig(objective="ar"), mask_id=cfg.model.mask_id)
    mdm = build_objective(DiffusionConfig(objective="mdm"), mask_id=cfg.model.mask_id)
    assert true_entropy(data, mdm) == data.true_entropy == lang.entropy_per_token(cfg.data.seq_len)
    assert true_entropy(data, ar) == lang.entropy_rate < data.true_entropy
    # the exact NLL of real sequences, tokens 2..L, averages to the entropy rate
    seqs = lang.sample(np.random.default_rng(0).random((4000, cfg.data.seq_len)))
    nll = -np.log(lang.P[seqs[:, :-1], seqs[:, 1:]]).mean(1)
    assert abs(nll.mean() - true_entropy(data, ar)) < 4 * nll.std() / math.sqrt(len(nll))


def test_a_run_that_raises_restores_the_signal_handlers_and_the_garbage_collector(tmp_path, monkeypatch):
    """train() installs SIGTERM/SIGUSR1 handlers (preemption) and turns automatic GC off; an exception in the
    loop must undo both, or a later fork in the same process (a data-preparation pool) inherits a handler that
    turns the pool's terminate() into a flag and hangs."""
    import gc
    import signal

    import pretrain.loop.train as loop

    before = signal.getsignal(signal.SIGTERM)

    def boom(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) is not before  # the handler is in place while the loop runs
        raise RuntimeError("boom")
    monkeypatch.setattr(loop, "train_step", boom)
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path}", "train.samples=0", "logging.plot=false",
                                            "logging.progress_bar=false", "train.gc_every=5",
                                            "train.peak_flops=1e11"])
    with pytest.raises(RuntimeError, match="boom"):
        loop.train(cfg)
    assert signal.getsignal(signal.SIGTERM) is before and gc.isenabled()
