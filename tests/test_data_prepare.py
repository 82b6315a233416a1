"""python -m data.prepare: input formats, tokenizers, shards and metadata, resume, and the clear-error cases
(nothing written half-way)."""
from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np
import pytest

from data.inputs import InputSpec, iter_documents
from data.megatron import IndexedShard
from data.prepare import PrepareJob, main, prepare
from data.shards import DataError, PreparedDataset
from data.tokenizer import DocumentEncoder, TextTokenizer, build_tokenizer, save_run_tokenizer
from datakit import SHARED, distinct_docs, prepare_words

QUIET = dict(progress=False, log=lambda *_: None)
TEXT = ("First paragraph, line one.\nLine two of it.\n\n\nSecond paragraph: numbers 12345 and "
        "contractions they're, it's.\n  \nThird — ünïcödé 你好 emoji 🙂 and   runs of   spaces\t\ttabs.\n")
PARAGRAPHS = ["First paragraph, line one.\nLine two of it.\n",
              "Second paragraph: numbers 12345 and contractions they're, it's.\n",
              "Third — ünïcödé 你好 emoji 🙂 and   runs of   spaces\t\ttabs.\n"]


def _bpe_job(inputs, **kw):
    return PrepareJob(inputs=[str(i) for i in inputs], tokenizer="bpe", vocab_size=kw.pop("vocab_size", 300), **kw)


def _decoded_docs(folder):
    ds = PreparedDataset(folder)
    tok = ds.tokenizer
    out = []
    for d in range(ds.num_docs):
        ids = ds.document(d).tolist()
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        out.append(tok.decode(ids[:-1]))
    return out


# ----------------------------------------------------------------------------- inputs

def test_text_document_splits(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    docs = lambda mode: list(iter_documents(InputSpec(inputs=[str(f)], doc_split=mode)))
    assert docs("paragraph") == PARAGRAPHS
    assert docs("file") == [TEXT]
    assert docs("line") == [l + "\n" for l in TEXT.split("\n") if l.strip()]
    w = tmp_path / "w.tokens"
    w.write_text(" \n = Alpha = \n \n text a \n = = Sub = = \n more \n = Beta = \n text b \n")
    got = list(iter_documents(InputSpec(inputs=[str(w)], doc_split="wikitext")))
    # The blank line before the first title is a whitespace-only "document" of its own, hence skipped.
    assert got == [" = Alpha = \n \n text a \n = = Sub = = \n more \n", " = Beta = \n text b \n"]


def test_all_formats_roundtrip(tmp_path):
    """txt, jsonl, json, parquet and gzipped variants -> shards -> decode gives back every document."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    recs = ["record one 🙂", "record two\nwith a newline", "record three"]
    (tmp_path / "a.txt").write_text(TEXT)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write(TEXT)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(recs)))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": r}) + "\n" for r in recs))
    (tmp_path / "e.json").write_text(json.dumps([{"text": r} for r in recs]))
    pq.write_table(pa.table({"text": recs, "n": [1, 2, 3]}), tmp_path / "f.parquet")
    inputs = [tmp_path / n for n in ("a.txt", "b.txt.gz", "c.jsonl", "d.jsonl.gz", "e.json", "f.parquet")]
    out = tmp_path / "out"
    meta = prepare(_bpe_job(inputs), out, **QUIET)
    expected = PARAGRAPHS * 2 + recs * 4
    assert _decoded_docs(out) == expected
    assert meta["docs"] == len(expected)
    assert meta["tokens"] == sum(s["tokens"] for s in meta["shards"])
    # A glob picks the same files in sorted order.
    out2 = tmp_path / "out2"
    prepare(_bpe_job([tmp_path / "[a-f].*"]), out2, **QUIET)
    assert _decoded_docs(out2) == expected


def test_trained_bpe_specials_and_metadata(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 3 + "a literal <|mask|> and <|endoftext|> in the text\n")
    out = tmp_path / "out"
    meta = prepare(_bpe_job([tmp_path / "a.txt"], vocab_size=320), out, **QUIET)
    tok = TextTokenizer.load(out)
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    t = meta["tokenizer"]
    assert (t["mask_id"], t["eos_id"], t["pad_id"]) == (vocab["<|mask|>"], vocab["<|endoftext|>"], vocab["<|pad|>"])
    assert t["vocab_size"] == tok.vocab_size <= 320 and t["fingerprint"] == tok.fingerprint
    assert meta["dtype"] == "uint16" and meta["eos_appended"]
    ds = PreparedDataset(out)
    ids = np.concatenate([ds.document(d) for d in range(ds.num_docs)])
    # Text that spells a special token stays text: the corpus can never inject mask ids (or extra EOS).
    assert tok.mask_id not in ids and (ids == tok.eos_id).sum() == ds.num_docs
    assert "<|mask|>" in _decoded_docs(out)[-1]
    # The shards are Megatron files: uint16 dtype code 8, one sequence per document.
    head = (out / "shard_00000.idx").read_bytes()[:18]
    assert head[:9] == b"MMIDIDX\x00\x00" and head[17] == 8
    assert IndexedShard(out / "shard_00000").num_docs == ds.num_docs


def test_large_vocab_uses_4_byte_ids(tmp_path):
    docs = [[70_000, 5, 69_999]]
    out = prepare_words(tmp_path, docs, n_words=70_001)
    ds = PreparedDataset(out)
    assert ds.meta["dtype"] == "int32" and ds.shards[0].dtype == np.int32
    assert ds.document(0).tolist() == [70_000, 5, 69_999, ds.tokenizer.eos_id]


def test_fast_encoder_matches_tokenizers(tmp_path):
    """The word-cache encoder must give exactly `tokenizers`' ids."""
    texts = [TEXT, "  leading spaces\n\n\n trailing   \n", "'s 've 'LL 'd don't", "a<|mask|>b", "x" * 500, "",
             # ASCII text takes a faster split than the rest: control characters that are not white space,
             # vertical tab / form feed, and non-ASCII letters, digits and spaces on the other path
             "a\x1cb \x1f c\x0bd\x0c  e\t\tf 12ab3 ;;x !", "café naïve ½ ٣ x\u00a0y\u2003z Ünïcödé's"]
    if SHARED.is_dir():
        for rel in ("wikitext-2/wiki.valid.tokens", "wikitext-2-raw/wiki.test.raw", "lambada/lambada_test.jsonl"):
            if (SHARED / rel).is_file():
                texts += (SHARED / rel).read_text(encoding="utf-8")[:300_000].split("\n\n")
    tok = build_tokenizer("bpe", 1000, texts=[texts])
    fast = DocumentEncoder(tok.tok.to_str(), tok.eos_id)
    slow = DocumentEncoder(tok.tok.to_str(), tok.eos_id, fast=False)
    assert fast.fast and not slow.fast
    a, b = fast.encode_docs(texts), slow.encode_docs(texts)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert fast.encode(TEXT) == tok.tok.encode(TEXT).ids
    assert tok.decode(fast.encode(TEXT)) == TEXT


def test_workers_give_identical_output(tmp_path):
    docs = distinct_docs(400, np.random.default_rng(1))
    one = prepare_words(tmp_path, docs, name="one", shard_tokens=2000, workers=1)
    two = prepare_words(tmp_path, docs, name="two", shard_tokens=2000, workers=2)
    a, b = json.loads((one / "meta.json").read_text()), json.loads((two / "meta.json").read_text())
    assert a["shards"] == b["shards"] and len(a["shards"]) > 2
    for s in a["shards"]:
        for ext in (".bin", ".idx"):
            assert (one / (s["prefix"] + ext)).read_bytes() == (two / (s["prefix"] + ext)).read_bytes()


def test_resume_keeps_finished_shards(tmp_path):
    docs = distinct_docs(600, np.random.default_rng(2))
    reference = prepare_words(tmp_path, docs, name="ref", shard_tokens=1500)
    tok = tmp_path / "ref_tokenizer.json"
    src = tmp_path / "ref.jsonl"
    job = PrepareJob(inputs=[str(src)], tokenizer=str(tok), shard_tokens=1500)
    out = tmp_path / "resumed"
    stage = tmp_path / "resumed.partial"

    def stop_after_two(entry):
        if entry["prefix"] == "shard_00001":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        prepare(job, out, chunk_bytes=2000, on_shard=stop_after_two, **QUIET)
    assert not out.exists() and (stage / "shard_00001.idx").is_file()
    # What a kill in the middle of the next shard leaves behind.
    (stage / "shard_00002.bin.tmp").write_bytes(b"\x00" * 100)
    stats = {n: os.stat(stage / n) for n in ("shard_00000.bin", "shard_00001.bin")}
    time.sleep(0.01)
    meta = prepare(job, out, chunk_bytes=3000, **QUIET)  # another chunk size: same shards anyway
    assert not stage.exists() and not list(out.glob("*.tmp"))
    for n, st in stats.items():  # finished shards were kept, not rewritten
        now = os.stat(out / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    ref = json.loads((reference / "meta.json").read_text())
    assert meta["shards"] == ref["shards"]
    for s in ref["shards"]:
        for ext in (".bin", ".idx"):
            assert (out / (s["prefix"] + ext)).read_bytes() == (reference / (s["prefix"] + ext)).read_bytes()
    # A finished folder is reused as is; other settings are refused.
    assert prepare(job, out, **QUIET)["created"] == meta["created"]
    with pytest.raises(DataError, match="other settings"):
        prepare(PrepareJob(inputs=[str(src)], tokenizer=str(tok), shard_tokens=999), out, **QUIET)


def test_stage_from_other_inputs_is_discarded(tmp_path):
    docs = distinct_docs(200, np.random.default_rng(3))
    prepare_words(tmp_path, docs, name="x", shard_tokens=800)
    src, tok = tmp_path / "x.jsonl", tmp_path / "x_tokenizer.json"
    job = PrepareJob(inputs=[str(src)], tokenizer=str(tok), shard_tokens=800)
    out = tmp_path / "y"

    def stop(entry):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        prepare(job, out, on_shard=stop, **QUIET)
    with open(src, "a") as f:  # the input changes: the staged shard no longer describes it
        f.write(json.dumps({"text": "w1 w2"}) + "\n")
    meta = prepare(job, out, **QUIET)
    assert meta["docs"] == len(docs) + 1


# ----------------------------------------------------------------------------- clear errors, nothing written

def _nothing_written(out):
    assert not out.exists(), f"{out} was created"
    assert not out.with_name(out.name + ".partial").exists(), "staging folder left behind"


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "ok.txt").write_text("text\n")
    with pytest.raises(DataError, match="nope.txt does not exist"):
        prepare(_bpe_job([tmp_path / "ok.txt", tmp_path / "nope.txt"]), out, **QUIET)
    _nothing_written(out)
    with pytest.raises(DataError, match="matches no file"):
        prepare(_bpe_job([tmp_path / "*.parquet"]), out, **QUIET)
    _nothing_written(out)


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    out = tmp_path / "out"
    for f in ("blank.txt", "empty.jsonl"):
        with pytest.raises(DataError, match="corpus is empty"):
            prepare(_bpe_job([tmp_path / f]), out, **QUIET)
        _nothing_written(out)


def test_missing_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: no field 'text' \(fields: body\)"):
        prepare(_bpe_job([tmp_path / "a.jsonl"]), tmp_path / "out", **QUIET)
    _nothing_written(tmp_path / "out")


def test_invalid_utf8_reported_with_file_and_offset(tmp_path):
    good = "good line\n" * 50
    bad = tmp_path / "bad.txt"
    bad.write_bytes(good.encode() + b"caf\xe9 au lait\n" + b"more\n")
    out = tmp_path / "out"
    offset = len(good.encode()) + 3
    with pytest.raises(DataError, match=rf"bad.txt: invalid UTF-8 at byte offset {offset} \(line 51\)"):
        prepare(_bpe_job([bad]), out, **QUIET)
    _nothing_written(out)
    gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"invalid UTF-8 at byte offset 25 \(line 2\)"):
        prepare(_bpe_job([gz]), out, **QUIET)
    _nothing_written(out)
    # Asked for, invalid bytes become U+FFFD.
    prepare(_bpe_job([bad], on_decode_error="replace"), out, **QUIET)
    assert "caf\ufffd au lait" in "".join(_decoded_docs(out))


def test_cli_reports_errors_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "missing.txt"), "--out", str(out), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    _nothing_written(out)
    (tmp_path / "a.txt").write_text(TEXT)
    assert main(["--input", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(out), "--no-progress",
                 "--workers", "1"]) == 0
    assert (out / "meta.json").is_file()


def test_offline_hub_fails_fast(tmp_path, monkeypatch):
    """No network in tests: with HF_HUB_OFFLINE set the hub clients only look at the (empty) cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t = time.time()
    with pytest.raises(DataError, match="cannot load hub dataset 'wikitext'.*HF_HUB_OFFLINE"):
        prepare(PrepareJob(hf_dataset="wikitext", hf_config="wikitext-103-raw-v1", tokenizer="bpe"),
                tmp_path / "w", **QUIET)
    with pytest.raises(DataError, match="cannot load tokenizer 'gpt2'.*HF_HUB_OFFLINE"):
        build_tokenizer("gpt2", 0)
    assert time.time() - t < 15
    _nothing_written(tmp_path / "w")


def test_tokenizer_fingerprint_mismatches(tmp_path):
    from data import build_data
    from datakit import data_config
    rng = np.random.default_rng(4)
    a = prepare_words(tmp_path, distinct_docs(50, rng), name="a", n_words=3000)
    b = prepare_words(tmp_path, distinct_docs(50, rng), name="b", n_words=3001)  # another vocabulary
    with pytest.raises(DataError, match=r"data.sources\[1\].*tokenizer.*must share one tokenizer"):
        build_data(data_config([a, b], 8, valid_fraction=0.1), seed=0)
    # A run directory keeps its tokenizer: resuming it on data with another one is refused.
    run = tmp_path / "run"
    save_run_tokenizer(PreparedDataset(a).tokenizer, run)
    save_run_tokenizer(PreparedDataset(a).tokenizer, run)  # same one: fine
    with pytest.raises(DataError, match="was trained with tokenizer"):
        save_run_tokenizer(PreparedDataset(b).tokenizer, run)
    # A prepared folder whose tokenizer file was swapped no longer matches its shards.
    (a / "tokenizer.json").write_text((b / "tokenizer.json").read_text())
    with pytest.raises(DataError, match="tokenizer.json has fingerprint .* but the shards were tokenized with"):
        PreparedDataset(a)


def test_vocab_too_large_for_model(tmp_path):
    from data import build_data
    from datakit import data_config
    from pretrain.config import ConfigError, load_config
    from pretrain.loop.train import resolve_model
    out = prepare_words(tmp_path, distinct_docs(50, np.random.default_rng(5)), n_words=9000)
    bundle = build_data(data_config(out, 8, valid_fraction=0.1), seed=0)
    cfg = load_config(None, ["model.preset=bench-25m"])  # a fixed 8192-id vocabulary
    with pytest.raises(ConfigError, match=r"tokenizer has 9002 ids but model.vocab_size=8192"):
        resolve_model(cfg, bundle)


def test_recipe_config_errors():
    from pretrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="exactly one entry in data.sources"):
        load_config(None, ["data.kind=prepared", "data.sources=[{path: a}, {path: b}]",
                           "data.prepare={inputs: [x.txt]}"])
    with pytest.raises(ConfigError, match="either inputs .* or hf_dataset"):
        load_config(None, ["data.kind=prepared", "data.sources=[{path: a}]", "data.prepare={tokenizer: bpe}"])
    with pytest.raises(ConfigError, match="weights must be positive"):
        load_config(None, ["data.kind=prepared", "data.sources=[{path: a, weight: 0}]"])
    with pytest.raises(ConfigError, match="data.prepare.doc_split"):
        load_config(None, ["data.kind=prepared", "data.sources=[{path: a}]",
                           "data.prepare={inputs: [x], doc_split: words}"])
