"""Key/value cache for generation: exact for causal models, an approximation for bidirectional ones.

One `KVCache` holds, for every layer, the keys and values of a whole canvas (B, H_kv, capacity, D). A
forward pass with `kv_cache=cache` runs in one of two modes, set by the sampler before the call:

  - fill (`cache.fill(...)`): the tokens are the canvas from column 0; every layer stores its keys and
    values and attends exactly as without a cache, so a fill forward returns bit-identical logits;
  - reuse (`cache.reuse(start)`): the tokens are canvas columns [start, start + n). Their fresh keys and
    values overwrite those columns in the cache, and their queries attend over the cached keys of the other
    columns: columns [0, start + n) for a causal model, the whole canvas for a bidirectional one.

For a causal model the keys of earlier columns never change, so reuse is the ordinary exact KV cache. For a
bidirectional model every key depends on the whole canvas, which changes at every decoding step: keys
cached at a fill are stale afterwards, and the sampler refreshes them (a fill forward) when a block
completes, or every `refresh_every` steps (Fast-dLLM's prefix and dual caches; see model/sample.py).

`rows` selects the batch rows a forward covers (rows that still have work), so finished rows cost nothing
and every row's cache depends only on that row's own canvas.
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, capacity: int, *, causal: bool,
                 key_real: Optional[torch.Tensor] = None, prefix_only: bool = False):
        """key_real: (batch, capacity) bool, False at padding keys (which no query may see); None: all real.
        prefix_only: a reuse forward attends to every column before its end and to none after it (block
        diffusion's exact cache: the forward covers one block, which sees itself and the clean past)."""
        if key_real is not None and tuple(key_real.shape) != (batch, capacity):
            raise ValueError(f"key_real must have shape {(batch, capacity)}, got {tuple(key_real.shape)}")
        self.n_layers, self.batch, self.capacity, self.causal = n_layers, batch, capacity, causal
        self.key_real, self.prefix_only = key_real, prefix_only
        self.k: list[Optional[torch.Tensor]] = [None] * n_layers
        self.v: list[Optional[torch.Tensor]] = [None] * n_layers
        self.start, self.filling, self.rows = 0, True, None

    # ---------------------------------------------------------------- mode of the next forward
    def fill(self, rows: Optional[torch.Tensor] = None) -> "KVCache":
        """The next forward covers the canvas from column 0 and (re)writes these rows' keys and values."""
        self.start, self.filling, self.rows = 0, True, rows
        return self

    def reuse(self, start: int, rows: Optional[torch.Tensor] = None) -> "KVCache":
        """The next forward covers canvas columns from `start` and reads every other column from the cache."""
        if any(k is None for k in self.k):
            raise RuntimeError("KVCache.reuse before any fill: run a fill forward first")
        self.start, self.filling, self.rows = int(start), False, rows
        return self

    def positions(self, n: int) -> slice:
        """Canvas columns (rotary positions) of the n tokens of the next forward."""
        if self.start + n > self.capacity:
            raise ValueError(f"tokens at columns {self.start}..{self.start + n - 1} exceed the cache capacity "
                             f"{self.capacity}")
        return slice(self.start, self.start + n)

    def layer(self, i: int) -> "LayerCache":
        return LayerCache(self, i)

    # ---------------------------------------------------------------- called from model.attention
    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Store this forward's keys/values of layer i; return (keys, values, mask) to attend over.

        mask None: a fill forward, attend exactly as without a cache (the caller's own masks apply).
        Otherwise a bool (B, 1, n, K) mask over the returned K cached + fresh keys."""
        a, n = self.start, k.shape[2]
        rows = self.rows
        if self.filling:
            if self.k[i] is None:
                shape = (self.batch, k.shape[1], self.capacity, k.shape[3])
                self.k[i], self.v[i] = k.new_zeros(shape), v.new_zeros(shape)
            if rows is None:
                self.k[i][:, :, :n], self.v[i][:, :, :n] = k, v
            else:
                self.k[i][rows, :, :n], self.v[i][rows, :, :n] = k, v
            return k, v, None
        end = a + n
        kend = end if (self.causal or self.prefix_only) else self.capacity
        if rows is None:
            self.k[i][:, :, a:end], self.v[i][:, :, a:end] = k, v
            keys, values = self.k[i][:, :, :kend], self.v[i][:, :, :kend]
        else:
            self.k[i][rows, :, a:end], self.v[i][rows, :, a:end] = k, v
            keys, values = self.k[i][rows, :, :kend], self.v[i][rows, :, :kend]
        return keys, values, self._mask(a, end, kend, k.shape[0], k.device)

    def _mask(self, a: int, end: int, kend: int, b: int, device) -> torch.Tensor:
        mask = torch.ones(1, 1, end - a, kend, dtype=torch.bool, device=device)
        if self.causal:  # query at column a + j sees keys at columns <= a + j
            cols = torch.arange(kend, device=device)
            mask = mask & (cols[None, :] <= torch.arange(a, end, device=device)[:, None])[None, None]
        if self.key_real is not None:
            real = self.key_real if self.rows is None else self.key_real[self.rows]
            mask = mask & real[:, None, None, :kend]
        return mask.expand(b, 1, end - a, kend)


class LayerCache:
    """The view of one layer: what model.attention receives as `kv_cache`."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(self.i, k, v)
