"""The GPT-2 tokenizer from its two usual files (vocab.json + merges.txt) wherever a tokenizer is accepted, and
MDLM's wrapped training blocks (data.framing=wrapped)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from datakit import SHARED, data_config, distinct_docs, prepare_words

GPT2 = SHARED / "gpt2-tokenizer"
needs_gpt2 = pytest.mark.skipif(not (GPT2 / "vocab.json").is_file(), reason="../shared/data/gpt2-tokenizer absent")


def _mini_gpt2_folder(path):
    """A 260-id byte-level BPE in GPT-2's file layout: 256 byte symbols, 3 merges, <|endoftext|>."""
    from data.tokenizer import _BYTE_CHARS
    vocab = {_BYTE_CHARS[b]: i for i, b in enumerate(range(256))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def test_gpt2_layout_folder_loads_without_tokenizer_json(tmp_path):
    from data.tokenizer import build_tokenizer
    vocab = _mini_gpt2_folder(tmp_path / "tok")
    tok = build_tokenizer(str(tmp_path / "tok"), 0)
    assert tok.encode("hello") == [vocab["hell"], vocab["o"]]
    assert tok.eos_id == vocab["<|endoftext|>"] and tok.mask_id == len(vocab) and tok.bos_id is None
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"
    (tmp_path / "empty").mkdir()
    from data.shards import DataError
    with pytest.raises(DataError, match="vocab.json"):
        build_tokenizer(str(tmp_path / "empty"), 0)


@needs_gpt2
def test_shared_gpt2_tokenizer_gives_gpt2_ids():
    from data.tokenizer import DocumentEncoder, build_tokenizer
    tok = build_tokenizer(str(GPT2), 0)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" The quick brown fox jumps over the lazy dog.") == \
        [383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    assert tok.eos_id == 50256 and tok.mask_id == 50257 and tok.vocab_size == 50258
    enc = DocumentEncoder(tok.tok.to_str(), tok.eos_id)  # what data.prepare encodes with
    assert enc.fast and enc.encode("Hello world") == [15496, 995]


@needs_gpt2
def test_prepare_and_counts_accept_the_gpt2_folder(tmp_path):
    from data.prepare import PrepareJob, prepare
    from data.shards import PreparedDataset
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "Hello world"}) + "\n" + json.dumps({"text": "Hello"}) + "\n")
    prepare(PrepareJob(inputs=[str(src)], tokenizer=str(GPT2)), tmp_path / "out", workers=1, progress=False,
            log=lambda *_: None)
    ds = PreparedDataset(tmp_path / "out")
    assert ds.document(0).tolist() == [15496, 995, 50256] and ds.document(1).tolist() == [15496, 50256]
    from eval.ppl import load_counting_tokenizer
    assert load_counting_tokenizer(str(GPT2)).encode("Hello world") == [15496, 995]


def test_wrapped_framing_gives_mdlm_training_blocks(tmp_path):
    from data.prepared import build_prepared
    rng = np.random.default_rng(0)
    docs = distinct_docs(30, rng, max_len=12)
    folder = prepare_words(tmp_path, docs)
    packed = build_prepared(data_config(folder, 10, valid_fraction=0.1), seed=0)
    wrapped = build_prepared(data_config(folder, 10, valid_fraction=0.1, framing="wrapped"), seed=0)
    eos = wrapped.eos_id
    src = wrapped.train
    n = src.stream.num_tokens
    flat, ids = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    src.stream.read(0, n, flat, ids)
    stream = flat.tolist()  # the training documents, each followed by EOS
    assert stream.count(eos) > 20 and stream[-1] == eos
    assert src.num_samples == len(stream) // 8 and packed.train.num_samples == len(stream) // 10
    x, doc = src.get(list(range(src.num_samples)))
    for i, row in enumerate(x.tolist()):
        assert row == [eos] + stream[i * 8:(i + 1) * 8] + [eos]  # [BOS] + L-2 + [EOS], BOS = EOS for GPT-2 style
    assert (doc[:, 0] == doc[:, 1]).all() and (doc[:, -1] == doc[:, -2]).all()
    assert "wrapped" in wrapped.description


def test_wrapped_framing_is_validated():
    from pretrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="framing=wrapped needs data.kind=prepared"):
        load_config("configs/tiny.yaml", ["data.framing=wrapped"])


def test_owt_mdlm_recipe_is_mdlms_setup():
    from pretrain.config import load_config
    cfg = load_config("configs/owt-mdlm.yaml")
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    assert (m.n_layers, m.dim, m.n_heads, m.max_seq_len) == (12, 768, 12, 1024)
    assert d.seq_len == 1024 and d.framing == "wrapped" and d.prepare.tokenizer.endswith("gpt2-tokenizer")
    assert (t.global_batch_size, t.steps, t.ema_decay, t.dtype) == (512, 1_000_000, 0.9999, "bf16")
    assert (o.lr, o.warmup_steps, o.schedule, o.weight_decay) == (3e-4, 2500, "constant", 0.0)
