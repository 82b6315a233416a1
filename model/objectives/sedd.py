"""SEDD: score entropy discrete diffusion (Lou, Meng, Ermon, ICML 2024; louaaron/Score-Entropy-Discrete-Diffusion).

Forward process: a CTMC with rate sigma'(t) Q per token, q_t(z | x) = [exp(sigma(t) Q)]_{z, x}, over N real
tokens (the vocabulary less the mask id, which is excluded BY INDEX wherever it sits: LLaDA's is 126336).
  graph "absorb":  Q = e_mask 1^T - I: masked with probability 1 - e^{-sigma}, else unchanged.
  graph "uniform": Q = (1/N) 1 1^T - I: q_t(z | x) = e^{-sigma} [z = x] + (1 - e^{-sigma}) / N.
Noise (diffusion.sedd_noise): "loglinear" sigma = -log(1 - (1 - e) t), so 1 - e^{-sigma} = (1 - e) t (MDLM's
log-linear; e = diffusion.sedd_noise_eps, 1e-3); "geometric" sigma = s_min^{1-t} s_max^t (1e-4, 20).
t = (1 - eps) u + eps with eps = diffusion.eps (SEDD's 1e-3), as every objective of this project.

Network: the time-conditioned (adaLN) transformer's output f over the vocabulary is the log-score
s_y = log(p_t(z^{i <- y}) / p_t(z)) of replacing token i by y. With diffusion.scale_by_sigma (absorb only, SEDD's
default): s = f - log(e^sigma - 1) - log N. s at the current token is 0 (the ratio of a state to itself) and the
mask column is never a target. The network is conditioned on the noise level t (SEDD conditions on sigma(t),
a fixed monotone function of it).

Loss: the denoising score entropy as SEDD's `graph.score_entropy` computes it, per token, times sigma'(t):
  absorb, at masked tokens only, r = 1 / (e^sigma - 1):
      SE = sum_{y real} e^{s_y} - r s_x + r (log r - 1)
  uniform, at every token, rho = (e^sigma - 1) / (e^sigma - 1 + N) (closed form of (1/N) sum_{y != z}
      [e^{s_y} - r_y s_y + r_y (log r_y - 1)] with r_y = q_t(y | x) / q_t(z | x)):
      pos = mean(e^s) - e^{s_z} / N,   base = mean(s) - s_z / N     (means over the N real tokens)
      z = x:  SE = pos - rho base + ((N - 1) / N) rho (log rho - 1)
      z != x: SE = pos - (s_x / (e^sigma - 1) + base) + ((-log rho - 1) / rho - (N - 2)) / N
The reference loss is nats PER SEQUENCE (sum over tokens); here it is per token (sum / (B L)), as for every
other objective. With exp(s) = r p_theta (absorb) it is exactly MDLM's sigma'/(e^sigma - 1) CE
(tests/test_obj_sedd.py).

The bound (eval.ppl): the NELBO over t in [eps, 1] = integral_eps^1 E_z[sum_i sigma' SE_i] dt (estimated with
weight 1 - eps, the interval's length) plus the prior term, per token:
  uniform: KL(q_1(. | x) || Uniform(N)) (`prior_nats`, from uniform.prior_kl), added to every bound;
  absorb:  q_1 keeps mass e^{-sigma(1)} (log-linear: sedd_noise_eps) on x, so KL(q_1 || all-mask) is formally
           infinite; it is DROPPED, as every reference does (MDLM/BD3-LM/DUO's SEDD evaluator), and
           the bound is stated as "NELBO over t in [eps, 1], prior dropped" (`prior_note`).
The [0, eps) part of the integral is left out, as in MDLM.

Samplers (`generate`, diffusion.sedd_predictor): "analytic" (Tweedie tau-leaping, SEDD's AnalyticPredictor) or
"euler" (EulerPredictor), on t = linspace(1, t_min, steps), then SEDD's Denoiser (the analytic step to
sigma = 0): `steps` forwards in all. For absorb both are factorised as "leave the mask with probability P,
then take y with probability proportional to score_y", which is the exact categorical of the reference (its
Gumbel race clips a negative stay probability: P is clipped to [0, 1] here), and which draws exactly like
model.sample's MDLM ancestral sampler: with t_min = 1/steps and exp(s) = r p_theta the analytic sampler
equals it draw for draw. Infilling (SEDD's run_sample_cond): `infill` fixes tokens of the generated span, and
they are projected back after every step.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch

from .base import EvalDraw, Noised, Objective, StepNoise, draw_step_noise, noise_level, register
from .common import (RealVocab, add_token_draw, categorical, choice, corrupt, count_forward, enumeration_states,
                     graph_setting, noised_draws, pattern_probs, position_uniforms, real_columns, row_sums)
from .mdm import autocast_for
from .uniform import eval_time, prior_kl

_TAG_TOK, _TAG_EVAL_POS, _TAG_EVAL_TOK = 31, 32, 33


# ------------------------------------------------------------------------------------------------ noise
class LogLinearNoise:
    """sigma(t) = -log(1 - (1 - e) t): 1 - e^{-sigma} = (1 - e) t."""

    def __init__(self, eps: float = 1e-3):
        self.eps = float(eps)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = (1.0 - self.eps) * t
        return -torch.log1p(-a), (1.0 - self.eps) / (1.0 - a)


class GeometricNoise:
    """sigma(t) = s_min^{1-t} s_max^t, sigma' = sigma log(s_max / s_min)."""

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.lo, self.hi = float(sigma_min), float(sigma_max)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.lo ** (1.0 - t) * self.hi ** t
        return sigma, sigma * math.log(self.hi / self.lo)


def expm1_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return torch.expm1(sigma)  # accurate for small and large sigma alike (SEDD switches expm1 / exp - 1 at 0.5)


# ---------------------------------------------------------------------------------------- the score entropy
def log_score(f: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, *, graph: str, n_real: int,
              scale_by_sigma: bool) -> torch.Tensor:
    """(n, V) log-scores from the network output f (n, V) at current tokens z (n,) and sigma (n,): SEDD's
    `scale_by_sigma` shift (absorb), then s_z = 0."""
    s = f
    if scale_by_sigma and graph == "absorb":
        s = s - (torch.log(expm1_sigma(sigma.to(f.dtype))) + math.log(n_real))[:, None]
    return s.scatter(-1, z[:, None], torch.zeros_like(s[:, :1]))


def score_entropy_absorb(s: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(n,) SE at masked positions: sum_{y real} e^{s_y} - r s_x + r (log r - 1), r = 1 / (e^sigma - 1); the mask
    column is excluded by its index."""
    keep = real_columns(s.shape[-1], mask_id, s.dtype, s.device)
    r = 1.0 / expm1_sigma(sigma.to(s.dtype))
    pos = (s.exp() * keep).sum(-1)
    return pos - r * s.gather(-1, x[:, None])[:, 0] + r * (torch.log(r) - 1.0)


def score_entropy_uniform(s: torch.Tensor, z: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                          mask_id: Optional[int]) -> torch.Tensor:
    """(n,) SEDD's closed form of (1/N) sum_{y != z} [e^{s_y} - r_y s_y + r_y (log r_y - 1)] (module docstring)."""
    keep = real_columns(s.shape[-1], mask_id, s.dtype, s.device)
    N = float(keep.sum())
    em1 = expm1_sigma(sigma.to(s.dtype))
    rho = em1 / (em1 + N)
    s_z = s.gather(-1, z[:, None])[:, 0]
    s_x = s.gather(-1, x[:, None])[:, 0]
    base = (s * keep).sum(-1) / N - s_z / N
    same = z == x
    neg = torch.where(same, rho * base, s_x / em1 + base)
    const = torch.where(same, (N - 1) / N * rho * (torch.log(rho) - 1.0),
                        ((-torch.log(rho) - 1.0) / rho - (N - 2)) / N)
    pos = (s.exp() * keep).sum(-1) / N - s_z.exp() / N
    return pos - neg + const


@register
class SEDD(RealVocab, Objective):
    """sedd: score entropy over the absorbing or uniform graph; log-linear or geometric noise."""
    name = "sedd"
    title = "score entropy discrete diffusion (SEDD)"
    time_conditioning = True
    eval_methods = ("t", "mdlm")
    summary = "absorb|uniform CTMC; denoising score entropy x sigma'; Euler / analytic samplers"
    row_loss_bytes = 20  # launch.plan: bytes per logit of a row-loss chunk (benchmarks/row_loss_bytes.py)

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        self.graph = graph_setting(dcfg, mask_id, vocab_size)
        kind = choice(dcfg, "sedd_noise", "loglinear", ("loglinear", "geometric"))
        if kind == "loglinear":
            e = float(getattr(dcfg, "sedd_noise_eps", 1e-3))
            if not 0.0 <= e < 1.0:
                raise ValueError(f"diffusion.sedd_noise_eps={e} must be in [0, 1)")
            self.noise_fn = LogLinearNoise(e)
        else:
            lo, hi = float(dcfg.sigma_min), float(dcfg.sigma_max)
            if not 0.0 < lo < hi:
                raise ValueError(f"diffusion.sigma_min={lo}, sigma_max={hi}: need 0 < sigma_min < sigma_max")
            self.noise_fn = GeometricNoise(lo, hi)
        self.scale_by_sigma = bool(getattr(dcfg, "scale_by_sigma", True)) and self.graph == "absorb"
        self.predictor = choice(dcfg, "sedd_predictor", "analytic", ("analytic", "euler"))
        self.eps = dcfg.eps
        self.head_has_mask = self.graph == "absorb"
        self.logits_at = "masked" if self.graph == "absorb" else "all"

    # -- noise
    def sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.noise_fn(t)

    def move_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - e^{-sigma(t)}: the chance a token was moved (masked, or redrawn uniformly)."""
        return -torch.expm1(-self.sigma(t)[0])

    def prior_nats(self) -> float:
        """Per scored token: KL(q_1(. | x) || Uniform) for uniform; 0 for absorb (dropped: see prior_note)."""
        if self.graph == "absorb":
            return 0.0
        a1 = math.exp(-float(self.sigma(torch.tensor(1.0, dtype=torch.float64))[0]))
        return prior_kl(a1, self.n_real)

    @property
    def prior_note(self) -> str:
        if self.graph == "uniform":
            return f"prior KL(q_1 || uniform) = {self.prior_nats():.3g} nats/token, included"
        a1 = math.exp(-float(self.sigma(torch.tensor(1.0, dtype=torch.float64))[0]))
        return (f"prior dropped (q_1 keeps {a1:.3g} of its mass on x: KL to the all-mask prior is infinite; "
                "as every SEDD evaluator)")

    # -- noising and the loss
    def draw(self, seed, step, global_batch, seq_len, *, stratified=True, random_length_prob=0.0) -> StepNoise:
        noise = draw_step_noise(seed, step, global_batch, seq_len, stratified=stratified,
                                random_length_prob=random_length_prob)
        return add_token_draw(noise, seed, step, _TAG_TOK) if self.graph == "uniform" else noise

    def perturb(self, x0, t, pos_u, tok_u=None) -> torch.Tensor:
        hit = pos_u < self.move_prob(t).to(pos_u.dtype)[:, None]
        return corrupt(x0, hit, absorb=self.graph == "absorb", mask_id=self.mask_id, tok_u=tok_u,
                       n_real=self.n_real if self.graph == "uniform" else 0)

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        t = noise_level(noise.u, self.eps)
        xt = self.perturb(x0, t, noise.mask_uniform, noise.extra.get("tok_u"))
        at = (xt == self.mask_id) if self.graph == "absorb" else None
        return Noised(x0=x0, xt=xt, t=t, at=at, doc_ids=doc_ids)

    def token_loss(self, f, z, x, t):
        """(n,) sigma'(t) SE per token, from raw outputs f (n, V) at tokens z with clean x and levels t (n,)."""
        sigma, dsigma = self.sigma(t.to(f.dtype))
        s = log_score(f, z, sigma, graph=self.graph, n_real=self.n_real, scale_by_sigma=self.scale_by_sigma)
        if self.graph == "absorb":
            se = score_entropy_absorb(s, x, sigma, self.mask_id)
        else:
            se = score_entropy_uniform(s, z, x, sigma, self.mask_id)
        return dsigma * se

    def selected(self, xt, scored: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Where the score entropy is non-zero: masked tokens (absorb) or every token (uniform)."""
        sel = (xt == self.mask_id) if self.graph == "absorb" else torch.ones_like(xt, dtype=torch.bool)
        return sel if scored is None else sel & scored

    def per_token(self, model, x0, xt, t, sel, **kw) -> torch.Tensor:
        """(n,) sigma' SE at the selected positions (row-major), through the model's chunked row loss."""
        L = xt.shape[1]
        rows_t = t.float().repeat_interleave(L).reshape(xt.shape)[sel]
        z, x = xt[sel], x0[sel]

        def rows(f, sl):
            return self.token_loss(f, z[sl], x[sl], rows_t[sl])
        return model(xt, logits_at=sel, t=t.float(), row_loss=rows, **kw)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        B, L = batch.x0.shape
        sel = self.selected(batch.xt)
        per = self.per_token(model, batch.x0, batch.xt, batch.t, sel, doc_ids=batch.doc_ids, ce_chunk=ce_chunk)
        return per.sum() / (B * L), {"noised_frac": (batch.xt != batch.x0).float().mean().detach(),
                                     "prior": torch.tensor(self.prior_nats())}

    def logit_fraction(self, seq_len: int, points: int = 10_000) -> float:
        if self.graph == "uniform":
            return 1.0
        u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
        return float(self.move_prob(noise_level(u, self.eps)).mean())

    # -- the bound
    def eval_draw(self, method, *, seed, seq, sample, samples, maskable, eps, group) -> EvalDraw:
        if int(maskable.sum()) == 0:
            raise ValueError("a sequence with no scored positions has nothing to estimate")
        u = eval_time(method, seed=seed, seq=seq, sample=sample, samples=samples, group=group)
        pos, tok = position_uniforms(seed, maskable.numel(), seq, sample, _TAG_EVAL_POS, _TAG_EVAL_TOK)
        return EvalDraw({"t": (1.0 - eps) * u + eps, "pos": pos, "tok": tok, "scored": maskable.clone()}, 1.0 - eps)

    def eval_sums(self, model, x0, draws, *, keep, subs=True):
        t, xt, scored = noised_draws(x0, draws, "t", torch.float64, self.perturb)
        sel = self.selected(xt, scored)
        return row_sums(draws, sel, keep, lambda kp: self.per_token(model, x0, xt, t, sel, key_padding=kp),
                        prior=self.prior_nats(), scored=scored)

    # -- brute force (tests)
    def states(self) -> list[int]:
        return enumeration_states(self.vocab_size, self.mask_id, self.graph == "absorb")

    def q_table(self, x0: torch.Tensor, Z: torch.Tensor, t: float) -> torch.Tensor:
        """(K,) float64 q_t(Z_k | x0) for noised sequences Z (K, L)."""
        m = float(self.move_prob(torch.tensor(t, dtype=torch.float64)))
        if self.graph == "absorb":
            vals = (m, 1.0 - m, 0.0)
        else:
            vals = (m / self.n_real, 1.0 - m + m / self.n_real, m / self.n_real)
        return pattern_probs(Z, x0, self.mask_id, *vals)

    def exact_nelbo(self, cond_logprobs, x0, nodes: int = 400) -> float:
        """integral_eps^1 E_z[sum_i sigma' SE_i] dt + L prior, enumerating every noised z and Gauss-Legendre in
        log t over [eps, 1]. cond_logprobs(Z (K, L), t) -> (K, L, V) float64 RAW network outputs f (for SEDD
        these are log-scores before scale_by_sigma, not log-probabilities)."""
        L = x0.numel()
        x0 = x0.long()
        xs, ws = np.polynomial.legendre.leggauss(nodes)
        lo, hi = math.log(self.eps), 0.0
        Z = torch.tensor(list(itertools.product(self.states(), repeat=L)), dtype=torch.long)
        total = 0.0
        for xi, wi in zip(xs, ws):
            t = math.exp(0.5 * (hi - lo) * xi + 0.5 * (hi + lo))
            qz = self.q_table(x0, Z, t)
            live = qz > 0
            Zl = Z[live]
            f = cond_logprobs(Zl, t).double()
            sel = self.selected(Zl)
            x = x0.expand_as(Zl)
            tt = torch.full((int(sel.sum()),), t, dtype=torch.float64)
            per = torch.zeros(Zl.shape, dtype=torch.float64)
            per[sel] = self.token_loss(f[sel], Zl[sel], x[sel], tt)
            total += 0.5 * (hi - lo) * wi * t * float((qz[live] * per.sum(1)).sum())
        return total + L * self.prior_nats()

    # -- generation
    def scores(self, model, x, key_padding, t: float) -> torch.Tensor:
        """(B, W, V) float64 log-scores s at level t (the mask column and the current token hold 0)."""
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        with autocast_for(x.device):
            f = model(x, key_padding=key_padding, t=tt)
        f = f.double()
        sigma = self.sigma(torch.tensor(float(t), dtype=torch.float64))[0].expand(x.numel()).to(x.device)
        V = f.shape[-1]
        return log_score(f.reshape(-1, V), x.reshape(-1), sigma, graph=self.graph, n_real=self.n_real,
                         scale_by_sigma=self.scale_by_sigma).view(f.shape)

    def uniform_step_probs(self, s: torch.Tensor, z: torch.Tensor, t: float, s_time: float,
                           predictor: str) -> torch.Tensor:
        """(n, V) float64 unnormalised next-state probabilities of the uniform graph (SEDD's predictors; the
        mask column is 0): analytic = staggered score x exp(dsigma Q) row; euler = onehot + dt sigma' Q score."""
        keep = real_columns(s.shape[-1], self.mask_id, s.dtype, s.device)
        N = self.n_real
        score = s.exp() * keep
        onehot = torch.zeros_like(score).scatter_(-1, z[:, None], 1.0)
        if predictor == "euler":
            _, dsig = self.sigma(torch.tensor(t, dtype=torch.float64))
            rate = score / N * (1.0 - onehot) * keep
            probs = rate * float(dsig) * (t - s_time)
            return probs + onehot * (1.0 - probs.sum(-1, keepdim=True))
        sig_t = float(self.sigma(torch.tensor(t, dtype=torch.float64))[0])
        sig_s = float(self.sigma(torch.tensor(s_time, dtype=torch.float64))[0]) if s_time > 0 else 0.0
        e = math.exp(-(sig_t - sig_s))
        stag = score / e + ((e - 1.0) / (N * e)) * score.sum(-1, keepdim=True)
        trans = keep * (1.0 - e) / N
        trans = trans + onehot * (1.0 - trans.sum(-1, keepdim=True))
        return (stag * trans).clamp_min(0.0) * keep

    @torch.no_grad()
    def generate(self, model, ids, real, *, gen_length: int, steps: int, noise, temperature: float = 0.0,
                 callback=None, stats=None, t_min: Optional[float] = None, predictor: Optional[str] = None,
                 infill: Optional[torch.Tensor] = None, **_):
        """Sample gen_length tokens after the prompt ids (B, P): steps - 1 predictor steps on
        t = linspace(1, t_min, steps) (t_min default 1e-5, SEDD's sampling eps), then the Denoiser from t_min to
        0. infill (B, gen_length) long: tokens to hold fixed (-1: free), projected after every step.
        temperature > 0 divides the log-scores before the token choice (absorb); 0 samples them as they are."""
        predictor = predictor or self.predictor
        if predictor not in ("analytic", "euler"):
            raise ValueError(f"predictor {predictor!r}; choices: analytic, euler")
        stats = stats if stats is not None else {}
        B, P = ids.shape
        G = gen_length
        dev = ids.device
        t_min = 1e-5 if t_min is None else float(t_min)
        fixed = None if infill is None else (infill.to(dev) >= 0)
        x, kp = self.start_canvas(ids, real, G, noise, absorb=self.graph == "absorb")
        if fixed is not None:
            x[:, P:] = torch.where(fixed, infill.to(dev), x[:, P:])
        times = torch.linspace(1.0, t_min, max(steps, 1), dtype=torch.float64).tolist() + [0.0]
        for i in range(len(times) - 1):
            t, s_time = times[i], times[i + 1]
            block = x[:, P:]
            if self.graph == "absorb":
                is_mask = block == self.mask_id
                remaining = is_mask.sum(1)
                if not bool(remaining.any()):
                    break
            count_forward(stats, B, x.shape[1])
            s = self.scores(model, x, kp, t)[:, P:]
            if self.graph == "absorb":
                x[:, P:] = self._absorb_step(s, block, is_mask, remaining, t, s_time, predictor, noise, temperature)
            else:
                V = s.shape[-1]
                pr = "analytic" if s_time <= 0 else predictor
                q = self.uniform_step_probs(s.reshape(-1, V), block.reshape(-1), t, s_time, pr)
                u = noise.rows(torch.ones(B, dtype=torch.bool, device=dev), G).reshape(-1)
                x[:, P:] = categorical(q, u).view(B, G)
            if fixed is not None:
                x[:, P:] = torch.where(fixed, infill.to(dev), x[:, P:])
            if callback is not None:
                callback(i + 1, x)
        return x

    def _absorb_step(self, s, block, is_mask, remaining, t, s_time, predictor, noise, temperature):
        """One absorb step, drawn as model.sample's MDLM sampler draws: the token by a Gumbel argmax over the
        log-scores at masked positions (noise.masked), then "leave the mask" with probability P (noise.rows)."""
        from model.decoding import gumbel_argmax
        keep = real_columns(s.shape[-1], self.mask_id, s.dtype, s.device)
        ls = s[is_mask].masked_fill(keep == 0, float("-inf"))  # (n, V) log-scores over real tokens
        u = noise.masked(is_mask, ls.shape[-1]) if temperature > 0 else None
        picked = gumbel_argmax(ls, temperature if temperature > 0 else 1.0, u=u) if temperature > 0 \
            else ls.argmax(-1)
        total = ls.exp().sum(-1)  # sum_y score_y
        if s_time <= 0:
            p = torch.ones_like(total)  # the Denoiser: jump to sigma = 0, the mask entry dropped
        elif predictor == "analytic":
            sig_t = self.sigma(torch.tensor(t, dtype=torch.float64))[0]
            sig_s = self.sigma(torch.tensor(s_time, dtype=torch.float64))[0]
            p = (torch.expm1(sig_t - sig_s).item() * total).clamp(0.0, 1.0)
        else:
            _, dsig = self.sigma(torch.tensor(t, dtype=torch.float64))
            p = ((t - s_time) * float(dsig) * total).clamp(0.0, 1.0)
        p_pos = torch.zeros(is_mask.shape, dtype=torch.float64, device=s.device)
        p_pos[is_mask] = p
        pred = block.clone()
        pred[is_mask] = picked
        take = is_mask & (noise.rows(remaining > 0, is_mask.shape[1]) < p_pos)
        return torch.where(take, pred, block)

    def reverse_step(self, p_x0, z_t, t, s):
        """(N, V) float64 the analytic step given a clean-token distribution p_x0 (log-score
        s = log p_x0 - log(e^sigma - 1) at masked positions: the exact absorb score of p_x0)."""
        if self.graph != "absorb":
            raise NotImplementedError("the uniform graph's reverse step needs scores: use generate")
        sig_t = self.sigma(torch.tensor(t, dtype=torch.float64))[0]
        sig_s = self.sigma(torch.tensor(s, dtype=torch.float64))[0] if s > 0 else torch.tensor(0.0)
        p = float(torch.expm1(sig_t - sig_s) / torch.expm1(sig_t))
        out = p_x0.double() * p
        out[:, self.mask_id] = 1.0 - p
        clean = z_t != self.mask_id
        out[clean] = torch.nn.functional.one_hot(z_t[clean], out.shape[-1]).double()
        return out
