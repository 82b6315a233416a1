"""Bad input (issue 12): each case stops with a message that says what is wrong and what to do, and leaves
nothing half-written. (Checkpoints with a missing or corrupt file, a vocabulary or tokenizer that differs
from the checkpoint's, a disk that fills during a save and a config that is not YAML are covered in
tests/test_fault_tolerance.py.)"""
import shutil

import numpy as np
import pytest
import torch

from data import build_data
from data.shards import DataError
from datakit import data_config, distinct_docs, prepare_words, word_tokenizer
from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    return prepare_words(tmp, distinct_docs(60, np.random.default_rng(0), max_len=20), n_words=2000)


def copy_of(dataset, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    return out


def test_truncated_shard_is_named(dataset, tmp_path):
    ds = copy_of(dataset, tmp_path)
    shard = next(ds.glob("*.bin"))
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2 | 1])  # an odd byte count: cut mid-token
    with pytest.raises(DataError, match=r"shard_00000\.bin holds \d+ bytes, not a whole number of uint16 tokens: "
                                        r"the pair is truncated or mismatched"):
        build_data(data_config(ds, 16, valid_fraction=0.1), 0)
    shard.write_bytes(data[:len(data) // 2 & ~1])  # cut between tokens
    with pytest.raises(DataError, match=r"shard_00000\.bin holds \d+ bytes but its index describes \d+: the pair "
                                        r"is truncated or mismatched"):
        build_data(data_config(ds, 16, valid_fraction=0.1), 0)


def test_corrupt_index_is_named(dataset, tmp_path):
    ds = copy_of(dataset, tmp_path)
    idx = next(ds.glob("*.idx"))
    idx.write_bytes(b"garbage!!" + idx.read_bytes()[9:])
    with pytest.raises(DataError, match=r"shard_00000\.idx is not a Megatron index"):
        build_data(data_config(ds, 16, valid_fraction=0.1), 0)


def test_corrupt_shard_bytes_stop_training_before_the_model_sees_them(dataset, tmp_path):
    """Same size, altered bytes: every format check passes; the ids fall outside the vocabulary."""
    from pretrain.loop.train import train
    ds = copy_of(dataset, tmp_path)
    shard = next(ds.glob("*.bin"))
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        f"train.out_dir={tmp_path / 'runs'}", "data.kind=prepared", f"data.sources=[{{path: {ds}}}]",
        "data.seq_len=16", "data.valid_fraction=0.1", "train.steps=2", "train.samples=0", "train.peak_flops=1e11",
        "logging.progress_bar=false", "logging.plot=false"])
    with pytest.raises(DataError, match=r"holds token id 65535, outside the vocabulary of 2002: the prepared "
                                        r"data is corrupt"):
        train(cfg)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def _prepare(tmp_path, path, **kw):
    from data.prepare import PrepareJob, prepare
    tok = word_tokenizer(tmp_path / "tok.json", 50)
    out = tmp_path / "out"
    prepare(PrepareJob(inputs=[str(path)], tokenizer=str(tok), **kw), out, workers=1, progress=False,
            log=lambda *_: None)
    return out


def test_non_utf8_text_is_an_error_by_default_and_replaced_and_counted_on_request(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"w1 w2 w3\n\nw4 \xff\xfe w5\n")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 13 .*on_decode_error=replace"):
        _prepare(tmp_path, bad)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))
    out = _prepare(tmp_path, bad, on_decode_error="replace")
    assert "bad.txt: 2 invalid UTF-8 sequence(s) replaced with U+FFFD" in capsys.readouterr().err
    assert (out / "meta.json").is_file()


@pytest.mark.parametrize("content", ["\n\n   \n", ""], ids=["blank-documents", "no-documents"])
def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path, content):
    src = tmp_path / ("empty.txt" if content else "empty.jsonl")
    src.write_text(content)
    with pytest.raises(DataError, match="the corpus is empty: no non-blank document in"):
        _prepare(tmp_path, src)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3"], "world size 1 is not divisible by parallel.dp_replicate=1 x parallel.tp=3"),
    (["parallel.dp_shard=2"], "= 2 does not match the world size 1"),
    (["parallel.tp=0"], "parallel.tp=0 must be >= 1"),
])
def test_impossible_parallel_degrees_stop_before_any_work(tmp_path, overrides, message):
    from pretrain.loop.train import train
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"train.out_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("=", "=")):
        train(cfg)
    assert not (tmp_path / "tiny").exists()


def test_token_id_check_is_a_cheap_host_side_max():
    from pretrain.loop.step import check_token_ids
    check_token_ids(torch.tensor([[0, 5, 9]]), 10, 0)
    with pytest.raises(DataError, match="position 64 holds token id 10"):
        check_token_ids(torch.tensor([[0, 10]]), 10, 64)
