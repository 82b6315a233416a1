"""Uniform-state diffusion (UDLM, Schiff et al. ICLR 2025; DUO, Sahoo et al. ICML 2025).

Forward process, per token: q_t(z | x) = alpha(t) [z = x] + (1 - alpha(t)) / N, with N the number of real
tokens (the vocabulary less the mask id): with probability 1 - alpha(t) a token is replaced by a uniformly
random real token (which may be x itself). alpha(t) is the configured schedule (model/objectives/schedules.py)
at t = (1 - eps) u + eps, the same t as masked diffusion; `linear` is alpha = 1 - t, DUO's `LogLinear` (the
alpha of the noise is the alpha of the loss: UDLM's loss hard-codes 1 - t while noising with (1 - eps) t,
an O(eps) inconsistency not copied here). alpha is floored at ALPHA_FLOOR (1e-6) so the loss stays finite at
t = 1; the prior term below is taken at the floored alpha(1), so the bound stays a bound.

Loss: DUO's closed form of UDLM's continuous-time NELBO integrand, per token, at EVERY position (noised or
not), with x_theta = softmax of the network's logits over the N real tokens:

    xbar_theta = N alpha x_theta + (1 - alpha),   xbar_z = (1 - alpha) + N alpha [x = z],   c = (1 - alpha) / (N alpha + 1 - alpha)
    term1 = N (1 / xbar_z - 1 / xbar_theta_z)
    term2 = -c (S - N log xbar_theta_z) + (N - 1) c log c                                     (z = x)
    term2 = -(S - N log xbar_theta_z) - N alpha / (1 - alpha) (log xbar_theta_x - log xbar_theta_z) - log(c) / c   (z != x)
    l = alpha' / (N alpha) (term1 - term2),        S = sum over real j of log xbar_theta_j

E_t E_z sum_positions l + prior is the NELBO (tests/test_obj_uniform.py checks it is tight for the exact
leave-one-out posterior). The prior term, KL(q_1(. | x) || Uniform(N)) per token, is zero for alpha(1) = 0
and is added to every bound (`prior_nats`), and logged in training (`prior`), never dropped silently.

The output head: the network keeps the project's vocabulary (the mask id included, so checkpoints, tokenizers
and the TP vocabulary split are unchanged) and the mask id's logit is set to -inf wherever logits are read,
which is exactly a head over the N real tokens.

The loss needs the full-vocabulary softmax at every position, so it runs through the model's chunked
all-position loss (`row_loss=`, `diffusion.row_chunk` rows of logits at a time, recomputed in backward): the
(B L, V) logits never exist whole. The closed form reads the logits only through three per-row statistics
(`mixture_log_stats`, whose gradient is written out), so a chunk holds two (n, V) buffers besides its logits
instead of the formula's autograd graph.

DUO's Gaussian-latent curriculum (`diffusion.curriculum_steps`, off by default) trains the first steps on soft
inputs from a Gaussian latent whose argmax is uniform-state noise (the duality; `duality_table`, computed
with scipy); see `curriculum_noise` and docs/objectives.md.
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
from typing import Optional

import numpy as np
import torch

from .base import EvalDraw, Noised, Objective, StepNoise, draw_step_noise, noise_level, register
from .common import (RealVocab, add_token_draw, categorical, choice, corrupt, count_forward, pad_draws,  # noqa: F401
                     position_uniforms, real_count, real_ids, real_token_probs, start_generation,
                     uniform_tokens)
from .mdm import autocast_for, eval_generator
from .schedules import Schedule, get_schedule

ALPHA_FLOOR = 1e-6
_TAG_TOK, _TAG_KIND, _TAG_EVAL_T, _TAG_EVAL_POS, _TAG_EVAL_TOK, _TAG_EVAL_KIND = 11, 12, 13, 14, 15, 16
_TAG_EVAL_GROUP = 17
_TAG_LATENT = 18


def alpha_and_rate(schedule: Schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha(t) floored at ALPHA_FLOOR, and alpha'(t) = -weight(t) (1 - alpha(t)) (the schedule interface's
    weight is -alpha' / (1 - alpha))."""
    a = schedule.alpha(t)
    da = -schedule.weight(t) * (1.0 - a)
    return a.clamp(min=ALPHA_FLOOR), da


# --------------------------------------------------------------------------------------- the closed form
def duo_nll(logits: torch.Tensor, z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, dalpha: torch.Tensor,
            *, mask_id: Optional[int]) -> torch.Tensor:
    """(n,) UDLM's per-token NELBO integrand in DUO's closed form (module docstring), for logits (n, V) at
    noised tokens z (n,) with clean tokens x (n,), alpha and alpha' (n,). Computed in the logits' dtype
    (float32 in training, float64 in the exactness tests); differentiable in the logits only (alpha and
    alpha' are constants of the noise). The logits enter only through S, log xbar_theta_z and
    log xbar_theta_x (`mixture_log_stats`, whose gradient is written out); the rest is per-row algebra."""
    if alpha.requires_grad or dalpha.requires_grad:
        raise ValueError("duo_nll differentiates the logits only; alpha and alpha' must not require grad")
    dt = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    N = real_count(logits.shape[-1], mask_id)
    a, da = alpha.to(dt), dalpha.to(dt)
    S, lg = mixture_log_stats(logits, N * a, 1.0 - a, torch.stack([z, x], -1), mask_id=mask_id)
    lz, lx = lg[:, 0], lg[:, 1]
    same = z == x
    xbar_z = (1.0 - a) + N * a * same.to(dt)
    term1 = N * (1.0 / xbar_z - torch.exp(-lz))
    c = (1.0 - a) / (N * a + 1.0 - a)
    log_c = c.log()
    inner = S - N * lz
    t2_same = -c * inner + (N - 1) * c * log_c
    t2_diff = -inner - N * a / (1.0 - a) * (lx - lz) - log_c / c
    return da / (N * a) * (term1 - torch.where(same, t2_same, t2_diff))


# ------------------------------------------------------------ log-statistics of a mixed prediction
def mixture_log_stats(logits: torch.Tensor, scale: torch.Tensor, const: torch.Tensor, idx: torch.Tensor, *,
                      mask_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For q_j = scale p_j + const over the real tokens j, p = softmax of `logits` (n, V) over the real tokens
    (the mask column excluded), and per-row constants scale > 0, const >= 0 (n,): returns

        S (n,)      = sum over real j of log q_j
        lg (n, k)   = log q_j at the real token ids idx (n, k), computed in log space (finite when const = 0)

    Uniform noise (xbar_theta = N alpha x_theta + 1 - alpha) and GIDD's hybrid (q_t(. | x_theta) = alpha
    x_theta + c0) read the logits only through these, so both losses are per-row algebra on (n,) tensors over
    this one function. Its gradient is written out: a chunk of the all-position loss holds the softmax and one
    (n, V) buffer, not an autograd graph of (n, V) temporaries, and each (n, V) pass is a vectorised kernel
    (softmax, not logsumexp + exp). Differentiable in the logits only. tests/test_obj_uniform.py checks it by
    gradcheck in float64, with and without a mask column and at const = 0."""
    if scale.requires_grad or const.requires_grad:
        raise ValueError("mixture_log_stats differentiates the logits only; scale and const must not require grad")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return _MixtureLogStats.apply(logits, scale.to(logits.dtype), const.to(logits.dtype), idx, mask_id)


def _masked(logits: torch.Tensor, mid: Optional[int]) -> torch.Tensor:
    """A copy of the logits with the mask column at -inf (the softmax over it is over the real tokens)."""
    masked = logits.clone()
    if mid is not None:
        masked[:, mid] = float("-inf")
    return masked


class _MixtureLogStats(torch.autograd.Function):
    """With w_j = scale p_j / q_j (in [0, 1]; 1 where q_j = 0) and upstream gradients gS (n,), glg (n, k):
        dL/dlog q_j   = g_j = gS [j real] + sum_i glg_i [j = idx_i]
        dL/dlogit_j   = g_j w_j - p_j sum_k g_k w_k        (dlog q_k / dlogit_j = w_k ([k = j] - p_j))"""

    @staticmethod
    def forward(ctx, logits, scale, const, idx, mask_id):
        V = logits.shape[-1]
        mid = mask_id if mask_id is not None and 0 <= mask_id < V else None
        masked = _masked(logits, mid)
        top = masked.amax(-1)  # amax: max(dim) with indices is ~15x slower on CPU
        p = torch.softmax(masked, -1)
        del masked
        # log p at idx from the logits: lse = top - log(max p) (the max of p sits at the top logit, and is
        # >= 1/V, so it never underflows)
        lse = top - p.amax(-1).log()
        logp_idx = logits.gather(-1, idx) - lse[:, None]
        lg = torch.logaddexp(scale.log()[:, None] + logp_idx, const.log()[:, None])
        logq = p.mul_(scale[:, None]).add_(const[:, None]).log_()
        if mid is not None:
            logq[:, mid] = 0.0
        S = logq.sum(-1)
        ctx.save_for_backward(logits, scale, const, idx)
        ctx.mid = mid
        return S, lg

    @staticmethod
    def backward(ctx, gS, glg):
        logits, scale, const, idx = ctx.saved_tensors
        mid = ctx.mid
        p = torch.softmax(_masked(logits, mid), -1)
        # two (n, V) buffers, updated in place (fresh CPU allocations of this size cost as much as a pass)
        g = torch.mul(p, scale[:, None])
        g.add_(const[:, None]).reciprocal_().mul_(p).mul_(scale[:, None])  # w = scale p / q
        torch.nan_to_num_(g, nan=1.0)  # 0/0 only where const = 0 and p_j = 0: the limit is 1
        w_idx = g.gather(-1, idx)
        g.mul_(gS[:, None])
        if mid is not None:
            g[:, mid] = 0.0
        g.scatter_add_(-1, idx, glg * w_idx)
        M = g.sum(-1)
        return g.sub_(p.mul_(M[:, None])), None, None, None, None


def prior_kl(alpha1: float, n_real: int) -> float:
    """KL(q_1(. | x) || Uniform(N)) per token, with q_1 = alpha1 onehot + (1 - alpha1)/N (DUO's _prior_loss)."""
    a, N = float(alpha1), n_real
    if a <= 0.0:
        return 0.0
    return (a + (1 - a) / N) * math.log(N * a + 1 - a) + (1 - 1 / N) * (1 - a) * math.log1p(-a) \
        if a < 1 else math.log(N)


def uniform_posterior(p_x0: torch.Tensor, z_t: torch.Tensor, a_t: float, a_s: float, n_real: int,
                      mask_id: Optional[int]) -> torch.Tensor:
    """(n, V) float64: p(z_s | z_t) = q(z_t | z_s) q_s(z_s | p_x0) / q_t(z_t | p_x0) (UDLM's / DUO's
    `_posterior_from_x0`, the D3PM product form), with p_x0 over the vocabulary (zero at the mask id)."""
    p = p_x0.double()
    N = n_real
    a_ts = a_t / a_s
    onehot = torch.zeros_like(p).scatter_(-1, z_t[:, None], 1.0)
    num = N * a_t * p * onehot + (a_ts - a_t) * onehot + (a_s - a_t) * p + (1 - a_ts) * (1 - a_s) / N
    if mask_id is not None and 0 <= mask_id < p.shape[-1]:
        num[:, mask_id] = 0.0
    den = N * a_t * p.gather(-1, z_t[:, None]) + (1 - a_t)
    return num / den


# ------------------------------------------------------------------ DUO's Gaussian-latent curriculum
@functools.lru_cache(maxsize=8)
def duality_table(n_real: int, gamma_min: float, gamma_max: float, points: int = 4097):
    """DUO's diffusion duality as a table over gamma in [gamma_min, gamma_max] (float64 numpy arrays
    (gamma, alpha, d alpha / d gamma)). The Gaussian latent w = alpha~ e_x + sigma~ eps over the N real tokens,
    alpha~^2 = sigmoid(-gamma), sigma~^2 = sigmoid(gamma), has argmax(w) distributed exactly as a uniform-state
    token with

        P(argmax w = x) = I(m) = integral phi(u - m) Phi(u)^(N-1) du,   m = alpha~ / sigma~ = exp(-gamma / 2),
        alpha = (N I - 1) / (N - 1),   d alpha / d gamma = N / (N - 1) (-m / 2) integral (u - m) phi(u - m) Phi(u)^(N-1) du

    (DUO's `_gamma_to_alphat_integral`, whose derivative is a finite difference; here both integrals are
    computed by scipy's adaptive quadrature, vectorised over the grid, once per process and (N, range)
    instead of loaded from a shipped pickle). Between grid points `duality_alpha` interpolates linearly:
    with 4097 points over DUO's ranges the interpolation error is below 1e-7."""
    from scipy import integrate, special
    if n_real < 2:
        raise ValueError(f"the curriculum needs at least 2 real tokens (got {n_real})")
    gam = np.linspace(gamma_min, gamma_max, points)
    m = np.exp(-gam / 2.0)

    def integrands(u):
        w = np.exp(-0.5 * (u - m) ** 2 + (n_real - 1) * special.log_ndtr(u)) / math.sqrt(2.0 * math.pi)
        return np.concatenate([w, (u - m) * w])
    # phi(u - m) is below e^-72 more than 12 from m: the tails outside carry nothing at float64
    res, _ = integrate.quad_vec(integrands, float(m.min()) - 12.0, float(m.max()) + 12.0, epsabs=1e-14,
                                epsrel=1e-12, norm="max", limit=2000)
    prob, dprob_dm = res[:points], res[points:]
    N = n_real
    alpha = (N * prob - 1.0) / (N - 1.0)
    dalpha = N / (N - 1.0) * dprob_dm * (-m / 2.0)
    return gam, alpha, dalpha


def duality_alpha(gamma: torch.Tensor, n_real: int, gamma_min: float, gamma_max: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, d alpha / d gamma) float64 at gamma (any shape) from `duality_table`, linearly interpolated;
    gamma outside the table's range is an error (DUO clips it with a printed warning)."""
    gam, alpha, dalpha = duality_table(n_real, float(gamma_min), float(gamma_max))
    g = gamma.double()
    if bool((g < gamma_min - 1e-9).any()) or bool((g > gamma_max + 1e-9).any()):
        raise ValueError(f"gamma outside the duality table's range [{gamma_min}, {gamma_max}]")
    pos = (g - gamma_min) / (gamma_max - gamma_min) * (len(gam) - 1)
    i0 = pos.floor().long().clamp(0, len(gam) - 2)
    f = pos - i0
    a_t, d_t = torch.from_numpy(alpha), torch.from_numpy(dalpha)
    return a_t[i0] * (1 - f) + a_t[i0 + 1] * f, d_t[i0] * (1 - f) + d_t[i0 + 1] * f


def latent_scales(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha~ = sqrt(sigmoid(-gamma)) and sigma~ = sqrt(sigmoid(gamma)) (DUO's `_q_xt_gaussian`)."""
    g = gamma.double()
    return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()


def real_index(x: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """Token ids -> their index r in [0, N) among the real tokens (the inverse of common.real_ids)."""
    return x if mask_id is None else x - (x > mask_id).to(x.dtype)


def gaussian_latent(x: torch.Tensor, a_tilde: float, s_tilde: float, n_real: int, mask_id: Optional[int],
                    gen: torch.Generator) -> torch.Tensor:
    """(L, V) float64: the whole latent alpha~ e_x + sigma~ eps of a row x (L,), eps ~ N(0, I_N) over the real
    tokens, -inf at the mask id (never the argmax, zero weight in any softmax; mask_id: the mask's id when it
    is inside the vocabulary, else None)."""
    L = x.numel()
    w = s_tilde * torch.randn(L, n_real, generator=gen, dtype=torch.float64)
    w[torch.arange(L), real_index(x, mask_id)] += a_tilde
    if mask_id is None:
        return w
    return torch.cat([w[:, :mask_id], torch.full((L, 1), float("-inf"), dtype=w.dtype), w[:, mask_id:]], 1)


def distinct_draws(L: int, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(L, k) long: per row, k distinct integers of [0, n), a uniformly random ordered k-subset (Floyd's
    algorithm gives a uniform subset, whose slot order is not uniform: a random permutation of the k slots
    follows). O(L k^2), never O(L n)."""
    out = torch.empty(L, k, dtype=torch.long)
    for slot, i in enumerate(range(n - k, n)):
        j = (torch.rand(L, generator=gen, dtype=torch.float64) * (i + 1)).long().clamp_(max=i)
        if slot:
            j = torch.where((out[:, :slot] == j[:, None]).any(1), torch.full_like(j, i), j)
        out[:, slot] = j
    return out.gather(1, torch.rand(L, k, generator=gen).argsort(1))


def latent_top_k(x: torch.Tensor, a_tilde: float, s_tilde: float, k: int, n_real: int, mask_id: Optional[int],
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of a row's Gaussian latent (`gaussian_latent`) without drawing the other N - k:
    (ids (L, k') long, values (L, k') float64), descending, k' = min(k, N).

    The N - 1 noise entries are i.i.d. N(0, sigma~^2): their largest values are drawn directly as order
    statistics (the j-th largest of n uniforms is prod_{i <= j} U_i^(1 / (n - i + 1)), mapped through the
    normal quantile), and placed at a uniformly random ordered subset of the other tokens (exchangeability).
    The clean entry alpha~ + sigma~ eps_x joins them, and the k largest of the k + 1 are kept. (DUO's
    `sample_tempered_softmax_topk` draws the same order statistics, but names the argmax x whenever x is among
    the k largest, which is wrong for k > 1, and places them by Floyd's slot order; neither is copied.)"""
    L, n = x.numel(), n_real - 1
    kk = min(k, n)
    log_u = torch.rand(L, kk, generator=gen, dtype=torch.float64).log_()
    log_u = (log_u / torch.arange(n, n - kk, -1, dtype=torch.float64)).cumsum(1)  # log of the j-th largest
    vals = -s_tilde * torch.special.ndtri(-torch.expm1(log_u))  # Phi^-1(u) = -Phi^-1(1 - u), exact near u = 1
    xr = real_index(x, mask_id)
    r = distinct_draws(L, kk, n, gen)
    ids = real_ids(r + (r >= xr[:, None]).long(), mask_id)  # the other tokens: skip x's index
    clean = a_tilde + s_tilde * torch.randn(L, 1, generator=gen, dtype=torch.float64)
    vals, ids = torch.cat([vals, clean], 1), torch.cat([ids, x[:, None]], 1)
    order = vals.argsort(1, descending=True)[:, :min(k, n_real)]
    return ids.gather(1, order), vals.gather(1, order)


def tempered_weights(values: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(values / tau) over the last axis, in float64 (tau = 1e-3 puts e^-1000-scale ratios in play),
    renormalised over whatever entries are kept: with every entry kept this is DUO's full tempered softmax;
    with the top k, the dropped tail (each at most e^{-(w_(k) - w_(k+1)) / tau} of the kept) is left out
    rather than estimated (DUO's efficient variant adds an estimate to the denominator only)."""
    return torch.softmax(values.double() / tau, dim=-1)


def schedule_time(schedule: Schedule, alpha: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """t in [0, 1] with schedule.alpha(t) = alpha (bisection; alpha decreases in t), so the network is
    conditioned on the same t for the same alpha inside and outside the curriculum (DUO conditions on
    -log alpha)."""
    a = alpha.double()
    lo, hi = torch.zeros_like(a), torch.ones_like(a)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule.alpha(mid) > a
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------- evaluation
def eval_time(method: str, *, seed: int, seq: int, sample: int, samples: int, group: int) -> float:
    """u in (0, 1] of one Monte Carlo sample: "t" stratified over the K samples of a sequence, "mdlm"
    low-discrepancy over a group of consecutive sequences (as in mdm.draw_mask)."""
    if method == "t":
        u0 = torch.rand(1, generator=eval_generator(seed, _TAG_EVAL_T, seq), dtype=torch.float64).item()
        return 1.0 - ((u0 + sample / samples) % 1.0)
    if method == "mdlm":
        g = eval_generator(seed, _TAG_EVAL_GROUP, seq // group, sample)
        u0 = torch.rand(1, generator=g, dtype=torch.float64).item()
        slot = int(torch.randperm(group, generator=g)[seq % group])
        return 1.0 - ((u0 + slot / group) % 1.0)
    raise ValueError(f"unknown estimator {method!r} for uniform-state diffusion; choices: t, mdlm")


@register
class UniformDiffusion(RealVocab, Objective):
    """uniform: UDLM/DUO uniform-state diffusion, every schedule, DUO's closed-form loss at every position."""
    name = "uniform"
    title = "uniform-state diffusion"
    time_conditioning = True
    head_has_mask = False
    logits_at = "all"
    eval_methods = ("t", "mdlm")
    summary = "uniform noise; DUO's closed-form NELBO at every position; time-conditioned"
    # launch.plan: bytes per vocabulary entry of a row-loss chunk: the fused loss saves nothing for backward
    # (benchmarks/row_loss_bytes.py: 0 + 12), and its backward holds one more (n, V) buffer than that counts
    row_loss_bytes = 16

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        self.schedule = get_schedule(dcfg.schedule, dcfg.poly_exponent)
        self.eps = dcfg.eps
        choice(dcfg, "noise_removal", "ancestral", ("ancestral", "greedy", "none"))
        if not 0.0 <= float(getattr(dcfg, "psi_kappa", 1.0)) <= 1.0:
            raise ValueError(f"diffusion.psi_kappa={dcfg.psi_kappa} must be in [0, 1] (1: the ancestral step)")
        if int(getattr(dcfg, "self_correct_steps", 0)) < 0:
            raise ValueError(f"diffusion.self_correct_steps={dcfg.self_correct_steps} must be >= 0")
        self.curriculum_steps = int(getattr(dcfg, "curriculum_steps", 0))
        self.curriculum_top_k = int(getattr(dcfg, "curriculum_top_k", 0))
        self.tau = 10.0 ** float(getattr(dcfg, "curriculum_log10_tau", -3.0))
        self.gamma_range = (float(getattr(dcfg, "curriculum_gamma_min", -3.55)),
                            float(getattr(dcfg, "curriculum_gamma_max", -1.85)))
        if self.curriculum_steps < 0 or self.curriculum_top_k < 0:
            raise ValueError(f"diffusion.curriculum_steps={self.curriculum_steps} and diffusion.curriculum_top_k="
                             f"{self.curriculum_top_k} must be >= 0 (0: no curriculum / the full softmax)")
        if self.curriculum_steps and self.name != "uniform":
            raise ValueError(f"diffusion.curriculum_steps is DUO's curriculum for objective=uniform; "
                             f"objective={self.name} has none: set diffusion.curriculum_steps=0")
        if self.curriculum_steps and not self.gamma_range[0] < self.gamma_range[1]:
            raise ValueError(f"diffusion.curriculum_gamma_min={self.gamma_range[0]} must be below "
                             f"diffusion.curriculum_gamma_max={self.gamma_range[1]}")
        if self.curriculum_steps and not 0.0 < self.tau < math.inf:
            raise ValueError(f"diffusion.curriculum_log10_tau={dcfg.curriculum_log10_tau} gives no usable "
                             f"temperature; DUO uses -3")

    def chunk(self, ce_chunk: int) -> int:
        """Rows of full-vocabulary logits per chunk: diffusion.row_chunk (256: the loss runs at every position,
        about twice the rows of masked diffusion's cross-entropy, so its chunks are smaller; the matmul stays
        efficient at 256 rows), or ce_chunk when row_chunk is 0."""
        rc = int(getattr(self.cfg, "row_chunk", 0))
        return min(rc, ce_chunk) if rc > 0 and ce_chunk > 0 else (rc or ce_chunk)

    def alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return alpha_and_rate(self.schedule, t)

    def prior_nats(self) -> float:
        """The prior term per scored token, KL(q_1(. | x) || prior), added to every bound."""
        a1 = float(self.alpha(torch.ones(1, dtype=torch.float64))[0][0])
        return prior_kl(a1, self.n_real)

    # -- noising and the loss
    def draw(self, seed, step, global_batch, seq_len, *, stratified=True, random_length_prob=0.0) -> StepNoise:
        """The masked-diffusion draw (t, a uniform per position: replaced or not) plus, per position, a
        uniform that names the replacement token; a pure function of (seed, step). While DUO's curriculum is
        on (step < diffusion.curriculum_steps), also extra["latent_seed"]: one seed per row of the global
        batch for its Gaussian latent (drawn in `noise`, per row, so every layout draws the same latents)."""
        noise = add_token_draw(draw_step_noise(seed, step, global_batch, seq_len, stratified=stratified,
                                               random_length_prob=random_length_prob), seed, step, _TAG_TOK)
        if step < self.curriculum_steps:
            noise.extra["latent_seed"] = torch.randint(0, 2**62, (global_batch,),
                                                       generator=eval_generator(seed, _TAG_LATENT, step))
        return noise

    def for_validation(self) -> "Objective":
        """Without the curriculum: validation logs the uniform NELBO on discrete inputs, never the surrogate."""
        if not self.curriculum_steps:
            return self
        plain = copy.copy(self)
        plain.curriculum_steps = 0
        return plain

    def curriculum_noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        """DUO's curriculum step (`DUO.nll`, mode simple, or top-k): gamma linear in t over the configured
        range, per row the Gaussian latent, the network's input the tempered softmax of the latent (over every
        token, (B, L, V) floats, or over its k largest entries: ids and weights, `curriculum_top_k`), the
        noised tokens z = argmax of the latent, exactly uniform-state noise at alpha = duality_alpha(gamma)
        (the loss's alpha, and alpha' = d alpha / d gamma (gamma_max - gamma_min)). The network is conditioned
        on the t whose schedule alpha is that alpha."""
        g0, g1 = self.gamma_range
        t = noise_level(noise.u, self.eps).double()
        gamma = g0 + t * (g1 - g0)
        a, da_dgamma = duality_alpha(gamma, self.n_real, g0, g1)
        a_tilde, s_tilde = latent_scales(gamma)
        mid = self.mask_id if self.mask_id is not None and 0 <= self.mask_id < self.vocab_size else None
        B, L = x0.shape
        zs, soft = [], []
        for b in range(B):
            gen = torch.Generator().manual_seed(int(noise.extra["latent_seed"][b]))
            if self.curriculum_top_k:
                ids, vals = latent_top_k(x0[b].cpu(), float(a_tilde[b]), float(s_tilde[b]), self.curriculum_top_k,
                                         self.n_real, mid, gen)
                zs.append(ids[:, 0])
                soft.append((ids, tempered_weights(vals, self.tau).float()))
            else:
                w = gaussian_latent(x0[b].cpu(), float(a_tilde[b]), float(s_tilde[b]), self.n_real, mid, gen)
                zs.append(w.argmax(-1))
                soft.append(tempered_weights(w, self.tau).float())
        xt = torch.stack(zs).to(x0.device)
        extra = {"alpha": a.float().clamp(min=ALPHA_FLOOR), "dalpha": (da_dgamma * (g1 - g0)).float()}
        if self.curriculum_top_k:
            extra["soft_ids"] = torch.stack([s[0] for s in soft])
            extra["soft_weights"] = torch.stack([s[1] for s in soft])
        else:
            extra["soft_dense"] = torch.stack(soft)
        t_cond = schedule_time(self.schedule, a).float()
        return Noised(x0=x0, xt=xt, t=t_cond, at=None, doc_ids=doc_ids, extra=extra)

    def replaced(self, x0, t, mask_uniform, tok_u) -> torch.Tensor:
        a, _ = self.alpha(t)
        return corrupt(x0, mask_uniform < (1.0 - a)[:, None], absorb=False, mask_id=self.mask_id, tok_u=tok_u,
                       n_real=self.n_real)

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        if "latent_seed" in noise.extra:
            return self.curriculum_noise(x0, noise, doc_ids)
        t = noise_level(noise.u, self.eps)
        xt = self.replaced(x0, t, noise.mask_uniform, noise.extra["tok_u"])
        return Noised(x0=x0, xt=xt, t=t, at=None, doc_ids=doc_ids)

    def row_loss(self, batch: Noised, t: torch.Tensor):
        """The per-row loss over every position (row-major), for the model's chunked all-position loss (at
        the curriculum's alpha when the batch carries one)."""
        B, L = batch.xt.shape
        a, da = (batch.extra["alpha"], batch.extra["dalpha"]) if "alpha" in batch.extra else self.alpha(t.float())
        a_rows, da_rows = a.repeat_interleave(L), da.repeat_interleave(L)
        z, x = batch.xt.reshape(-1), batch.x0.reshape(-1)

        def rows(logits, sl):
            return self.train_token_loss(logits, z[sl], x[sl], a_rows[sl], da_rows[sl])
        return rows

    def token_loss(self, logits, z, x, a, da):
        """(n,) the NELBO integrand per token (what the bound sums)."""
        return duo_nll(logits, z, x, a, da, mask_id=self.mask_id)

    def train_token_loss(self, logits, z, x, a, da):
        """(n,) the per-token training loss (the NELBO integrand unless an objective reweights it)."""
        return self.token_loss(logits, z, x, a, da)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        """The mean per-token loss over every position. With DUO's curriculum the network reads the soft
        input and the loss is DUO's curriculum loss (the closed form at the latent's argmax and the duality's
        alpha, over the gamma range only): a training surrogate; validation runs `for_validation()`."""
        B, L = batch.x0.shape
        soft = {}
        if "soft_dense" in batch.extra:
            soft = {"soft_input": batch.extra["soft_dense"]}
        elif "soft_ids" in batch.extra:
            soft = {"soft_input": (batch.extra["soft_ids"], batch.extra["soft_weights"])}
        per = model(batch.xt, doc_ids=batch.doc_ids, t=batch.t, row_loss=self.row_loss(batch, batch.t),
                    ce_chunk=self.chunk(ce_chunk), **soft)
        loss = per.sum() / (B * L)
        return loss, {"noised_frac": (batch.xt != batch.x0).float().mean().detach(),
                      "prior": torch.tensor(self.prior_nats())}

    def logit_fraction(self, seq_len: int) -> float:
        return 1.0

    # -- the bound
    def eval_draw(self, method, *, seed, seq, sample, samples, maskable, eps, group) -> EvalDraw:
        if int(maskable.sum()) == 0:
            raise ValueError("a sequence with no scored positions has nothing to estimate")
        u = eval_time(method, seed=seed, seq=seq, sample=sample, samples=samples, group=group)
        pos, tok, kind = position_uniforms(seed, maskable.numel(), seq, sample, _TAG_EVAL_POS, _TAG_EVAL_TOK,
                                           _TAG_EVAL_KIND)
        t = (1.0 - eps) * u + eps
        return EvalDraw({"t": t, "pos": pos, "tok": tok, "kind": kind, "scored": maskable.clone()}, 1.0)

    def eval_noised(self, x0: torch.Tensor, draws, t: torch.Tensor):
        """The noised batch of a list of eval draws: xt (R, L) and where it is scored."""
        pos, tok, scored = pad_draws(draws, {"pos": 2.0, "tok": 0.0, "scored": False}, x0.shape[1], x0.device)
        xt = self.replaced(x0, t, pos, tok)
        return torch.where(scored, xt, x0), scored

    def eval_sums(self, model, x0, draws, *, keep, subs=True):
        dev = x0.device
        t = torch.tensor([d.noise["t"] for d in draws], dtype=torch.float32, device=dev)
        xt, scored = self.eval_noised(x0, draws, t)
        a, da = self.alpha(t)
        sel_rows = scored.nonzero()[:, 0]
        a_sel, da_sel = a[sel_rows], da[sel_rows]
        z, x = xt[scored], x0[scored]

        def rows(logits, sl):
            return self.token_loss(logits, z[sl], x[sl], a_sel[sl], da_sel[sl])
        kp = None if bool(keep.all()) else keep
        with autocast_for(dev):
            per = model(xt, key_padding=kp, logits_at=scored, t=t, row_loss=rows)
        sums = torch.zeros(x0.shape[0], dtype=torch.float64, device=dev).index_add_(0, sel_rows, per.double())
        sums = sums + self.prior_nats() * scored.sum(1).double()
        return sums.cpu() * torch.tensor([d.weight for d in draws], dtype=torch.float64)

    # -- brute force (tests)
    def states(self) -> list[int]:
        """The token ids a noised position can hold."""
        return [i for i in range(self.vocab_size) if i != self.mask_id]

    def alpha_at(self, t: float) -> float:
        return float(self.alpha(torch.tensor([t], dtype=torch.float64))[0][0])

    def marginal_table(self, t: float) -> torch.Tensor:
        """(V, V) float64: M[x, z] = q_t(z | x) over the whole vocabulary (the mask row is unused)."""
        a = self.alpha_at(t)
        V = self.vocab_size
        return a * torch.eye(V, dtype=torch.float64) + (1 - a) * self.noise_dist(a, V)[None, :]

    def exact_nelbo(self, cond_logprobs, x0, nodes: int = 400) -> float:
        """E_t E_z sum_n l_n + prior, by enumerating every noised sequence z and Gauss-Legendre in t over
        [eps, 1]. A time-conditioned network, batched: cond_logprobs(Z (K, L), t) -> (K, L, V) float64
        log-probabilities of the clean token at every position for each of the K noised sequences."""
        L = x0.numel()
        xs, ws = np.polynomial.legendre.leggauss(nodes)
        lo, hi = self.eps, 1.0
        Z = torch.tensor(list(itertools.product(self.states(), repeat=L)), dtype=torch.long)
        x = x0.long().expand(len(Z), L).reshape(-1)
        total = 0.0
        for xi, wi in zip(xs, ws):
            t = 0.5 * (hi - lo) * xi + 0.5 * (hi + lo)
            a, da = self.alpha(torch.tensor([t], dtype=torch.float64))
            M = self.marginal_table(t)
            qz = M[x0.long()[None, :], Z].prod(1)
            logp = cond_logprobs(Z, t).double().reshape(len(Z) * L, -1)
            per = self.token_loss(logp, Z.reshape(-1), x, a.expand(len(x)), da.expand(len(x)))
            per = torch.where(qz.repeat_interleave(L) > 0, per, 0.0)
            total += 0.5 * (hi - lo) * wi * float((qz * per.reshape(len(Z), L).sum(1)).sum())
        return total + L * self.prior_nats()

    # -- generation
    def step_alphas(self, t: float, s: float) -> tuple[float, float]:
        return self.alpha_at(t), (1.0 if s <= 0 else self.alpha_at(s))

    def reverse_step(self, p_x0, z_t, t, s):
        a_t, a_s = self.step_alphas(t, s)
        return uniform_posterior(p_x0, z_t, a_t, a_s, self.n_real, self.mask_id)

    def noise_dist(self, a: float, V: int) -> torch.Tensor:
        """(V,) float64: pi, the distribution a noised token is drawn from at signal level a (here uniform over
        the real tokens, whatever a)."""
        pi = torch.full((V,), 1.0 / self.n_real, dtype=torch.float64)
        if self.mask_id is not None and 0 <= self.mask_id < V:
            pi[self.mask_id] = 0.0
        return pi

    def forward_noise(self, p: torch.Tensor, s: float) -> torch.Tensor:
        """F_{alpha_s}(p) = alpha_s p + (1 - alpha_s) pi_s: a clean distribution p (n, V) noised to level s."""
        _, a_s = self.step_alphas(s, s)
        return a_s * p.double() + (1 - a_s) * self.noise_dist(a_s, p.shape[-1])

    def prior_sample(self, u: torch.Tensor) -> torch.Tensor:
        """z_1 from the prior q_1(. | Uniform), given uniforms u (..., 2) float64 (two per position)."""
        return uniform_tokens(u[..., 1], self.n_real, self.mask_id)

    # -- sampling (model.sample.generate calls objective.generate)
    def predict(self, model, x, key_padding, t: float, temperature: float = 0.0) -> torch.Tensor:
        """(B, W, V) float64 x_theta: the network's clean-token distribution over the real tokens at level t."""
        return real_token_probs(model, x, key_padding, t, self.mask_id, temperature)

    def psi_step(self, p_x0, z_t, t, s, kappa: float = 1.0) -> torch.Tensor:
        """(n, V) float64: the Psi-sampler step (DUO chapter II `_psi_update`):
        kappa q(z_s | z_t, x_theta) + (1 - kappa) F_{alpha_s}(q(x_0 | z_t, x_theta)), with F the forward noise
        to level s and q(x_0 | .) the posterior at alpha_s = 1; kappa = 1 is the ancestral step, kappa < 1
        adds predictor-corrector (re-noising) moves for either noise type."""
        post = self.reverse_step(p_x0, z_t, t, s)
        if kappa >= 1.0:
            return post
        clean = self.reverse_step(p_x0, z_t, t, 0.0)
        return kappa * post + (1.0 - kappa) * self.forward_noise(clean, s)

    categorical = staticmethod(categorical)

    @torch.no_grad()
    def generate(self, model, ids, real, *, gen_length: int, steps: int, noise, temperature: float = 0.0,
                 sampler: str = "ancestral", callback=None, stats=None, noise_removal: Optional[str] = None,
                 kappa: Optional[float] = None, self_correct: Optional[int] = None, t_min: float = 1e-5, **_):
        """Sample gen_length tokens after the prompt `ids` (B, P) (`real` marks real prompt tokens) from the
        prior, `steps` reverse steps on t = linspace(1, t_min), every draw in float64:
          sampler "ancestral" (also "mdlm", "llada"): the exact posterior with x_theta (kappa = 1);
          sampler "psi": the Psi step with diffusion.psi_kappa (or `kappa`);
          noise_removal (diffusion.noise_removal): "ancestral" a last step to alpha = 1, "greedy" DUO's greedy
            tail (argmax x_theta at t_min), "none" (hybrid may then leave masks);
          self_correct (diffusion.self_correct_steps): GIDD's self-correction afterwards: per row and round,
            the position whose token the model most prefers to change (largest p_max - p_current at t_min)
            takes the argmax, until no row changes or the rounds run out.
        temperature > 0 divides the logits; 0 (the shared default) samples x_theta as it is."""
        cfg = self.cfg
        noise_removal = noise_removal or getattr(cfg, "noise_removal", "ancestral")
        kappa = float(kappa if kappa is not None else (getattr(cfg, "psi_kappa", 1.0) if sampler == "psi" else 1.0))
        self_correct = int(self_correct if self_correct is not None else getattr(cfg, "self_correct_steps", 0))
        if noise_removal not in ("ancestral", "greedy", "none"):
            raise ValueError(f"diffusion.noise_removal={noise_removal!r}; choices: ancestral, greedy, none")
        if sampler not in ("ancestral", "mdlm", "llada", "psi"):
            raise ValueError(f"sampler {sampler!r} is not defined for {self.name}; choices: ancestral, psi")
        stats = stats if stats is not None else {}
        B, P = ids.shape
        G = gen_length
        active = torch.ones(B, dtype=torch.bool, device=ids.device)
        z = self.prior_sample(noise.rows(active, 2 * G).view(B, G, 2)).to(ids.device)
        x, kp = start_generation(ids, real, z)
        times = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64).tolist()

        def forward(t):
            count_forward(stats, B, x.shape[1])
            return self.predict(model, x, kp, t, temperature)[:, P:]

        def draw(q):
            return self.categorical(q, noise.rows(active, G).reshape(-1)).view(B, G)
        for i in range(steps):
            t, s = times[i], times[i + 1]
            p = forward(t)
            V = p.shape[-1]
            x[:, P:] = draw(self.psi_step(p.reshape(-1, V), x[:, P:].reshape(-1), t, s, kappa))
            if callback is not None:
                callback(i, x)
        if noise_removal != "none" or self_correct > 0:
            p = forward(t_min)
            V = p.shape[-1]
            if noise_removal == "ancestral":
                x[:, P:] = draw(self.reverse_step(p.reshape(-1, V), x[:, P:].reshape(-1), t_min, 0.0))
            elif noise_removal == "greedy":
                x[:, P:] = p.argmax(-1)
            for _ in range(self_correct):
                p = forward(t_min)
                cur = p.gather(-1, x[:, P:, None])[..., 0]
                best, arg = p.max(-1)
                gain, pos = (best - cur).max(-1)
                change = gain > 1e-12
                if not bool(change.any()):
                    break
                rows = change.nonzero()[:, 0]
                x[rows, P + pos[rows]] = arg[rows, pos[rows]]
        return x
