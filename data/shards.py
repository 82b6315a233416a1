"""Prepared datasets on disk, token streams over them, and packing into fixed-length samples.

A prepared dataset is a folder written by `python -m data.prepare`:
    meta.json                      counts, dtype, special ids, tokenizer fingerprint, source description
    tokenizer.json, tokenizer_meta.json
    shard_00000.bin / .idx, ...    Megatron indexed files, one sequence per document, EOS at each document's end
Packing treats the (training part of the) dataset as one stream of tokens, documents back to back each ending
in EOS, and cuts it into seq_len pieces: sample i is stream[i*L, (i+1)*L). Nothing is padded and no token is
dropped except the final < L tokens. The document ids returned with each sample let attention stay inside a
document (`model(tokens, doc_ids=...)`), so packing costs no cross-document leakage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import REPO_ROOT, DataError, resolve_path  # noqa: F401  (re-exported: data.shards.DataError)
from .megatron import FormatError, IndexedShard

META_FILE = "meta.json"
FORMAT_NAME = "unmask-prepared"
FORMAT_VERSION = 1


def read_meta(folder: Path) -> dict:
    folder = Path(folder)
    f = folder / META_FILE
    if not f.is_file():
        partial = folder.with_name(folder.name + ".partial")
        hint = (f" An interrupted preparation is staged in {partial}: rerun the same prepare command to finish it."
                if partial.exists() else "")
        raise DataError(f"{folder} is not a prepared dataset (no {META_FILE}). Prepare it with "
                        f"`python -m data.prepare --input FILES --out {folder}` or give the recipe a data.prepare "
                        f"section.{hint}")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise DataError(f"{f} is not an unmask prepared-dataset file (format {meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise DataError(f"{f} has format version {meta['version']}; this unmask reads up to {FORMAT_VERSION}")
    return meta


class ArrayShard:
    """An in-memory shard (tokenized validation text) with the IndexedShard read interface."""

    def __init__(self, flat: np.ndarray, lengths: np.ndarray):
        self._tokens = np.asarray(flat)
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_tokens, self.num_docs = int(self.starts[-1]), len(lengths)

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self._tokens[start:end]

    def doc_start(self, doc: int) -> int:
        return int(self.starts[min(doc, self.num_docs)])

    def boundaries(self, start: int, end: int) -> np.ndarray:
        s = self.starts[:-1]
        return s[np.searchsorted(s, start, side="right"):np.searchsorted(s, end, side="left")]

    def document(self, doc: int) -> np.ndarray:
        return self._tokens[self.starts[doc]:self.starts[doc + 1]]


class TokenStream:
    """Token ranges ("runs", each inside one shard and starting on a document boundary) read as one stream."""

    def __init__(self, shards: Sequence, runs: list[tuple[int, int, int]]):
        self.shards = shards
        runs = [r for r in runs if r[2] > r[1]]
        self.run_shard = np.array([r[0] for r in runs], dtype=np.int64)
        self.run_start = np.array([r[1] for r in runs], dtype=np.int64)
        lengths = np.array([r[2] - r[1] for r in runs], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_tokens = int(self.cum[-1])

    def read(self, a: int, b: int, tokens_out: np.ndarray, docs_out: np.ndarray) -> None:
        """Fill tokens_out / docs_out (length b - a) with stream[a:b] and per-row document ids (0, 1, ...)."""
        docs_out[:] = 0
        r = int(np.searchsorted(self.cum, a, side="right")) - 1
        pos = a
        while pos < b:
            run_lo = int(self.cum[r])
            take_end = min(b, int(self.cum[r + 1]))
            shard = self.shards[self.run_shard[r]]
            s = int(self.run_start[r]) + pos - run_lo
            e = s + take_end - pos
            off = pos - a
            tokens_out[off:off + e - s] = shard.tokens(s, e)
            if off:  # a new run always starts a new document (runs begin on document boundaries)
                docs_out[off] = 1
            docs_out[shard.boundaries(s, e) - s + off] = 1
            pos = take_end
            r += 1
        np.cumsum(docs_out, out=docs_out)


class PackedSource:
    """SampleSource over a TokenStream: sample i = stream[i*L, (i+1)*L) with its document ids."""

    def __init__(self, stream: TokenStream, seq_len: int, name: str = ""):
        self.stream, self.seq_len, self.name = stream, seq_len, name
        self.num_samples = stream.num_tokens // seq_len
        self.dropped_tokens = stream.num_tokens - self.num_samples * seq_len

    def get(self, indices: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        L = self.seq_len
        tokens = np.empty((len(indices), L), dtype=np.int64)
        docs = np.empty((len(indices), L), dtype=np.int64)
        for row, i in enumerate(indices):
            if not 0 <= i < self.num_samples:
                raise IndexError(f"sample {i} outside [0, {self.num_samples}) of {self.name or 'source'}")
            self.stream.read(i * L, (i + 1) * L, tokens[row], docs[row])
        return torch.from_numpy(tokens), torch.from_numpy(docs)


class WrappedSource:
    """MDLM's training blocks over a TokenStream (data.framing=wrapped): sample i = [BOS] + stream[i*C, (i+1)*C)
    + [EOS] with C = seq_len - 2. The stream already holds an EOS after every document, so a block reads
    [BOS] doc_a [EOS] doc_b... [EOS], the framing eval.ppl's mdlm protocol scores. BOS and EOS take the document
    id of their neighbour."""

    def __init__(self, stream: TokenStream, seq_len: int, bos_id: int, eos_id: int, name: str = ""):
        if seq_len < 3:
            raise DataError(f"wrapped blocks need seq_len >= 3 ([BOS] + text + [EOS]), got {seq_len}")
        self.stream, self.seq_len, self.name = stream, seq_len, name
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.content = seq_len - 2
        self.num_samples = stream.num_tokens // self.content
        self.dropped_tokens = stream.num_tokens - self.num_samples * self.content

    def get(self, indices: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        L, C = self.seq_len, self.content
        tokens = np.empty((len(indices), L), dtype=np.int64)
        docs = np.empty((len(indices), L), dtype=np.int64)
        for row, i in enumerate(indices):
            if not 0 <= i < self.num_samples:
                raise IndexError(f"sample {i} outside [0, {self.num_samples}) of {self.name or 'source'}")
            self.stream.read(i * C, (i + 1) * C, tokens[row, 1:L - 1], docs[row, 1:L - 1])
        tokens[:, 0], tokens[:, -1] = self.bos_id, self.eos_id
        docs[:, 0], docs[:, -1] = docs[:, 1], docs[:, -2]
        return torch.from_numpy(tokens), torch.from_numpy(docs)


def framed_source(stream: TokenStream, seq_len: int, framing: str, tokenizer, name: str = ""):
    """The training/validation source for data.framing: packed windows, or MDLM's wrapped blocks (BOS falls back
    to the EOS id, as for GPT-2)."""
    if framing == "packed":
        return PackedSource(stream, seq_len, name=name)
    if framing != "wrapped":
        raise DataError(f"unknown data.framing {framing!r}; choices: packed, wrapped")
    eos = getattr(tokenizer, "eos_id", None)
    bos = getattr(tokenizer, "bos_id", None)
    bos = eos if bos is None else bos
    if eos is None:
        raise DataError("data.framing=wrapped needs a tokenizer with an EOS token (blocks end in [EOS])")
    return WrappedSource(stream, seq_len, bos, eos, name=name)


def holdout_ranges(num_docs: int, fraction: float, stripes: int = 1000) -> list[tuple[int, int]]:
    """Document ranges [a, b) held out for validation: about `fraction` of the documents, taken as evenly
    spaced stripes over the whole corpus (representative of every part of it, yet only a few contiguous
    ranges, so the training stream stays a handful of runs). A pure function of the corpus size: the same
    documents are held out whatever the seed, the data-parallel degree or the run."""
    if fraction <= 0 or num_docs == 0:
        return []
    S = min(num_docs, stripes)
    k = max(1, round(fraction * S))
    if k >= S:
        raise DataError(f"data.valid_fraction={fraction} would hold out every document (the corpus has "
                        f"{num_docs}); lower it")
    chosen = sorted({(2 * j + 1) * S // (2 * k) for j in range(k)})
    return [(s * num_docs // S, (s + 1) * num_docs // S) for s in chosen]


class PreparedDataset:
    """A prepared folder opened for reading (shards memory-mapped; nothing loaded)."""

    def __init__(self, folder, reader: str = "native"):
        from .tokenizer import TextTokenizer
        self.folder = Path(folder)
        self.meta = meta = read_meta(self.folder)
        try:
            self.tokenizer = TextTokenizer.load(self.folder)
        except FileNotFoundError as e:
            raise DataError(f"{self.folder} lacks its tokenizer ({e.filename}); re-run data.prepare") from None
        fp = meta["tokenizer"]["fingerprint"]
        if self.tokenizer.fingerprint != fp:
            raise DataError(f"{self.folder}/tokenizer.json has fingerprint {self.tokenizer.fingerprint} but the "
                            f"shards were tokenized with {fp} (meta.json): the tokenizer file was replaced; "
                            f"restore it or prepare the data again")
        self.shards = []
        for entry in meta["shards"]:
            prefix = Path(entry["prefix"])
            prefix = prefix if prefix.is_absolute() else self.folder / prefix
            try:
                shard = IndexedShard(prefix, reader=reader)
            except (FileNotFoundError, FormatError) as e:
                raise DataError(f"{self.folder}: {e}") from None
            if shard.num_tokens != entry["tokens"] or shard.num_docs != entry["docs"]:
                raise DataError(f"{prefix}: holds {shard.num_tokens} tokens in {shard.num_docs} documents but "
                                f"meta.json records {entry['tokens']} in {entry['docs']}: the folder is corrupt")
            self.shards.append(shard)
        self.doc_offsets = np.concatenate([[0], np.cumsum([s.num_docs for s in self.shards])]).astype(np.int64)
        self.num_docs = int(self.doc_offsets[-1])
        self.num_tokens = sum(s.num_tokens for s in self.shards)

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def doc_runs(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """Global documents [a, b) as per-shard token runs."""
        runs = []
        for k, shard in enumerate(self.shards):
            lo, hi = max(a, int(self.doc_offsets[k])), min(b, int(self.doc_offsets[k + 1]))
            if lo < hi:
                base = int(self.doc_offsets[k])
                runs.append((k, shard.doc_start(lo - base), shard.doc_start(hi - base)))
        return runs

    def split(self, valid_fraction: float) -> tuple[TokenStream, TokenStream]:
        """(training stream, validation stream), disjoint by document."""
        held = holdout_ranges(self.num_docs, valid_fraction)
        train, valid, prev = [], [], 0
        for a, b in held:
            train += self.doc_runs(prev, a)
            valid += self.doc_runs(a, b)
            prev = b
        train += self.doc_runs(prev, self.num_docs)
        return TokenStream(self.shards, train), TokenStream(self.shards, valid)

    def document(self, doc: int) -> np.ndarray:
        k = int(np.searchsorted(self.doc_offsets, doc, side="right")) - 1
        return self.shards[k].document(doc - int(self.doc_offsets[k]))
