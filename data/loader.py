"""Stateless global sample order.

The sample at global position g (counting every sample every rank has consumed since step 0) is
    source index = permute(g mod N, N, seed, epoch = g div N)
with `permute` a keyed bijection of [0, N) (a Feistel network with cycle walking): O(1) memory, no
per-epoch index file. The whole loader state is therefore one integer, `consumed`, and resuming at any
data-parallel degree (resharding included) continues exactly where the run stopped.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit integer hash (splitmix64 finalizer) of x under key, vectorized, wrapping arithmetic."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64((key * 0x9E3779B97F4A7C15) & _MASK64)).astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(idx: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 6) -> np.ndarray:
    """Bijection of [0, n) keyed by (seed, epoch), applied elementwise to idx."""
    idx = np.asarray(idx, dtype=np.uint64)
    if n <= 1:
        return idx.astype(np.int64)
    bits = max(2, int(np.ceil(np.log2(n))))
    bits += bits % 2
    half = bits // 2
    low_mask = np.uint64((1 << half) - 1)
    keys = [(seed * 1_000_003 + epoch * 7919 + r * 104_729 + 1) & _MASK64 for r in range(rounds)]

    def feistel(x):
        left, right = x >> np.uint64(half), x & low_mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & low_mask)
        return (left << np.uint64(half)) | right

    out = feistel(idx)
    # Cycle walking: values that land outside [0, n) are permuted again until they fall inside.
    bad = out >= np.uint64(n)
    while bad.any():
        out[bad] = feistel(out[bad])
        bad = out >= np.uint64(n)
    return out.astype(np.int64)


class Loader:
    """Hands each data-parallel rank its slice of every global batch.

    Rank r's part of a global batch [start, start + G) is [start + r*G/dp, start + (r+1)*G/dp); its
    micro-batch m is the m-th chunk of that."""

    def __init__(self, source, seed: int, dp_rank: int = 0, dp_size: int = 1):
        self.source, self.seed, self.dp_rank, self.dp_size = source, seed, dp_rank, dp_size

    def source_indices(self, global_positions: np.ndarray) -> np.ndarray:
        n = self.source.num_samples
        if n is None:  # endless source: position is the index
            return global_positions.astype(np.int64)
        epochs = global_positions // n
        out = np.empty_like(global_positions, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = permute(global_positions[sel] % n, n, self.seed, int(epoch))
        return out

    def rank_positions(self, start: int, global_batch: int) -> np.ndarray:
        if global_batch % self.dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel degree {self.dp_size}")
        per_rank = global_batch // self.dp_size
        first = start + self.dp_rank * per_rank
        return np.arange(first, first + per_rank, dtype=np.int64)

    def micro_batch(self, start: int, global_batch: int, micro_size: int, micro_idx: int,
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        pos = self.rank_positions(start, global_batch)[micro_idx * micro_size:(micro_idx + 1) * micro_size]
        return self.source.get(self.source_indices(pos).tolist())
