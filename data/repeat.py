"""Data-constrained training: restrict the training samples to the first U unique tokens of the shuffled order.

A run with `data.unique_tokens = U` trains on K = U // seq_len packed samples, the first K of the epoch-0 order
that the uncapped run would see (so runs with different U share their data prefix), and repeats them for as
many epochs as its step count needs; the loader reshuffles them every epoch as usual."""
from __future__ import annotations

import numpy as np

from .loader import permute
from .shards import DataError


class RepeatedSubset:
    """SampleSource over the first `keep` samples of `source` in the shuffled order of `seed`."""

    def __init__(self, source, keep: int, seed: int):
        n = source.num_samples
        if n is None:
            raise DataError("data.unique_tokens needs a finite training set (data.kind=prepared)")
        if not 1 <= keep <= n:
            raise DataError(f"data.unique_tokens asks for {keep:,} samples of {source.seq_len} tokens but the training "
                            f"set has {n:,} ({n * source.seq_len:,} tokens): lower it, or set 0 to use all the data")
        self.source, self.seq_len, self.num_samples = source, source.seq_len, keep
        self.name = getattr(source, "name", "")
        self.indices = permute(np.arange(keep), n, seed, 0)

    def get(self, indices: list[int]):
        if any(not 0 <= i < self.num_samples for i in indices):
            raise IndexError(f"sample index outside [0, {self.num_samples}) of the unique-token subset")
        return self.source.get(self.indices[np.asarray(indices, dtype=np.int64)].tolist())


def cap_unique_tokens(source, unique_tokens: int, seed: int):
    """`source` itself when unique_tokens is 0, else its RepeatedSubset of unique_tokens // seq_len samples."""
    if not unique_tokens:
        return source
    if unique_tokens < source.seq_len:
        raise DataError(f"data.unique_tokens={unique_tokens} is below one sequence (data.seq_len={source.seq_len})")
    return RepeatedSubset(source, unique_tokens // source.seq_len, seed)
