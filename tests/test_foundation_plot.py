"""Loss-curve PNGs: what is drawn from metrics.jsonl, and that a finished run leaves one behind."""
import json

import pytest

from pretrain.config import load_config
from pretrain.plot import curves, main, plot_runs, read_metrics
from pretrain.loop.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, records, torn_tail: str = ""):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + torn_tail
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_resumed_steps_keep_the_last_record_and_a_torn_tail_is_ignored(tmp_path):
    run = write_metrics(tmp_path / "r", [
        {"step": 1, "loss": 4.0, "lr": 1e-3, "tokens": 100},
        {"step": 2, "loss": 3.5, "lr": 2e-3, "tokens": 200},
        {"step": 2, "val/valid": 3.6, "true_entropy": 1.25},
        {"step": 2, "loss": 3.4, "lr": 2e-3, "tokens": 200},  # the resumed run logs step 2 again
        {"step": 3, "loss": float("nan"), "lr": 3e-3, "tokens": 300},  # a diverged step is not drawn
    ], torn_tail='{"step": 4, "lo')
    c = curves(read_metrics(run))
    assert c["train"] == ([1, 2], [4.0, 3.4])
    assert c["val/valid"] == ([2], [3.6])
    assert c["lr"] == ([1, 2, 3], [1e-3, 2e-3, 3e-3])
    assert c["true_entropy"] == 1.25
    assert curves(read_metrics(run), x="tokens")["train"][0] == [100, 200]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(run)


def test_overlay_of_two_runs_writes_a_png(tmp_path):
    a = write_metrics(tmp_path / "mdm", [{"step": s, "loss": 4 / s, "lr": 1e-3} for s in range(1, 6)])
    b = write_metrics(tmp_path / "ar", [{"step": s, "loss": 3 / s, "lr": 1e-3} for s in range(1, 6)])
    out = plot_runs([a, b], tmp_path / "both.png", x="step")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("*.tmp.png"))


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing")])
    empty = write_metrics(tmp_path / "empty", [])
    with pytest.raises(SystemExit, match="no losses logged yet"):
        main([str(empty)])


def test_finished_run_leaves_loss_png_with_the_true_entropy(tmp_path):
    overrides = [f"train.out_dir={tmp_path}", "train.steps=4", "train.eval_every=2", "train.samples=0",
                 "logging.progress_bar=false", "train.log_every=1"]
    train(load_config("configs/tiny.yaml", overrides + ["train.name=with_plot"]))
    run = tmp_path / "with_plot"
    assert (run / "loss.png").read_bytes()[:8] == PNG_MAGIC
    c = curves(read_metrics(run))
    assert c["true_entropy"] is not None and sorted(c["val/valid"][0]) == [2, 4]

    train(load_config("configs/tiny.yaml", overrides + ["train.name=no_plot", "logging.plot=false"]))
    assert not (tmp_path / "no_plot" / "loss.png").exists()
