"""Weighted blending of several sample sources with O(1), stateless lookup.

Global position g falls in block b = g // B at slot s = g % B. Each block gives dataset k exactly n_k of its B
slots, n_k being the largest-remainder apportionment of B * w_k / sum(w) (the same every block, so the mixture
is exact to within 1/B at every block boundary, not just on average). A keyed bijection of the block's slots,
keyed by (seed, b), decides which slot goes to which dataset: slot s maps to p = permute(s, B, seed, b), and p
in [c_k, c_k + n_k) (c_k = n_0 + ... + n_{k-1}) means dataset k's sample number m = b * n_k + (p - c_k). Each
dataset then visits its own samples in its own shuffled epochs: index permute(m mod N_k, N_k, seed_k, m div N_k).

Everything is a pure function of (seed, g): the blend has no state, so resuming at any position and any
data-parallel degree reproduces the exact sequence, and any position can be looked up without replaying.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .loader import permute


def largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (Hamilton's method, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    rest = total - int(counts.sum())
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


class BlendedSource:
    """An endless source (num_samples None) drawing from `sources` in proportion to `weights`."""
    num_samples: Optional[int] = None

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int, block: int = 4096,
                 names: Optional[Sequence[str]] = None):
        if len(sources) != len(weights) or not sources:
            raise ValueError("a blend needs one weight per source and at least one source")
        lens = {s.seq_len for s in sources}
        if len(lens) != 1:
            raise ValueError(f"blended sources must share one sequence length, got {sorted(lens)}")
        for i, s in enumerate(sources):
            if not s.num_samples:
                raise ValueError(f"blend source {names[i] if names else i} has no samples")
        self.sources, self.seed, self.block = list(sources), seed, block
        self.seq_len = lens.pop()
        self.names = list(names) if names else [str(i) for i in range(len(sources))]
        self.counts = largest_remainder(weights, block)
        if (self.counts == 0).any():
            small = [self.names[i] for i in np.flatnonzero(self.counts == 0)]
            raise ValueError(f"blend weights of {small} are below 1/{block} of the total: they would never be drawn")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        # Per-dataset key for its own epochs, distinct from the slot key and from the other datasets.
        self.keys = [(seed * 1_000_033 + 7 * (k + 1)) & ((1 << 62) - 1) for k in range(len(sources))]

    def draws(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(dataset k, draw number m: how many samples dataset k gave before this one) per global position."""
        g = np.asarray(positions, dtype=np.int64)
        blocks, slots = g // self.block, g % self.block
        which = np.empty_like(g)
        local = np.empty_like(g)
        for b in np.unique(blocks):
            sel = blocks == b
            p = permute(slots[sel], self.block, self.seed, int(b))
            k = np.searchsorted(self.starts, p, side="right") - 1
            which[sel] = k
            local[sel] = int(b) * self.counts[k] + (p - self.starts[k])
        return which, local

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, sample index inside it) for each global position."""
        g = np.asarray(positions, dtype=np.int64)
        which, local = self.draws(g)
        out = np.empty_like(g)
        for k, src in enumerate(self.sources):
            sel = which == k
            if not sel.any():
                continue
            m, n = local[sel], src.num_samples
            ep = m // n
            res = np.empty_like(m)
            for e in np.unique(ep):
                s2 = ep == e
                res[s2] = permute(m[s2] % n, n, self.keys[k], int(e))
            out[sel] = res
        return which, out

    def get(self, indices: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        which, local = self.locate(indices)
        tokens = torch.empty(len(indices), self.seq_len, dtype=torch.int64)
        docs = torch.zeros(len(indices), self.seq_len, dtype=torch.int64)
        for k, src in enumerate(self.sources):
            rows = np.flatnonzero(which == k)
            if rows.size:
                t, d = src.get(local[rows].tolist())
                tokens[torch.from_numpy(rows)] = t
                if d is not None:
                    docs[torch.from_numpy(rows)] = d
        return tokens, docs
