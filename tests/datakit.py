"""Small corpora with known token ids for the data tests.

A word-level tokenizer maps word "w{i}" to id i, so a document written as "w5 w9 w2" has exactly the ids
[5, 9, 2] (then EOS): tests can predict every id of a prepared dataset, and documents made of distinct words
make each token identifiable (to check that an epoch delivers each one exactly once)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def word_tokenizer(path: Path, n_words: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def distinct_docs(n_docs: int, rng: np.random.Generator, max_len: int = 40, first_id: int = 1) -> list[list[int]]:
    """Documents of 1..max_len ids, every id used once overall."""
    lengths = rng.integers(1, max_len + 1, size=n_docs)
    ids = np.arange(first_id, first_id + int(lengths.sum()))
    out, pos = [], 0
    for n in lengths:
        out.append(ids[pos:pos + n].tolist())
        pos += n
    return out


def write_jsonl(path: Path, docs: list[list[int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in d)}) + "\n")
    return path


def prepare_words(tmp: Path, docs: list[list[int]], name: str = "ds", n_words: int = 0, shard_tokens: int = 10**9,
                  workers: int = 1, tokenizer: Path | None = None, **job_kw) -> Path:
    """Prepare `docs` (lists of word ids) through the real pipeline; returns the dataset folder."""
    from data.prepare import PrepareJob, prepare
    n_words = n_words or max(max(d) for d in docs) + 1
    tok_path = tokenizer or word_tokenizer(tmp / f"{name}_tokenizer.json", n_words)
    src = write_jsonl(tmp / f"{name}.jsonl", docs)
    job = PrepareJob(inputs=[str(src)], tokenizer=str(tok_path), shard_tokens=shard_tokens, **job_kw)
    out = tmp / name
    prepare(job, out, workers=workers, progress=False, log=lambda *_: None)
    return out


def data_config(paths, seq_len: int, valid_fraction: float = 0.0, weights=None, extra_valid=(), **kw):
    from pretrain.config import DataConfig, SourceConfig
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    weights = weights or [1.0] * len(paths)
    return DataConfig(kind="prepared", seq_len=seq_len, valid_fraction=valid_fraction,
                      sources=[SourceConfig(path=str(p), weight=w) for p, w in zip(paths, weights)],
                      extra_valid=list(map(str, extra_valid)), **kw)
