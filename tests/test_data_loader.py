"""Packing and the stateless loader over prepared data: coverage per epoch at any data-parallel degree, resume
with a different degree, document boundaries, the held-out validation split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data import Loader, build_data
from data.shards import PackedSource, PreparedDataset, holdout_ranges
from datakit import data_config, distinct_docs, prepare_words

L = 16
G = 12  # divisible by 1, 2 and 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    docs = distinct_docs(300, np.random.default_rng(0), max_len=30)
    # Small shards so samples straddle shard boundaries too.
    out = prepare_words(tmp, docs, shard_tokens=1000)
    return out, docs


def _stream_tokens(docs, eos):
    return np.concatenate([np.array(d + [eos]) for d in docs])


def _deliver(source, seed, dp, start, stop, micro):
    """What each rank gets for global positions [start, stop) stepping G at a time: {position: row tokens}."""
    got = {}
    for r in range(dp):
        loader = Loader(source, seed, dp_rank=r, dp_size=dp)
        for step_start in range(start, stop, G):
            rows = loader.rank_positions(step_start, G)
            for m in range(len(rows) // micro):
                x, doc = loader.micro_batch(step_start, G, micro, m)
                assert x.dtype == torch.int64 and doc.shape == x.shape
                for pos, row in zip(rows[m * micro:(m + 1) * micro].tolist(), x):
                    assert pos not in got, f"position {pos} delivered twice (rank {r})"
                    got[pos] = row.numpy()
    return got


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_one_epoch_delivers_every_token_once(corpus, dp):
    out, docs = corpus
    ds = PreparedDataset(out)
    train, _ = ds.split(0.0)
    src = PackedSource(train, L)
    eos = ds.tokenizer.eos_id
    stream = _stream_tokens(docs, eos)
    assert train.num_tokens == len(stream) and src.num_samples == len(stream) // L
    N = src.num_samples
    steps = -(-N // G)
    got = _deliver(src, seed=7, dp=dp, start=0, stop=steps * G, micro=G // dp // 2 if dp < 3 else G // dp)
    epoch = np.concatenate([got[p] for p in range(N)])
    # The epoch is a permutation of the packed samples: as multisets the tokens are the stream's first N*L ...
    assert np.array_equal(np.sort(epoch), np.sort(stream[:N * L]))
    # ... and every document token (all distinct) appears exactly once; only the < L tail is left out.
    words = epoch[epoch != eos]
    assert len(np.unique(words)) == len(words)
    expected = stream[:N * L]
    assert set(words.tolist()) == set(expected[expected != eos].tolist())
    assert len(stream) - N * L < L
    # Positions past N start the next epoch with a different order of the same samples.
    nxt = [tuple(got[p]) for p in range(N, steps * G)]
    assert all(t in {tuple(got[p]) for p in range(N)} for t in nxt)


def test_order_depends_on_seed_only(corpus):
    out, _ = corpus
    src = PackedSource(PreparedDataset(out).split(0.0)[0], L)
    a = Loader(src, 3).micro_batch(0, G, G, 0)[0]
    b = Loader(src, 3).micro_batch(0, G, G, 0)[0]
    c = Loader(src, 4).micro_batch(0, G, G, 0)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_at_another_degree_delivers_exactly_the_unseen(corpus):
    out, _ = corpus
    src = PackedSource(PreparedDataset(out).split(0.0)[0], L)
    N = src.num_samples
    seen_steps = 5
    before = _deliver(src, seed=11, dp=2, start=0, stop=seen_steps * G, micro=3)
    consumed = seen_steps * G  # the whole loader state saved in a checkpoint
    steps_total = N // G  # stay inside epoch 0 to compare sets
    after = _deliver(src, seed=11, dp=3, start=consumed, stop=steps_total * G, micro=2)
    reference = _deliver(src, seed=11, dp=1, start=0, stop=steps_total * G, micro=G)
    assert set(before) | set(after) == set(reference) and not set(before) & set(after)
    for p, row in {**before, **after}.items():
        assert np.array_equal(row, reference[p]), f"position {p} differs after resharding"
    # Exactly the not-yet-seen samples: none of `after` repeats a sample of `before`.
    rows_before = {tuple(r) for r in before.values()}
    assert not any(tuple(r) in rows_before for r in after.values())


def test_packed_document_ids_match_source_documents(corpus, tmp_path):
    out, docs = corpus
    ds = PreparedDataset(out)
    for fraction in (0.0, 0.1):  # with held-out stripes the training stream skips documents
        train, _ = ds.split(fraction)
        held = holdout_ranges(len(docs), fraction)
        kept = [d for i, d in enumerate(docs) if not any(a <= i < b for a, b in held)]
        eos = ds.tokenizer.eos_id
        stream = _stream_tokens(kept, eos)
        doc_of = np.concatenate([np.full(len(d) + 1, i) for i, d in enumerate(kept)])
        src = PackedSource(train, L)
        x, doc = src.get(list(range(src.num_samples)))
        assert np.array_equal(x.numpy().ravel(), stream[:src.num_samples * L])
        for i in range(src.num_samples):
            truth = doc_of[i * L:(i + 1) * L]
            d = doc[i].numpy()
            assert d[0] == 0
            # Same partition of the row into documents: ids change exactly where the source document changes.
            assert np.array_equal(np.diff(d) != 0, np.diff(truth) != 0), f"sample {i}"
            assert (np.diff(d) >= 0).all()
            # Every document piece but possibly the row's last ends with EOS.
            ends = np.flatnonzero(np.diff(d))
            assert (x[i].numpy()[ends] == eos).all()


def test_validation_is_held_out_by_document(corpus):
    out, docs = corpus
    ds = PreparedDataset(out)
    train, valid = ds.split(0.1)
    def ids(stream):
        toks = np.concatenate([np.asarray(ds.shards[k].tokens(s, s + n)) for k, s, n in zip(
            stream.run_shard, stream.run_start, np.diff(stream.cum))])
        return set(toks[toks != ds.tokenizer.eos_id].tolist())
    t, v = ids(train), ids(valid)
    assert not t & v
    assert t | v == {i for d in docs for i in d}
    held_docs = [d for d in docs if d[0] in v]
    assert all(set(d) <= v for d in held_docs)  # whole documents, never parts
    assert 0.05 < len(held_docs) / len(docs) < 0.15
    # Independent of the seed: the split is a function of the corpus alone.
    assert holdout_ranges(len(docs), 0.1) == holdout_ranges(len(docs), 0.1)


def test_build_data_bundle(corpus):
    out, docs = corpus
    bundle = build_data(data_config(out, L, valid_fraction=0.1), seed=0)
    tok = bundle.info["tokenizer"]
    assert bundle.vocab_size == tok.vocab_size and bundle.mask_id == tok.mask_id and bundle.eos_id == tok.eos_id
    assert list(bundle.valid) == ["valid"] and bundle.valid["valid"].num_samples > 0
    assert bundle.train.num_samples * L <= sum(len(d) + 1 for d in docs)
    x, doc = bundle.train.get([0])
    assert bundle.decode(x[0][:3].tolist()).startswith("w")
    assert (x != bundle.mask_id).all(), "the mask id must never occur in the data"


def test_loader_feeds_document_mask_to_model(corpus):
    """The model's attention stays inside documents: logits of a position do not change when another
    document in the same row changes."""
    from model import Transformer
    from model.config import ModelConfig
    out, _ = corpus
    src = PackedSource(PreparedDataset(out).split(0.0)[0], L)
    i = next(i for i in range(src.num_samples) if src.get([i])[1].max() > 0)  # a row holding two documents
    x, doc = src.get([i])
    tok = PreparedDataset(out).tokenizer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=tok.vocab_size,
                                    mask_id=tok.mask_id, max_seq_len=L)).eval()
    model.init_weights(seed=0)
    first = doc[0] == 0
    y = x.clone()
    y[0, ~first] = (y[0, ~first] + 1) % tok.mask_id  # change every token outside the first document
    with torch.no_grad():
        a = model(x, doc_ids=doc)[0, first]
        b = model(y, doc_ids=doc)[0, first]
    assert torch.allclose(a, b, atol=1e-5)
