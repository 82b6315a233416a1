"""Weighted blending: proportions, determinism, per-dataset epochs, stateless lookup."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data import Loader, build_data
from data.blend import BlendedSource, largest_remainder
from datakit import data_config, distinct_docs, prepare_words


class CountingSource:
    """Sample i of source k is a row filled with k * 10**6 + i: every draw is identifiable."""

    def __init__(self, k: int, n: int, seq_len: int = 4):
        self.k, self.num_samples, self.seq_len = k, n, seq_len

    def get(self, indices):
        v = torch.tensor([self.k * 10**6 + i for i in indices], dtype=torch.int64)
        return v[:, None].expand(-1, self.seq_len).clone(), None


def test_largest_remainder():
    assert largest_remainder([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert largest_remainder([0.5, 0.3, 0.2], 4096).sum() == 4096
    c = largest_remainder([0.7, 0.2, 0.1], 1000)
    assert c.tolist() == [700, 200, 100]
    with pytest.raises(ValueError, match="positive"):
        largest_remainder([1, 0], 10)


def test_weights_honored_and_deterministic():
    weights = [0.5, 0.3, 0.2]
    srcs = [CountingSource(k, n) for k, n in enumerate([1000, 37, 5000])]
    blend = BlendedSource(srcs, weights, seed=5, block=1024)
    n = 20 * 1024
    which, local = blend.locate(np.arange(n))
    counts = np.bincount(which, minlength=3)
    # Whole blocks: exact apportionment.
    assert (counts == 20 * largest_remainder(weights, 1024)).all()
    # Any window: binomial-like tolerance (the in-block shuffle makes a window a random sample of slots).
    for start in range(0, n - 2000, 1777):
        w = np.bincount(which[start:start + 2000], minlength=3) / 2000
        assert np.all(np.abs(w - weights) < 4 * np.sqrt(np.array(weights) * (1 - np.array(weights)) / 2000) + 1e-3)
    # Same seed, same stream; another seed, another order with the same proportions.
    again = BlendedSource(srcs, weights, seed=5, block=1024)
    assert torch.equal(blend.get(list(range(500)))[0], again.get(list(range(500)))[0])
    other = BlendedSource(srcs, weights, seed=6, block=1024)
    assert not torch.equal(blend.get(list(range(500)))[0], other.get(list(range(500)))[0])
    assert (np.bincount(other.locate(np.arange(n))[0], minlength=3) == counts).all()


def test_each_dataset_runs_through_its_own_epochs():
    srcs = [CountingSource(0, 50), CountingSource(1, 20)]
    blend = BlendedSource(srcs, [2, 1], seed=1, block=30)
    pos = np.arange(3000)
    which, sample = blend.locate(pos)
    _, m = blend.draws(pos)
    for k, s in enumerate(srcs):
        n = s.num_samples
        mk, sk = m[which == k], sample[which == k]
        assert sorted(mk.tolist()) == list(range(len(mk)))  # draws of dataset k are numbered without gaps
        order = sk[np.argsort(mk)]
        for e in range(len(order) // n):  # every full epoch of dataset k is a permutation of its samples
            assert sorted(order[e * n:(e + 1) * n].tolist()) == list(range(n))
        assert not np.array_equal(order[:n], order[n:2 * n])  # and epochs are reshuffled


def test_lookup_is_stateless():
    srcs = [CountingSource(0, 300), CountingSource(1, 200)]
    blend = BlendedSource(srcs, [1, 3], seed=9, block=64)
    pos = np.arange(5000, 5600)
    whole = blend.get(pos.tolist())[0]
    parts = torch.cat([blend.get(pos[i:i + 7].tolist())[0] for i in range(0, len(pos), 7)])
    shuffled = np.random.default_rng(0).permutation(len(pos))
    assert torch.equal(whole, parts)
    assert torch.equal(whole[shuffled], blend.get(pos[shuffled].tolist())[0])
    # Through the Loader at two data-parallel degrees the global batch is the same.
    G = 12
    one = Loader(blend, 9, 0, 1).micro_batch(120, G, G, 0)[0]
    three = torch.cat([Loader(blend, 9, r, 3).micro_batch(120, G, 4, 0)[0] for r in range(3)])
    assert torch.equal(one, three)


def test_tiny_weight_rejected():
    with pytest.raises(ValueError, match="never be drawn"):
        BlendedSource([CountingSource(0, 10), CountingSource(1, 10)], [1, 1e-6], seed=0, block=1024)


def test_blend_of_prepared_datasets(tmp_path):
    from datakit import word_tokenizer
    rng = np.random.default_rng(0)
    tok = word_tokenizer(tmp_path / "shared_tok.json", 5000)
    a = prepare_words(tmp_path, distinct_docs(100, rng, first_id=1), name="a", tokenizer=tok)
    b = prepare_words(tmp_path, distinct_docs(100, rng, first_id=2500), name="b", tokenizer=tok)
    bundle = build_data(data_config([a, b], 8, valid_fraction=0.05, weights=[3, 1]), seed=0)
    x, doc = bundle.train.get(list(range(4000)))
    words = torch.where(x < 5000, x, torch.zeros_like(x))  # ids >= 5000 are the added EOS / mask
    from_a = (words.max(1).values < 2500).float().mean().item()
    assert abs(from_a - 0.75) < 0.01  # 4000 positions ~ one block of 4096: within the apportionment
    assert doc is not None and doc.shape == x.shape
    assert "valid" in bundle.valid
