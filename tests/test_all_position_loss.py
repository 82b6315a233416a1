"""The chunked all-position loss of the output head (model/transformer.py, `row_loss=`): an objective's own
per-row loss over the full vocabulary, `ce_chunk` rows of logits at a time, recomputed in backward, equals the
plain loss on the full (N, V) logits in values and gradients. (Tensor parallelism: tests/test_time_conditioning.py
runs it through the vocab-parallel head at DP2 x TP2.)"""
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer

TOL = 1e-6


def tiny(**kw) -> Transformer:
    cfg = ModelConfig(**{**dict(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=50, mask_id=49,
                                max_seq_len=64), **kw})
    m = Transformer(cfg)
    m.init_weights(seed=0)
    return m


def full_softmax_loss(targets: torch.Tensor, weights: torch.Tensor, prior: torch.Tensor):
    """A per-row loss that needs every vocabulary entry (as uniform-noise objectives do): weighted
    cross-entropy plus the KL from a per-row prior distribution, each row's auxiliaries indexed by `rows`."""
    def fn(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        assert logits.dtype == torch.float32
        logp = logits.log_softmax(-1)
        ce = -logp.gather(1, targets[rows, None])[:, 0]
        kl = (prior[rows] * (prior[rows].log() - logp)).sum(-1)
        return weights[rows] * ce + 0.5 * kl
    return fn


def aux(n: int, V: int = 50, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V, (n,), generator=g), torch.rand(n, generator=g) + 0.5,
            torch.softmax(torch.randn(n, V, generator=g), -1))


def assert_close(a, b):
    # (gradients of the mean loss, as objectives reduce it: sum / (B * L))
    assert a.shape == b.shape
    assert float((a - b).detach().abs().max()) <= TOL, float((a - b).detach().abs().max())


@pytest.mark.parametrize("chunk", [0, 7, 8, 16, 64, 1000])  # 0: unchunked; 7: a ragged last chunk; 8, 16 divide 64
def test_chunked_row_loss_equals_the_plain_loss_in_values_and_gradients(chunk):
    """On the head directly: the loss and its gradients w.r.t. the head weight and the hidden states."""
    m = tiny()
    N = 64
    h = torch.randn(N, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fn = full_softmax_loss(*aux(N))
    plain = fn(F.linear(h, m.output.weight).float(), slice(0, N))
    g_plain = torch.autograd.grad(plain.mean(), [m.output.weight, h])
    chunked = m.output(h, row_loss=fn, chunk=chunk)
    assert_close(chunked, plain)
    g_chunked = torch.autograd.grad(chunked.mean(), [m.output.weight, h])
    for a, b in zip(g_chunked, g_plain):
        assert_close(a, b)


@pytest.mark.parametrize("selected", ["every", "masked"])
@pytest.mark.parametrize("chunk", [5, 12])  # N = 48 every position: 5 does not divide it, 12 does
def test_model_row_loss_over_every_or_selected_positions(selected, chunk):
    """Through the model: logits_at=None means every position (row-major, B * L rows); a boolean logits_at
    selects rows as the targets= path does. Gradients of every parameter match the unchunked loss."""
    m = tiny()
    x = torch.randint(0, 49, (3, 16), generator=torch.Generator().manual_seed(2))
    at = None if selected == "every" else torch.rand(3, 16, generator=torch.Generator().manual_seed(3)) < 0.5
    logits = m(x, logits_at=at)
    logits = logits.reshape(-1, logits.shape[-1]) if at is None else logits
    N = logits.shape[0]
    assert N == (48 if at is None else int(at.sum())) and N > 12
    fn = full_softmax_loss(*aux(N))
    plain = fn(logits.float(), slice(0, N))
    g_plain = torch.autograd.grad(plain.mean(), list(m.parameters()))
    chunked = m(x, logits_at=at, row_loss=fn, ce_chunk=chunk)
    assert_close(chunked, plain)
    g = torch.autograd.grad(chunked.mean(), list(m.parameters()))
    for a, b in zip(g, g_plain):
        assert_close(a, b)


def test_rows_index_the_flattened_selected_positions():
    m = tiny()
    x = torch.randint(0, 49, (2, 8))
    seen = []

    def fn(logits, rows):
        seen.append((rows.start, rows.stop, logits.shape[0]))
        return logits.sum(-1)
    m(x, row_loss=fn, ce_chunk=5)
    assert seen == [(0, 5, 5), (5, 10, 5), (10, 15, 5), (15, 16, 1)]


def test_cross_entropy_as_a_row_loss_is_the_targets_path_bit_for_bit():
    """The targets= path is unchanged; a cross-entropy row loss computes exactly the same numbers."""
    m = tiny()
    x = torch.randint(0, 49, (4, 16), generator=torch.Generator().manual_seed(4))
    at = torch.rand(4, 16, generator=torch.Generator().manual_seed(5)) < 0.6
    target = x[at]
    for chunk in (0, 7):
        ce = m(x, logits_at=at, targets=target, ce_chunk=chunk)
        rows = m(x, logits_at=at, ce_chunk=chunk,
                 row_loss=lambda logits, r: F.cross_entropy(logits, target[r], reduction="none"))
        assert torch.equal(ce, rows)


def test_bad_row_losses_are_refused():
    m = tiny()
    x = torch.randint(0, 49, (2, 8))
    with pytest.raises(ValueError, match="one loss per row"):
        m(x, row_loss=lambda logits, rows: logits.sum())
    with pytest.raises(ValueError, match="either targets"):
        m(x, logits_at=torch.ones(2, 8, dtype=torch.bool), targets=x.flatten(), row_loss=lambda lg, r: lg.sum(-1))
