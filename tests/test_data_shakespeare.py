"""The offline real-text recipe on the shared Tiny Shakespeare file: preparation is lossless, and
configs/shakespeare.yaml prepares on first use and trains with both validation sets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data.prepare import PrepareJob, prepare
from data.shards import PreparedDataset
from datakit import SHARED

TEXT = SHARED / "tinyshakespeare" / "input.txt"
WIKI = SHARED / "wikitext-2" / "wiki.valid.tokens"
pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason="../shared/data/tinyshakespeare is not present")


def test_prepared_shakespeare_is_lossless(tmp_path):
    out = tmp_path / "shk"
    meta = prepare(PrepareJob(inputs=[str(TEXT)], tokenizer="bpe", vocab_size=1024, shard_tokens=100_000), out,
                   workers=2, progress=False, log=lambda *_: None)
    text = TEXT.read_text(encoding="utf-8")
    paragraphs = [p for p in "".join(l if l.strip() else "\x00" for l in text.splitlines(True)).split("\x00") if p]
    ds = PreparedDataset(out)
    assert ds.num_docs == meta["docs"] == len(paragraphs)
    assert len(ds.shards) == len(meta["shards"]) >= 3
    tok = ds.tokenizer
    for d in range(0, ds.num_docs, 97):  # a spread of speeches decode back exactly
        assert tok.decode(ds.document(d)[:-1].tolist()) == paragraphs[d]
    ids = np.concatenate([np.asarray(s.tokens(0, s.num_tokens)) for s in ds.shards])
    assert len(ids) == meta["tokens"] and ids.max() < tok.vocab_size and tok.mask_id not in ids
    # 1.1 MB of English at ~2.5 bytes per token with a 1k BPE (the 4k recipe: ~3.3).
    assert 2.0 < len(text.encode()) / (meta["tokens"] - meta["docs"]) < 3.5


@pytest.mark.skipif(not WIKI.is_file(), reason="../shared/data/wikitext-2 is not present")
def test_recipe_prepares_on_first_use_and_trains(tmp_path):
    from pretrain.config import load_config
    from pretrain.loop.train import train
    cache = tmp_path / "cache" / "shk"
    cfg = load_config("configs/shakespeare.yaml", [
        f"data.sources=[{{path: {cache}}}]", "data.prepare.vocab_size=1024", "data.seq_len=64",
        "model.dim=64", "model.n_layers=2", "model.ffn_dim=192",  # the recipe's data, a smaller model: seconds
        "train.steps=10", "train.global_batch_size=8", "train.eval_every=10", "train.eval_batches=1",
        "train.log_every=1", "train.save_every=10", "train.samples=0", "optim.warmup_steps=2",
        f"train.out_dir={tmp_path / 'runs'}", "logging.progress_bar=false"])
    result = train(cfg)
    assert (cache / "meta.json").is_file() and not (cache.parent / "shk.partial").exists()
    run = tmp_path / "runs" / "shakespeare"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r for r in rows if "val/valid" in r]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert vals and np.isfinite(vals[-1]["val/valid"]) and np.isfinite(vals[-1]["val/wiki.valid"])
    assert np.isfinite(result["val_loss"])
    saved = json.loads((run / "tokenizer_meta.json").read_text())
    assert saved["fingerprint"] == json.loads((cache / "meta.json").read_text())["tokenizer"]["fingerprint"]
