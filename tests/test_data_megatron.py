"""Megatron indexed datasets (.bin/.idx): our reader and writer, registering existing Megatron data, and,
when megatron-core is installed, byte-level agreement with it in both directions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data import build_data
from data.megatron import FormatError, IndexedShard, ShardWriter, have_megatron_core, write_index
from data.prepare import register_megatron
from data.shards import DataError, PackedSource, PreparedDataset
from datakit import data_config, distinct_docs, prepare_words, word_tokenizer

needs_mcore = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed (pip install "
                                                                  "'unmask[megatron]')")


def _write_raw(prefix, docs, dtype=np.uint16, sentences=False):
    """A Megatron dataset as Megatron-LM's preprocess_data.py lays it out; with `sentences`, each document is
    split into two sequences (its --split-sentences mode)."""
    flat = np.concatenate([np.asarray(d) for d in docs]).astype(dtype)
    with open(str(prefix) + ".bin", "wb") as f:
        f.write(flat.tobytes())
    if sentences:
        lengths, doc_idx = [], [0]
        for d in docs:
            half = len(d) // 2
            parts = [p for p in (half, len(d) - half) if p]
            lengths += parts
            doc_idx.append(len(lengths))
        write_index(Path(str(prefix) + ".idx"), dtype, np.array(lengths), np.array(doc_idx))
    else:
        write_index(Path(str(prefix) + ".idx"), dtype, np.array([len(d) for d in docs]))


@pytest.mark.parametrize("sentences", [False, True])
def test_reader_roundtrip(tmp_path, sentences):
    docs = distinct_docs(50, np.random.default_rng(0), max_len=9)
    docs[7] = [5]  # a one-token document (split in sentence mode into one sequence)
    _write_raw(tmp_path / "d", docs, sentences=sentences)
    shard = IndexedShard(tmp_path / "d")
    assert shard.num_docs == len(docs) and shard.num_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        assert shard.document(i).tolist() == d
    starts = np.cumsum([0] + [len(d) for d in docs])
    assert shard.boundaries(0, shard.num_tokens).tolist() == starts[1:-1].tolist()


def test_writer_is_atomic_and_checked(tmp_path):
    w = ShardWriter(tmp_path / "s", np.uint16)
    w.add(np.arange(10), np.array([4, 6]))
    assert not (tmp_path / "s.bin").exists()  # only the .tmp until commit
    w.commit()
    assert IndexedShard(tmp_path / "s").document(1).tolist() == [4, 5, 6, 7, 8, 9]
    with open(tmp_path / "s.bin", "ab") as f:  # a .bin longer than its index says
        f.write(b"\x00\x00")
    with pytest.raises(FormatError, match="truncated or mismatched"):
        IndexedShard(tmp_path / "s")
    (tmp_path / "t.idx").write_bytes(b"NOTMEGATRON" + b"\x00" * 30)
    (tmp_path / "t.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="not a Megatron index"):
        IndexedShard(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="u.bin is missing"):
        IndexedShard(tmp_path / "u")


@pytest.mark.parametrize("sentences", [False, True])
def test_register_existing_megatron_data(tmp_path, sentences):
    """Megatron-LM data trains here unchanged: documents come back packed, with their boundaries."""
    tok = word_tokenizer(tmp_path / "tok.json", 3000)
    eos = 3000  # with_specials adds <|endoftext|> after the 3000 words
    docs = [d + [eos] for d in distinct_docs(120, np.random.default_rng(1), max_len=20)]
    _write_raw(tmp_path / "corpus_text_document", docs, sentences=sentences)
    out = tmp_path / "registered"
    meta = register_megatron([str(tmp_path / "corpus_text_document")], out, str(tok), log=lambda *_: None)
    assert meta["eos_appended"] and meta["tokens"] == sum(map(len, docs)) and meta["tokenizer"]["eos_id"] == eos
    assert not (out / "corpus_text_document.bin").exists()  # referenced, not copied
    bundle = build_data(data_config(out, 16, valid_fraction=0.1), seed=0)
    ds = PreparedDataset(out)
    train, _ = ds.split(0.0)
    src = PackedSource(train, 16)
    x, doc = src.get(list(range(src.num_samples)))
    flat = np.concatenate(docs)
    assert np.array_equal(x.numpy().ravel(), flat[:src.num_samples * 16])
    owner = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])[:src.num_samples * 16].reshape(-1, 16)
    assert np.array_equal(np.diff(doc.numpy(), axis=1) != 0, np.diff(owner, axis=1) != 0)
    assert bundle.train.num_samples > 0


def test_register_rejects_ids_beyond_the_tokenizer(tmp_path):
    tok = word_tokenizer(tmp_path / "tok.json", 100)
    _write_raw(tmp_path / "c", [[1, 2, 3], [4, 500]])
    with pytest.raises(DataError, match="holds id 500 but tokenizer .* has 102 ids"):
        register_megatron([str(tmp_path / "c")], tmp_path / "out", str(tok), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


@needs_mcore
def test_megatron_core_reads_our_shards(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    docs = distinct_docs(200, np.random.default_rng(2))
    out = prepare_words(tmp_path, docs, shard_tokens=1500)
    ours = PreparedDataset(out)
    i = 0
    for k, entry in enumerate(ours.meta["shards"]):
        theirs = IndexedDataset(str(out / entry["prefix"]))
        assert len(theirs) == entry["docs"]
        for j in range(len(theirs)):
            assert theirs[j].tolist() == docs[i] + [ours.tokenizer.eos_id]
            i += 1
    assert i == len(docs)


@needs_mcore
def test_we_read_megatron_core_output_and_write_identically(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    docs = distinct_docs(80, np.random.default_rng(3))
    b = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for d in docs:
        b.add_document(torch.tensor(d), [len(d)])
    b.finalize(str(tmp_path / "mc.idx"))
    shard = IndexedShard(tmp_path / "mc")
    assert [shard.document(i).tolist() for i in range(len(docs))] == docs
    # Our writer produces the same bytes as megatron-core's builder.
    w = ShardWriter(tmp_path / "ours", np.uint16)
    w.add(np.concatenate(docs), np.array([len(d) for d in docs]))
    w.commit()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"mc{ext}").read_bytes()
    # And so does a whole preparation through --writer megatron-core.
    native = prepare_words(tmp_path, docs, name="n", shard_tokens=700)
    via_mc = prepare_words(tmp_path, docs, name="m", shard_tokens=700, tokenizer=tmp_path / "n_tokenizer.json",
                           writer="megatron-core")
    for s in PreparedDataset(native).meta["shards"]:
        for ext in (".bin", ".idx"):
            assert (native / (s["prefix"] + ext)).read_bytes() == (via_mc / (s["prefix"] + ext)).read_bytes()


@needs_mcore
def test_megatron_core_reader_gives_the_same_samples(tmp_path):
    docs = distinct_docs(150, np.random.default_rng(4))
    out = prepare_words(tmp_path, docs, shard_tokens=900)
    a = PackedSource(PreparedDataset(out).split(0.1)[0], 16)
    b = PackedSource(PreparedDataset(out, reader="megatron-core").split(0.1)[0], 16)
    idx = list(range(a.num_samples))
    xa, da = a.get(idx)
    xb, db = b.get(idx)
    assert torch.equal(xa, xb) and torch.equal(da, db)
