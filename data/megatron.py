"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`, the "MMIDIDX" format): our own reader and writer,
plus adapters to megatron-core's `IndexedDataset` / `IndexedDatasetBuilder` when that package is installed.

unmask stores its own prepared shards in this format (one Megatron "sequence" per document), so every shard is
also a valid Megatron-LM data prefix, and corpora tokenized for Megatron-LM train here unchanged.

The .idx layout (all little-endian):
    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    u64       S, number of sequences
    u64       D, number of document indices (documents + 1)
    i32[S]    sequence lengths, in tokens
    i64[S]    sequence pointers, in bytes from the start of the .bin
    i64[D]    document indices: document j is sequences [idx[j], idx[j+1]); idx[0] = 0, idx[-1] = S
    (i8[S]    sequence modes, multimodal datasets only; not used here)
The .bin is the token ids of all sequences back to back. The format has no uint32 code: vocabularies beyond
65,536 ids are stored as int32 (the same 4 bytes, and every real vocabulary is below 2**31).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count
_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in _CODES.items()}


class FormatError(ValueError):
    """A .bin/.idx pair that is not a readable Megatron indexed dataset."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else the 4-byte int32 (the Megatron format has no uint32)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def paths(prefix) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def exists(prefix) -> bool:
    b, i = paths(prefix)
    return b.is_file() and i.is_file()


def _fsync_write(path: Path, chunks) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def write_index(idx_path: Path, dtype, seq_lengths: np.ndarray, doc_indices: Optional[np.ndarray] = None) -> None:
    """Write a .idx for sequences of `seq_lengths` tokens; one document per sequence unless doc_indices given."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        raise FormatError(f"the Megatron format cannot store {dtype}; use one of "
                          f"{', '.join(str(np.dtype(d)) for d in _CODES.values())}")
    lengths = np.ascontiguousarray(seq_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    docs = (np.arange(len(lengths) + 1, dtype=np.int64) if doc_indices is None
            else np.ascontiguousarray(doc_indices, dtype=np.int64))
    header = _HEADER.pack(MAGIC, VERSION, _CODE_OF[dtype], len(lengths), len(docs))
    _fsync_write(idx_path, [header, lengths.tobytes(), pointers.tobytes(), docs.tobytes()])


class ShardWriter:
    """Appends documents to PREFIX.bin.tmp and, on `commit`, writes the index and renames both files into place
    (.bin first, then .idx: a prefix whose .idx exists is complete). Nothing under the final names is ever
    half-written; an abandoned writer leaves only *.tmp files, which `abort` (or a resumed prepare) removes."""

    def __init__(self, prefix, dtype, backend: str = "native"):
        self.prefix, self.dtype, self.backend = str(prefix), np.dtype(dtype), backend
        self.bin, self.idx = paths(prefix)
        self.bin_tmp, self.idx_tmp = Path(str(self.bin) + ".tmp"), Path(str(self.idx) + ".tmp")
        self.lengths: list[np.ndarray] = []
        self.tokens = 0
        self.docs = 0
        if backend == "native":
            self._f = open(self.bin_tmp, "wb")
        elif backend == "megatron-core":
            IndexedDatasetBuilder = _megatron_core().IndexedDatasetBuilder
            self._builder = IndexedDatasetBuilder(str(self.bin_tmp), dtype=self.dtype.type)
        else:
            raise ValueError(f"unknown shard writer {backend!r}; choices: native, megatron-core")

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenated ids `flat` and their `lengths` (sum(lengths) == len(flat))."""
        if len(lengths) == 0:
            return
        flat = np.asarray(flat)
        if self.backend == "native":
            self._f.write(flat.astype(self.dtype, copy=False).tobytes())
        else:
            ends = np.cumsum(lengths)
            for end, n in zip(ends.tolist(), lengths.tolist()):
                self._builder.add_document(flat[end - n:end].astype(self.dtype.type), [n])
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.tokens += int(flat.size)
        self.docs += len(lengths)

    def commit(self) -> None:
        if self.backend == "native":
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
            if lengths.size and lengths.max() >= 1 << 31:
                raise FormatError(f"a document of {int(lengths.max())} tokens exceeds the format's int32 length")
            write_index(self.idx_tmp, self.dtype, lengths)
        else:
            self._builder.finalize(str(self.idx_tmp))
        os.replace(self.bin_tmp, self.bin)
        os.replace(self.idx_tmp, self.idx)

    def abort(self) -> None:
        if self.backend == "native" and not self._f.closed:
            self._f.close()
        for p in (self.bin_tmp, self.idx_tmp):
            p.unlink(missing_ok=True)


def _megatron_core():
    """megatron.core.datasets.indexed_dataset, or a clear ImportError."""
    try:
        import warnings
        with warnings.catch_warnings():  # its package __init__ warns about missing GPU kernels (Apex, TE)
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
        return indexed_dataset
    except ImportError as e:
        raise ImportError(f"reader/writer 'megatron-core' needs the megatron-core package "
                          f"(pip install 'unmask[megatron]'): {e}") from None


def have_megatron_core() -> bool:
    try:
        _megatron_core()
        return True
    except ImportError:
        return False


class IndexedShard:
    """Read access to one Megatron prefix: token slices by position and document boundaries.

    Positions are token offsets into the shard's .bin. `doc_ptr` (bytes) holds the start of every document,
    kept as a memory map when each document is one sequence (the usual case), so opening a shard costs
    O(1) memory whatever its size."""

    def __init__(self, prefix, reader: str = "native"):
        self.prefix = str(prefix)
        bin_path, idx_path = paths(prefix)
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"Megatron dataset file {p} is missing (a prefix needs both .bin and .idx)")
        if reader == "native":
            self._open_native(bin_path, idx_path)
        elif reader == "megatron-core":
            self._open_megatron_core()
        else:
            raise ValueError(f"unknown shard reader {reader!r}; choices: native, megatron-core")
        self.reader = reader
        self.itemsize = self.dtype.itemsize
        n_seq = len(self.seq_lengths)
        self.num_tokens = (int(self.seq_pointers[-1]) // self.itemsize + int(self.seq_lengths[-1])) if n_seq else 0
        expected = self.num_tokens * self.itemsize
        if bin_path.stat().st_size != expected:
            raise FormatError(f"{bin_path} holds {bin_path.stat().st_size} bytes but its index describes {expected}: "
                              f"the pair is truncated or mismatched")
        d = self.doc_indices
        if len(d) < 1 or int(d[0]) != 0 or int(d[-1]) != n_seq:
            raise FormatError(f"{idx_path}: document indices must run from 0 to the sequence count {n_seq}")
        self.num_docs = len(d) - 1
        if self.num_docs == n_seq and np.array_equal(d, np.arange(n_seq + 1)):
            # one sequence per document (the usual case): starts are the sequence pointers themselves
            self.doc_ptr = self.seq_pointers
        else:  # several sequences (e.g. sentences) per document; empty documents start where the next one does
            ptr_end = np.append(np.asarray(self.seq_pointers, dtype=np.int64), np.int64(expected))
            self.doc_ptr = ptr_end[np.asarray(d[:-1], dtype=np.int64)]

    def _open_native(self, bin_path: Path, idx_path: Path) -> None:
        size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise FormatError(f"{idx_path} is too short to be a Megatron index ({size} bytes)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
        if magic != MAGIC:
            raise FormatError(f"{idx_path} is not a Megatron index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise FormatError(f"{idx_path}: unsupported index version {version} (only {VERSION})")
        if code not in _CODES:
            raise FormatError(f"{idx_path}: unknown dtype code {code}")
        need = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if size < need:
            raise FormatError(f"{idx_path} is truncated: {size} bytes, its header needs {need}")
        self.dtype = np.dtype(_CODES[code])
        off = _HEADER.size
        mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.seq_lengths = mm[off:off + 4 * n_seq].view(np.int32)
        off += 4 * n_seq
        self.seq_pointers = mm[off:off + 8 * n_seq].view(np.int64)
        off += 8 * n_seq
        self.doc_indices = mm[off:off + 8 * n_doc].view(np.int64)
        bin_size = bin_path.stat().st_size
        if bin_size % self.dtype.itemsize:  # cut mid-token: numpy would refuse the map with a bare ValueError
            raise FormatError(f"{bin_path} holds {bin_size} bytes, not a whole number of {self.dtype} tokens: "
                              f"the pair is truncated or mismatched")
        self._tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def _open_megatron_core(self) -> None:
        import logging
        mc = _megatron_core()
        logging.getLogger("megatron.core").setLevel(logging.WARNING)  # it logs every index load at INFO
        self._ds = mc.IndexedDataset(self.prefix, mmap=True)
        self.dtype = np.dtype(self._ds.index.dtype)
        self.seq_lengths = self._ds.sequence_lengths
        self.seq_pointers = self._ds.index.sequence_pointers
        self.doc_indices = self._ds.document_indices
        self._tokens = None

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Ids at positions [start, end) of the shard (a view for the native reader)."""
        if self._tokens is not None:
            return self._tokens[start:end]
        # megatron-core reads by (sequence, offset, length): walk the sequences the range covers.
        out, pos = [], start
        seq = int(np.searchsorted(self.seq_pointers, pos * self.itemsize, side="right")) - 1
        while pos < end:
            seq_start = int(self.seq_pointers[seq]) // self.itemsize
            take = min(end, seq_start + int(self.seq_lengths[seq])) - pos
            if take > 0:
                out.append(self._ds.get(seq, offset=pos - seq_start, length=take))
                pos += take
            seq += 1
        return np.concatenate(out) if out else np.zeros(0, self.dtype)

    def doc_start(self, doc: int) -> int:
        """Token position where document `doc` starts (doc == num_docs gives the end)."""
        if doc >= self.num_docs:
            return self.num_tokens
        return int(self.doc_ptr[doc]) // self.itemsize

    def boundaries(self, start: int, end: int) -> np.ndarray:
        """Positions p with start < p < end where a document starts."""
        lo = np.searchsorted(self.doc_ptr, start * self.itemsize, side="right")
        hi = np.searchsorted(self.doc_ptr, end * self.itemsize, side="left")
        return np.asarray(self.doc_ptr[lo:hi], dtype=np.int64) // self.itemsize

    def document(self, doc: int) -> np.ndarray:
        return np.asarray(self.tokens(self.doc_start(doc), self.doc_start(doc + 1)))
