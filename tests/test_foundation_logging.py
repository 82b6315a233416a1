"""wandb in offline mode: a run logs to a local wandb folder with no network, next to metrics.jsonl."""
import json

from pretrain.config import load_config
from pretrain.loop.train import train


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the test session disables wandb globally
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path}", "train.steps=3", "train.samples=0",
                                            "logging.progress_bar=false", "logging.wandb=offline",
                                            "logging.plot=false", "train.log_every=1"])
    train(cfg)
    run = tmp_path / "tiny"
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]
