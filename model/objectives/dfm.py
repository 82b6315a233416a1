"""Discrete flow matching, the mixture path (Gat et al., NeurIPS 2024; facebookresearch/flow_matching).

TIME RUNS THE OTHER WAY in DFM: s = 0 is the source (noise), s = 1 the data. Inside this file only,
s = 1 - t is DFM's time; everything outside (configs, the network's noise-level input, eval, the samplers'
grids) keeps this project's t (t = 1 is noise). kappa(s) = s^n (diffusion.kappa_exponent: the polynomial
scheduler), kappa' = n s^{n-1}.

Path, per token: x_s = x_1 (the data) with probability kappa(s), else a draw from the source
(diffusion.source): "mask" (every token the mask id) or "uniform" (a uniformly random real token).
Network: time-conditioned, p_{1|s}(. | x_s) = softmax of its logits. Mask source: the head covers the mask
as in flow_matching's text example (no SUBS); uniform source: the mask logit is -inf.
diffusion.dfm_carry_over (mask source only, off by default): MDLM's SUBS parameterisation instead, p_{1|s} =
one-hot(x_s) where x_s is not the mask and the mask logit -inf elsewhere. The library's head must learn to
copy every unmasked token of a V-way input, and until it does the generalised KL charges w (1 - p(x_s | x_s))
at each of them (about 5 nats per token on Shakespeare, V = 4096, after 143 steps: docs/objectives.md). With
carry-over those terms are exactly 0 and the loss is the w-weighted CE over the real tokens at the masked
positions: for kappa = 1 - t and the same draws, mdm's loss with SUBS (mdm trains with the mask logit in its
softmax and applies SUBS at evaluation). The head is computed at the masked positions only.

Losses (diffusion.dfm_loss), per token, every position, averaged over the B L tokens:
  "generalized_kl" (flow_matching.loss.MixturePathGeneralizedKL, ELBO-consistent): with w = kappa' / (1 - kappa),
      l = -w [ p(x_s | x_s) - [x_s = x_1] + [x_s != x_1] log p(x_1 | x_s) ]
  "cross_entropy": CE(logits, x_1): a training heuristic, NOT a bound (eval.ppl always reports the ELBO).
With SUBS and kappa = alpha, s = 1 - t, the generalised KL is exactly the masked-diffusion loss
(tests/test_obj_dfm.py). Training draws t = (1 - eps) u + eps, i.e. s in [0, 1 - eps] (the library's
time_epsilon = 1e-3).

Bound (eval.ppl), method "elbo": the expectation of flow_matching's examples/text/logic/evaluate.py::
estimate_likelihood (the library's only likelihood for discrete paths; its discrete solver has none). The
LINEAR path k = kappa whatever the training scheduler (the generalised-KL ELBO does not depend on how time is
parametrised); per sequence the K levels (1 - eps) ((u + j/K) mod 1), j < K, with one uniform shift u (the
library's grid of n_discretization points; eps is its `epsilon`, here the run's diffusion.eps or eval --eps,
1e-3 by default); per level a fresh x ~ p_k; the network at s = kappa^{-1}(k) = k^(1/n); l above with
kappa = k, kappa' = 1, summed over the scored positions; the mean over the K samples. Its expectation is
E_{k ~ U[0, 1 - eps)} E_{x_k}[sum_i l_i] = (integral over [0, 1 - eps) of the ELBO integrand) / (1 - eps),
the library's ELBO convention (a nats-per-token NELBO; ppl = exp). The library carries the shifted grid from
one batch to the next (shifts compound); the expectation is the same. No prior term: x_0 is the source
exactly. With the oracle posterior the ELBO over [0, 1] is -log p(x) for the mask source, but not for the
uniform source (the mixture of one-jump conditional paths is not Markov; tests/test_obj_dfm.py measures the
gap).

Sampler: the library's MixtureDiscreteEulerSolver: `steps` steps on s = 0 .. 1 - 1e-3; each step draws
X_1 ~ p_{1|s} and, where X_1 differs from X_s, jumps to it with probability 1 - exp(-h kappa' / (1 - kappa));
the last step sets X_s = X_1. The mask logit is -inf when X_1 is drawn (the mask source's head could emit it).
"""
from __future__ import annotations

import itertools
import math

import torch

from .base import EvalDraw, Noised, Objective, StepNoise, draw_step_noise, noise_level, register
from .common import (RealVocab, add_token_draw, categorical, choice, corrupt, count_forward, enumeration_states,
                     need_mask, noised_draws, pattern_probs, position_uniforms, real_columns,
                     real_token_probs, row_sums)
from .mdm import eval_generator

_TAG_TOK, _TAG_EVAL_K, _TAG_EVAL_POS, _TAG_EVAL_TOK = 51, 52, 53, 54
EVAL_EPS = 1e-3  # the library's time_epsilon (solver grid, training) and estimate_likelihood's default epsilon


def generalized_kl(logits: torch.Tensor, xs: torch.Tensor, x1: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(n,) -w [p(x_s) - [x_s = x_1] + [x_s != x_1] log p(x_1)] for logits (n, V) (the caller masks columns)."""
    logp = torch.log_softmax(logits, -1)
    p_xs = logp.gather(-1, xs[:, None])[:, 0].exp()
    lp_x1 = logp.gather(-1, x1[:, None])[:, 0]
    same = xs == x1
    inner = p_xs - same.to(logp.dtype) + torch.where(same, torch.zeros_like(lp_x1), lp_x1)
    return -w.to(logp.dtype) * inner


@register
class DiscreteFlowMatching(RealVocab, Objective):
    """dfm: the mixture path with a mask or uniform source, the polynomial scheduler, CE or generalised KL."""
    name = "dfm"
    title = "discrete flow matching (mixture path)"
    time_conditioning = True
    logits_at = "all"
    eval_methods = ("elbo",)
    summary = "mixture path, mask|uniform source, kappa = s^n; generalised KL (ELBO) or CE (not a bound)"
    row_loss_bytes = 16  # launch.plan: bytes per logit of a row-loss chunk (benchmarks/row_loss_bytes.py)

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        self.source = choice(dcfg, "source", "mask", ("mask", "uniform"))
        if self.source == "mask":
            need_mask("diffusion.source=mask", mask_id, vocab_size)
        self.n = float(getattr(dcfg, "kappa_exponent", 1.0))
        if not self.n > 0:
            raise ValueError(f"diffusion.kappa_exponent={self.n} must be > 0")
        self.loss_kind = choice(dcfg, "dfm_loss", "generalized_kl", ("generalized_kl", "cross_entropy"))
        self.eps = dcfg.eps
        self.head_has_mask = self.source == "mask"
        self.carry_over = bool(getattr(dcfg, "dfm_carry_over", False))
        if self.carry_over and self.source != "mask":
            raise ValueError("diffusion.dfm_carry_over=true needs diffusion.source=mask: with the uniform source a "
                             "token of x_s may be noise, so it cannot be copied; set dfm_carry_over=false")
        if self.carry_over:
            self.logits_at = "masked"

    # DFM's time s = 1 - t, and its scheduler
    def kappa(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return s ** self.n, self.n * s ** (self.n - 1.0)

    def head(self, logits: torch.Tensor) -> torch.Tensor:
        """The uniform source never uses the mask id: its logit is -inf (the mask source keeps it, unless
        carry-over, where the mask is never a clean token either)."""
        if ((self.source == "uniform" or self.carry_over) and self.mask_id is not None
                and 0 <= self.mask_id < logits.shape[-1]):
            logits = logits.masked_fill(real_columns(logits.shape[-1], self.mask_id, logits.dtype,
                                                     logits.device) == 0, float("-inf"))
        return logits

    # -- noising and the loss
    def draw(self, seed, step, global_batch, seq_len, *, stratified=True, random_length_prob=0.0) -> StepNoise:
        noise = draw_step_noise(seed, step, global_batch, seq_len, stratified=stratified,
                                random_length_prob=random_length_prob)
        return add_token_draw(noise, seed, step, _TAG_TOK) if self.source == "uniform" else noise

    def sample_path(self, x1, kappa, pos_u, tok_u=None):
        """x_s: the source where pos_u < 1 - kappa (per row; masked diffusion's event at alpha = kappa, so the
        same draws give the same masks), else x_1."""
        hit = pos_u.double() < (1.0 - kappa.double())[:, None]
        return corrupt(x1, hit, absorb=self.source == "mask", mask_id=self.mask_id, tok_u=tok_u,
                       n_real=self.n_real if self.source == "uniform" else 0)

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        t = noise_level(noise.u, self.eps)
        kap, _ = self.kappa(1.0 - t.double())
        xs = self.sample_path(x0, kap, noise.mask_uniform, noise.extra.get("tok_u"))
        return Noised(x0=x0, xt=xs, t=t, at=None, doc_ids=doc_ids)

    def token_loss(self, logits, xs, x1, kap, dkap, kind: str):
        logits = self.head(logits)
        if kind == "cross_entropy":
            per = torch.nn.functional.cross_entropy(logits, x1, reduction="none")
        else:
            per = generalized_kl(logits, xs, x1, dkap / (1.0 - kap))
        if self.carry_over:  # p(. | x_s) is one-hot(x_s) at an unmasked x_s (= x_1): both losses are 0 there
            per = per.masked_fill(xs != self.mask_id, 0.0)
        return per

    def per_token(self, model, x1, xs, t, kap, dkap, kind, sel=None, **kw):
        """Losses at the positions `sel` (None: all); with carry-over only the masked ones among them are
        computed (the rest are 0), so the result then covers `sel & (xs == mask)`: see `scored_at`."""
        L = xs.shape[1]
        sel = self.scored_at(xs, sel)
        k_rows, d_rows = kap.repeat_interleave(L), dkap.repeat_interleave(L)
        z, x = xs.reshape(-1), x1.reshape(-1)
        if sel is not None:
            flat = sel.reshape(-1)
            k_rows, d_rows, z, x = k_rows[flat], d_rows[flat], z[flat], x[flat]

        def rows(logits, sl):
            return self.token_loss(logits, z[sl], x[sl], k_rows[sl].to(logits.dtype), d_rows[sl].to(logits.dtype),
                                   kind)
        return model(xs, logits_at=sel, t=t.float(), row_loss=rows, **kw)

    def logit_fraction(self, seq_len: int, points: int = 10_000) -> float:
        """Every position, or under carry-over the expected masked fraction E_t[1 - kappa(1 - t)]."""
        if not self.carry_over:
            return 1.0
        t = noise_level((torch.arange(points, dtype=torch.float64) + 0.5) / points, self.eps)
        return float((1.0 - self.kappa(1.0 - t)[0]).mean())

    def scored_at(self, xs, sel=None):
        """The positions whose loss the network must compute: `sel` (None: every position), narrowed to the
        masked ones under carry-over."""
        if not self.carry_over:
            return sel
        masked = xs == self.mask_id
        return masked if sel is None else sel & masked

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        B, L = batch.x0.shape
        kap, dkap = self.kappa(1.0 - batch.t.double())
        per = self.per_token(model, batch.x0, batch.xt, batch.t, kap, dkap, self.loss_kind, doc_ids=batch.doc_ids,
                             ce_chunk=ce_chunk)
        return per.sum() / (B * L), {"noised_frac": (batch.xt != batch.x0).float().mean().detach()}

    # -- the bound (estimate_likelihood)
    def eval_draw(self, method, *, seed, seq, sample, samples, maskable, eps, group) -> EvalDraw:
        if method != "elbo":
            raise ValueError(f"unknown estimator {method!r} for dfm; choices: elbo")
        if int(maskable.sum()) == 0:
            raise ValueError("a sequence with no scored positions has nothing to estimate")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps={eps} (eval --eps, else diffusion.eps) must be in [0, 1) for dfm: the bound "
                             "integrates k = kappa over [0, 1 - eps)")
        shift = torch.rand(1, generator=eval_generator(seed, _TAG_EVAL_K, seq), dtype=torch.float64).item()
        k = (1.0 - eps) * ((shift + sample / samples) % 1.0)
        pos, tok = position_uniforms(seed, maskable.numel(), seq, sample, _TAG_EVAL_POS, _TAG_EVAL_TOK)
        return EvalDraw({"k": k, "pos": pos, "tok": tok, "scored": maskable.clone()}, 1.0)

    def eval_sums(self, model, x0, draws, *, keep, subs=True):
        k, xs, scored = noised_draws(x0, draws, "k", torch.float64, self.sample_path)
        t = 1.0 - k ** (1.0 / self.n)  # the network's level: s = kappa^{-1}(k), t = 1 - s
        return row_sums(draws, self.scored_at(xs, scored), keep,
                        lambda kp: self.per_token(model, x0, xs, t, k, torch.ones_like(k), "generalized_kl",
                                                  sel=scored, key_padding=kp))

    # -- brute force (tests)
    def states(self) -> list[int]:
        return enumeration_states(self.vocab_size, self.mask_id, self.source == "mask")

    def exact_nelbo(self, cond_logprobs, x0, nodes: int = 200, eps: float = EVAL_EPS) -> float:
        """integral over k in [0, 1 - eps) of E_{x_k}[sum_i l_i] dk / (1 - eps) (the estimator's expectation),
        Gauss-Legendre in k, every x_k enumerated. cond_logprobs(Z (K, L), t) -> (K, L, V) logits."""
        import numpy as np
        L = x0.numel()
        x0 = x0.long()
        Z = torch.tensor(list(itertools.product(self.states(), repeat=L)), dtype=torch.long)
        xs_, ws = np.polynomial.legendre.leggauss(nodes)
        hi = 1.0 - eps
        total = 0.0
        for xi, wi in zip(xs_, ws):
            k = 0.5 * hi * (xi + 1.0)
            if self.source == "mask":
                qz = pattern_probs(Z, x0, self.mask_id, 1 - k, k, 0.0)
            else:
                N = self.n_real
                qz = pattern_probs(Z, x0, None, 0.0, k + (1 - k) / N, (1 - k) / N)
            live = qz > 0
            Zl = Z[live]
            lg = cond_logprobs(Zl, 1.0 - k ** (1.0 / self.n)).double()
            V = lg.shape[-1]
            per = self.token_loss(lg.reshape(-1, V), Zl.reshape(-1), x0.expand_as(Zl).reshape(-1),
                                  torch.full((Zl.numel(),), k, dtype=torch.float64),
                                  torch.ones(Zl.numel(), dtype=torch.float64), "generalized_kl")
            total += 0.5 * wi * float((qz[live] * per.view(Zl.shape).sum(1)).sum())
        return total

    # -- generation
    @torch.no_grad()
    def generate(self, model, ids, real, *, gen_length: int, steps: int, noise, temperature: float = 0.0,
                 callback=None, stats=None, **_):
        """The Euler jump solver (module docstring): `steps` network calls on s = 0 .. 1 - 1e-3."""
        stats = stats if stats is not None else {}
        B, P = ids.shape
        G, dev = gen_length, ids.device
        x, kp = self.start_canvas(ids, real, G, noise, absorb=self.source == "mask")
        allrows = torch.ones(B, dtype=torch.bool, device=dev)
        grid = torch.linspace(0.0, 1.0 - EVAL_EPS, steps + 1, dtype=torch.float64).tolist()
        for i in range(steps):
            s, h = grid[i], grid[i + 1] - grid[i]
            count_forward(stats, B, x.shape[1])
            p1 = real_token_probs(model, x, kp, 1.0 - s, self.mask_id, temperature)[:, P:]
            V = p1.shape[-1]
            x1 = categorical(p1.reshape(-1, V), noise.rows(allrows, G).reshape(-1)).view(B, G)
            u = noise.rows(allrows, G)
            if i == steps - 1:
                x[:, P:] = torch.where(x[:, P:] == self.mask_id, x1, x[:, P:]) if self.carry_over else x1
            else:
                kap, dkap = self.kappa(torch.tensor(s, dtype=torch.float64))
                jump = 1.0 - math.exp(-h * float(dkap) / (1.0 - float(kap)))
                cur = x[:, P:]
                if self.carry_over:  # the prediction at an unmasked token is that token: no jump
                    x1 = torch.where(cur == self.mask_id, x1, cur)
                x[:, P:] = torch.where((x1 != cur) & (u < jump), x1, cur)
            if callback is not None:
                callback(i + 1, x)
        return x
