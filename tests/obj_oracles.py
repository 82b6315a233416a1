"""Shared exact helpers for objective and sampler tests on tiny joints (V <= 4 real tokens, L <= 3): the
enumerated posterior of a masked pattern, a network that looks its logits up in a table (so a test can hand a
sampler or a loss the exact posterior, or any fixed prediction), and the chi-square check of samples against a
joint. (tests/test_ppl_oracle.py holds the Markov-chain oracle for longer sequences.)"""
from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import nn


def random_joint(V: int, L: int, seed: int = 0) -> torch.Tensor:
    """An arbitrary full-support joint over V^L sequences, float64, shape (V,) * L."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand((V,) * L, generator=g, dtype=torch.float64) + 0.05
    return p / p.sum()


def states(V: int, L: int) -> torch.Tensor:
    """(V^L, L) every sequence, in the joint's flattening order."""
    return torch.tensor(list(itertools.product(range(V), repeat=L)))


def posterior(joint: torch.Tensor, z: torch.Tensor, mask_id: int,
              mask_lik: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """(L, V) float64: p(x_n = v | z) for every position, under the joint (see posterior_table)."""
    return posterior_table(joint, z[None], mask_id, mask_lik)[0]


def posterior_table(joint: torch.Tensor, zs: torch.Tensor, mask_id: int,
                    mask_lik: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """(P, L, V) float64: p(x_n = v | z) for every pattern z of zs (P, L) and position, under the joint. Visible
    tokens must match; a mask at position n contributes the likelihood mask_lik(v) of being masked given
    x_n = v (default 1: masking independent of the value, the ordinary absorbing process)."""
    V, L = joint.shape[0], joint.ndim
    xs = states(V, L)  # (S, L)
    lik = torch.ones(xs.shape, dtype=torch.float64) if mask_lik is None else mask_lik(xs).double()
    is_mask = (zs == mask_id)[:, None, :]  # (P, 1, L)
    factor = torch.where(is_mask, lik[None], (xs[None] == zs[:, None, :]).double())  # (P, S, L)
    weight = joint.reshape(-1)[None] * factor.prod(-1)  # (P, S)
    weight = weight / weight.sum(1, keepdim=True)
    onehot = torch.nn.functional.one_hot(xs, V).double()  # (S, L, V)
    return torch.einsum("ps,slv->plv", weight, onehot)


class TableNet(nn.Module):
    """A stand-in network over (V + 1)-ary inputs of length L (mask id V) whose logits come from a table
    indexed by the whole input: `table` (fn(z (L,)) -> (L, V + 1) logits) is evaluated for every pattern once,
    or per call when `t_dependent` (then fn(z, t))."""

    def __init__(self, V: int, L: int, fn, t_dependent: bool = False):
        super().__init__()
        self.V, self.L, self.fn, self.t_dependent = V, L, fn, t_dependent
        self.cfg = SimpleNamespace(vocab_size=V + 1, mask_id=V, causal=False, n_layers=1,
                                   time_conditioning="adaln" if t_dependent else "none")
        self.anchor = nn.Parameter(torch.zeros(()))  # so next(model.parameters()) gives the device
        self.patterns = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))
        if not t_dependent:
            self.register_buffer("table", torch.stack([fn(z) for z in self.patterns]).float())

    def index(self, xt: torch.Tensor) -> torch.Tensor:
        base = (self.V + 1) ** torch.arange(self.L - 1, -1, -1)
        return (xt * base).sum(-1)

    def forward(self, xt, doc_ids=None, key_padding=None, logits_at=None, targets=None, ce_chunk=0,
                kv_cache=None, t=None, row_loss=None):
        if self.t_dependent:
            logits = torch.stack([self.fn(z, float(tt)) for z, tt in zip(xt, t)]).float()
        else:
            logits = self.table[self.index(xt)]
        logits = logits + 0.0 * self.anchor
        if logits_at is not None:
            logits = logits[logits_at]
        elif row_loss is not None:
            logits = logits.reshape(-1, logits.shape[-1])
        if row_loss is not None:
            return row_loss(logits, slice(0, logits.shape[0]))
        return logits


def log_table(probs_fn):
    """Wrap a (L, V) probability function into (L, V + 1) logits with the mask entry at -inf."""
    def fn(*args):
        p = probs_fn(*args)
        out = torch.full((p.shape[0], p.shape[1] + 1), float("-inf"), dtype=torch.float64)
        out[:, :-1] = torch.log(p.clamp_min(1e-300))
        return out
    return fn


def chi_square_p(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """p-value of the chi-square test of samples (N, L) against the joint."""
    from scipy.stats import chisquare
    V, L = joint.shape[0], joint.ndim
    idx = (samples * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
    counts = torch.bincount(idx, minlength=V ** L).double()
    expected = joint.reshape(-1) * samples.shape[0]
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def soft_posterior(joint: torch.Tensor, lik: torch.Tensor, leave_out: bool) -> torch.Tensor:
    """(K, L, V) float64: p(x_n = v | evidence k) under the joint for K evidence patterns, where position m's
    evidence has likelihood lik[k, m, v] given x_m = v (soft evidence: a uniform-noised token gives
    alpha [v = z] + (1 - alpha) / N, a mask a constant). leave_out: position n's own evidence is left out of
    its posterior (the leave-one-out posterior p(x_n | z^{-n}), the exact optimum of uniform-state losses)."""
    V, L = joint.shape[0], joint.ndim
    xs = states(V, L)
    per = torch.stack([lik[:, m][:, xs[:, m]] for m in range(L)], 1)  # (K, L, V^L)
    out = []
    for n in range(L):
        keep = [m for m in range(L) if not (leave_out and m == n)]
        w = joint.reshape(-1) * per[:, keep].prod(1)  # (K, V^L)
        w = w / w.sum(-1, keepdim=True)
        out.append(torch.zeros(w.shape[0], V, dtype=torch.float64).index_add_(1, xs[:, n], w))
    return torch.stack(out, 1)


class SoftOracle(nn.Module):
    """A time-conditioned network that returns the exact posterior of each position under the joint given
    the noised input, with the soft evidence of `objective`'s forward process (objective.marginal_table(t));
    leave_out: the leave-one-out posterior (the uniform / hybrid optimum). Vocabulary: V real ids, then mask."""

    def __init__(self, joint: torch.Tensor, objective, leave_out: bool = True):
        super().__init__()
        self.joint, self.obj, self.leave_out = joint, objective, leave_out
        V = joint.shape[0]
        self.cfg = SimpleNamespace(vocab_size=V + 1, mask_id=V, causal=False, n_layers=1, time_conditioning="adaln")
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, xt, doc_ids=None, key_padding=None, logits_at=None, t=None, row_loss=None, **_):
        V = self.joint.shape[0]
        out = torch.full((*xt.shape, V + 1), float("-inf"), dtype=torch.float64)
        for tv in t.unique().tolist():  # rows that share a noise level share the evidence table
            rows = t == tv
            q = self.obj.marginal_table(tv)[:V, :].T  # q[z, v] = q_t(z | x = v), z over V + 1 ids
            out[rows, :, :V] = soft_posterior(self.joint, q[xt[rows]], self.leave_out).clamp_min(1e-300).log()
        if logits_at is not None:
            out = out[logits_at]
        elif row_loss is not None:
            out = out.reshape(-1, V + 1)
        return row_loss(out, slice(0, out.shape[0])) if row_loss is not None else out
