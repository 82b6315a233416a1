"""Exactness of the NELBO estimators (eval/elbo.py) against brute-force enumeration of every mask.

For a tiny vocabulary and length, C(S) = sum_{i in S} -log p(x_i | x with S masked) is computed for all 2^L
subsets S with a plain full-logits forward, independently of the estimator code. Then
    NELBO        = sum_l (1/l) mean_{|S|=l} C(S)                                   (exact, what "count" targets)
    NELBO_eps    = 1/(1-eps) int_eps^1 sum_S t^{|S|-1} (1-t)^{L-|S|} C(S) dt        (what "t"/"mdlm" target)
and the estimators' Monte Carlo means must land on them within their reported standard errors.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from eval.elbo import evaluate_blocks, sequence_samples
from model.objectives.mdm import draw_mask, masked_ce_sums
from model import ModelConfig, Transformer

V, MASK = 3, 3  # three real tokens, the mask is id 3


def tiny_model(seed=0, length=4, causal=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=V + 1, mask_id=MASK,
                      max_seq_len=max(length, 8), causal=causal, init_std=0.6)
    m = Transformer(cfg)
    m.init_weights(seed=seed)  # large init so predictions depend strongly on the context
    return m.eval()


@torch.no_grad()
def subset_costs(model, x):
    """{subset (tuple of positions): C(S)} using full logits and an explicit log-softmax over real tokens."""
    L = len(x)
    out = {}
    for r in range(L + 1):
        for S in itertools.combinations(range(L), r):
            xt = torch.tensor(x).clone()
            xt[list(S)] = MASK
            logp = torch.log_softmax(model(xt[None])[0, :, :V].double(), -1)  # SUBS: mask column dropped
            out[S] = float(sum(-logp[i, x[i]] for i in S))
    return out


def exact_nelbo(costs, L):
    return sum(np.mean([c for S, c in costs.items() if len(S) == l]) / l for l in range(1, L + 1))


def exact_nelbo_eps(costs, L, eps):
    nodes, weights = np.polynomial.legendre.leggauss(40)  # exact for these degree <= L-1 polynomials
    t = (1 - eps) / 2 * nodes + (1 + eps) / 2
    integrand = sum(c * t ** (len(S) - 1) * (1 - t) ** (L - len(S)) for S, c in costs.items() if S)
    return float((integrand * weights).sum() * (1 - eps) / 2) / (1 - eps)


def test_masked_ce_sums_matches_explicit_log_softmax():
    model = tiny_model(1)
    x = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    masked = torch.tensor([[True, False, True, False], [False, True, True, True]])
    got = masked_ce_sums(model, x, masked, mask_id=MASK)
    costs = [subset_costs(model, row.tolist()) for row in x]
    want = [costs[0][(0, 2)], costs[1][(1, 2, 3)]]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-5)


def test_integrating_t_equals_summing_masked_counts():
    """The continuous-time NELBO (eps = 0) is the masked-count sum: the identity the "count" estimator rests on."""
    model = tiny_model(2)
    x = [0, 2, 1, 1]
    costs = subset_costs(model, x)
    assert exact_nelbo_eps(costs, 4, 0.0) == pytest.approx(exact_nelbo(costs, 4), rel=1e-10)
    # and eps > 0 really changes the target (so the next tests can tell the two apart)
    assert abs(exact_nelbo_eps(costs, 4, 0.2) - exact_nelbo(costs, 4)) > 1e-3


def test_count_stratification_covers_each_masked_count_equally():
    maskable = torch.tensor([True, False, True, True, True, False])  # n = 4 scored positions
    K = 12
    counts = [int(draw_mask("count", seed=5, seq=3, sample=k, samples=K, maskable=maskable)[0].sum())
              for k in range(K)]
    assert sorted(counts) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for k in range(K):
        m, w = draw_mask("count", seed=5, seq=3, sample=k, samples=K, maskable=maskable)
        assert not (m & ~maskable).any()  # only scored positions are masked
        assert w == pytest.approx(4 / int(m.sum()))


@pytest.mark.parametrize("method,eps", [("count", 0.0), ("t", 0.2), ("mdlm", 0.2)])
def test_estimator_mean_equals_enumerated_nelbo(method, eps):
    model = tiny_model(3)
    xs = [[0, 2, 1, 1], [1, 1, 1, 0]]
    K = 4000
    est = sequence_samples(model, torch.tensor(xs), method=method, samples=K, seed=11, mask_id=MASK, eps=eps,
                           batch_size=2000, group=8)
    for row, x in zip(est, xs):
        costs = subset_costs(model, x)
        target = exact_nelbo(costs, 4) if method == "count" else exact_nelbo_eps(costs, 4, eps)
        se = float(row.std()) / math.sqrt(K)  # stratified samples: this overstates the error, never understates
        assert abs(float(row.mean()) - target) < 4 * se, (method, float(row.mean()), target, se)
        # the check has teeth: a weighting off by 5% (e.g. 1/t against 1/p_mask) would fail it
        assert 4 * se < 0.05 * target


def _orders_nll(model, x):
    """-log p_sigma(x) for every decoding order sigma (one token unmasked per step)."""
    L = len(x)
    out = []
    with torch.no_grad():
        for order in itertools.permutations(range(L)):
            xt = torch.full((L,), MASK)
            nll = 0.0
            for i in order:
                logp = torch.log_softmax(model(xt[None])[0, :, :V].double(), -1)
                nll -= float(logp[i, x[i]])
                xt[i] = x[i]
            out.append(nll)
    return out


def test_nelbo_is_any_order_nll_and_bounds_the_implied_distribution():
    """NELBO(x) = E_sigma[-log p_sigma(x)] (any-order AR identity) >= -log p_mix(x), where
    p_mix = E_sigma p_sigma is the model's implied distribution: normalized, so the bound is a real NLL bound."""
    model = tiny_model(4, length=3)
    L = 3
    total_mix = 0.0
    gaps = []
    for x in itertools.product(range(V), repeat=L):
        nlls = _orders_nll(model, list(x))
        nelbo = exact_nelbo(subset_costs(model, list(x)), L)
        assert nelbo == pytest.approx(np.mean(nlls), rel=1e-9)
        p_mix = float(np.mean(np.exp(-np.array(nlls))))
        total_mix += p_mix
        assert nelbo >= -math.log(p_mix) - 1e-12
        gaps.append(nelbo + math.log(p_mix))
    assert total_mix == pytest.approx(1.0, abs=1e-9)
    assert max(gaps) > 1e-3  # an inconsistent model: the bound is strict somewhere


class TableOracle(torch.nn.Module):
    """A 'model' whose predictions are the exact conditionals of a known joint q over V^L."""

    def __init__(self, q: np.ndarray, L: int):
        super().__init__()
        self.seqs = np.array(list(itertools.product(range(V), repeat=L)))
        self.q = q
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the evaluator a device to read

    def forward(self, tokens, doc_ids=None, key_padding=None, logits_at=None):
        out = []
        for row in tokens.tolist():
            ok = np.all([(self.seqs[:, i] == t) | (t == MASK) for i, t in enumerate(row)], axis=0)
            w = self.q * ok
            probs = np.stack([np.bincount(self.seqs[:, i], weights=w, minlength=V) for i in range(len(row))])
            probs /= probs.sum(1, keepdims=True)
            logits = np.concatenate([np.log(np.maximum(probs, 1e-300)), np.full((len(row), 1), -1e9)], 1)
            out.append(logits)
        logits = torch.tensor(np.stack(out), dtype=torch.float32)
        return logits[logits_at] if logits_at is not None else logits


def test_bound_is_tight_for_the_true_conditionals():
    """With the true conditionals of q the NELBO equals -log q(x) exactly (every order's chain rule gives q)."""
    L = 4
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.full(V ** L, 0.3))
    oracle = TableOracle(q, L)
    for idx in (int(q.argmax()), 7, 40):
        x = oracle.seqs[idx].tolist()
        assert exact_nelbo(subset_costs(oracle, x), L) == pytest.approx(-math.log(q[idx]), rel=1e-5)


def test_ar_exact_nll_matches_manual_chain_rule():
    model = tiny_model(5, length=6, causal=True)
    x = torch.tensor([[0, 1, 2, 2, 1, 0], [2, 0, 0, 1, 1, 2]])
    est = evaluate_blocks(model, x, method="ar", mask_id=MASK)
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[:, :, :V].double(), -1)
    want = -sum(float(logp[b, i - 1, x[b, i]]) for b in range(2) for i in range(1, 6))
    assert est.total_nats == pytest.approx(want, rel=1e-5)
    assert est.n_tokens == 10 and est.stderr_kind == "exact"
