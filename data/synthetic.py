"""Built-in corpus: a random sparse Markov chain over pseudo-word symbols.

Its exact entropy is known in closed form, so a model's loss (an upper bound on the NLL) can be read against
the truth: for a sequence of length L started from the stationary distribution pi,
    H(X_1..X_L) = H(pi) + (L - 1) * H_rate,   H_rate = sum_i pi_i * H(P_i.).
Symbols are token ids 0..S-1 (the tokenizer is the identity), the mask token is S.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .source import DataBundle
from .tokenizer import SymbolTokenizer

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SPLIT_IDS = {"train": 0, "valid": 1}


class MarkovLanguage:
    def __init__(self, num_symbols: int, branching: int, concentration: float, seed: int):
        if num_symbols < 2 or not 1 <= branching <= num_symbols:
            raise ValueError(f"synthetic language needs num_symbols >= 2 and 1 <= branching <= num_symbols; "
                             f"got num_symbols={num_symbols}, branching={branching}")
        if concentration <= 0:
            raise ValueError(f"data.synthetic.concentration must be positive, got {concentration}")
        rng = np.random.default_rng(seed)
        S = num_symbols
        P = np.zeros((S, S))
        for i in range(S):
            # (i + 1) mod S is always a successor, so the chain is irreducible and pi is unique.
            others = rng.choice(np.setdiff1d(np.arange(S), [(i + 1) % S]), size=branching - 1, replace=False)
            succ = np.concatenate([[(i + 1) % S], others])
            P[i, succ] = rng.dirichlet(np.full(branching, concentration))
        P = np.maximum(P, 0)
        P /= P.sum(1, keepdims=True)
        self.P = P
        self.cdf = np.cumsum(P, axis=1)
        # Stationary distribution: left null vector of (P - I), normalized.
        A = np.vstack([P.T - np.eye(S), np.ones((1, S))])
        b = np.zeros(S + 1)
        b[-1] = 1.0
        self.pi = np.clip(np.linalg.lstsq(A, b, rcond=None)[0], 0, None)
        self.pi /= self.pi.sum()
        self.pi_cdf = np.cumsum(self.pi)
        self.num_symbols = S

    @staticmethod
    def _entropy(p: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)

    @property
    def entropy_rate(self) -> float:
        return float((self.pi * self._entropy(self.P)).sum())

    def entropy_per_token(self, length: int) -> float:
        """Exact entropy (nats per token) of a length-`length` sequence from the stationary start."""
        return float(self._entropy(self.pi) + (length - 1) * self.entropy_rate) / length

    def sample(self, uniforms: np.ndarray) -> np.ndarray:
        """Turn (B, L) uniforms into (B, L) sequences by inverse-CDF sampling."""
        B, L = uniforms.shape
        out = np.empty((B, L), dtype=np.int64)
        out[:, 0] = np.minimum(np.searchsorted(self.pi_cdf, uniforms[:, 0], side="right"), self.num_symbols - 1)
        for j in range(1, L):
            rows = self.cdf[out[:, j - 1]]
            out[:, j] = np.minimum((uniforms[:, j:j + 1] >= rows).sum(1), self.num_symbols - 1)
        return out

    def valid_transition_rate(self, seq: list[int]) -> float:
        """Fraction of adjacent pairs that the language allows (a quick sample-quality check)."""
        pairs = [(a, b) for a, b in zip(seq, seq[1:]) if a < self.num_symbols and b < self.num_symbols]
        if not pairs:
            return float("nan")
        return sum(self.P[a, b] > 0 for a, b in pairs) / len(pairs)

    def score(self, prompts: np.ndarray, gen: np.ndarray) -> dict:
        """Exact scores of generated continuations gen (N, G) after prompts (N, P) (P = 0: unconditional, the
        first token scored under pi): nll, the mean over samples of the per-token negative log-likelihood of
        those samples the language can produce (nll_se its standard error); finite, the fraction of such
        samples; valid, the fraction of transitions the language allows; unigram_entropy, the mean entropy of
        each sample's token histogram (repetition shows up low); bigram_tv, the total-variation distance
        between the empirical distribution of all generated adjacent pairs and the language's pi_a P_ab (errors
        and mode collapse both raise it; real samples sit at a floor that shrinks with the number of pairs).
        Real samples score nll ~ entropy_per_token(G) (entropy_rate after a prompt), valid 1."""
        N, G = gen.shape
        S = self.num_symbols
        seq = np.concatenate([prompts, gen], 1)
        P = prompts.shape[1]
        with np.errstate(divide="ignore"):
            logP = np.log(self.P)
            log_pi = np.log(self.pi)
        bad = (gen >= S).any(1)
        g = np.minimum(seq, S - 1)
        lp = np.empty((N, G))
        for j in range(G):
            col = P + j
            lp[:, j] = log_pi[g[:, col]] if col == 0 else logP[g[:, col - 1], g[:, col]]
        lp[bad] = -np.inf
        nll = -lp.mean(1)  # per sample, per token (inf when any transition is forbidden)
        finite = np.isfinite(nll)
        trans = lp[:, 1:] if P == 0 else lp  # the first unconditional token has no transition
        uni = []
        for row in gen:
            c = np.bincount(row, minlength=S + 1).astype(float)
            p = c[c > 0] / c.sum()
            uni.append(float(-(p * np.log(p)).sum()))
        fin = nll[finite]
        first = max(P, 1)  # pairs (x_{j-1}, x_j) ending at a generated position
        a, b = np.minimum(seq[:, first - 1:-1], S).ravel(), np.minimum(seq[:, first:], S).ravel()  # S: not a symbol
        emp = np.bincount(a * (S + 1) + b, minlength=(S + 1) ** 2).reshape(S + 1, S + 1) / max(1, a.size)
        true = np.zeros((S + 1, S + 1))
        true[:S, :S] = self.pi[:, None] * self.P
        return {"nll": float(fin.mean()) if finite.any() else float("inf"),
                "bigram_tv": float(0.5 * np.abs(emp - true).sum()) if a.size else float("nan"),
                "nll_se": float(fin.std(ddof=1) / math.sqrt(len(fin))) if finite.sum() > 1 else float("nan"),
                "finite": float(finite.mean()), "valid": float(np.isfinite(trans).mean()),
                "unigram_entropy": float(np.mean(uni))}

    def word(self, symbol: int) -> str:
        if symbol >= self.num_symbols:
            return "[MASK]" if symbol == self.num_symbols else f"<{symbol}>"
        c, v = divmod(symbol, len(_VOWELS))
        base = _CONSONANTS[c % len(_CONSONANTS)] + _VOWELS[v]
        return base + (str(c // len(_CONSONANTS)) if c >= len(_CONSONANTS) else "")


class SyntheticSource:
    """Endless stream: sequence i of a split is a pure function of (language, split, stream seed, i)."""
    num_samples: Optional[int] = None

    def __init__(self, lang: MarkovLanguage, seq_len: int, split: str, stream_seed: int):
        self.lang, self.seq_len = lang, seq_len
        self.key = [_SPLIT_IDS[split], stream_seed]

    def get(self, indices: list[int]):
        u = np.stack([np.random.default_rng([*self.key, int(i)]).random(self.seq_len) for i in indices])
        return torch.from_numpy(self.lang.sample(u)), None


def build_synthetic(cfg, seed: int) -> DataBundle:
    """cfg: DataConfig. The validation stream ignores the training seed so runs compare on one set."""
    s = cfg.synthetic
    lang = MarkovLanguage(s.num_symbols, s.branching, s.concentration, s.seed)
    tok = SymbolTokenizer(lang)
    H = lang.entropy_per_token(cfg.seq_len)
    return DataBundle(
        train=SyntheticSource(lang, cfg.seq_len, "train", seed),
        valid={"valid": SyntheticSource(lang, cfg.seq_len, "valid", 0)},
        vocab_size=s.num_symbols + 1, mask_id=s.num_symbols, eos_id=None,
        decode=tok.decode, encode=tok.encode,
        description=(f"synthetic Markov language: {s.num_symbols} symbols, {s.branching} successors each; "
                     f"true entropy {H:.4f} nats/token at length {cfg.seq_len} "
                     f"(rate {lang.entropy_rate:.4f}, ppl {math.exp(H):.3f})"),
        true_entropy=H, info={"language": lang, "tokenizer": tok},
    )
