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
all-position loss (`row_loss=`, `ce_chunk` rows of logits at a time, recomputed in backward): the (B L, V)
logits never exist whole.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch

from .base import EvalDraw, Noised, Objective, StepNoise, draw_step_noise, noise_level, register
from .common import (RealVocab, add_token_draw, categorical, choice, corrupt, count_forward, pad_draws,  # noqa: F401
                     position_uniforms, real_count, real_ids, real_log_probs, real_token_probs, start_generation,
                     uniform_tokens)
from .mdm import autocast_for, eval_generator
from .schedules import Schedule, get_schedule

ALPHA_FLOOR = 1e-6
_TAG_TOK, _TAG_KIND, _TAG_EVAL_T, _TAG_EVAL_POS, _TAG_EVAL_TOK, _TAG_EVAL_KIND = 11, 12, 13, 14, 15, 16
_TAG_EVAL_GROUP = 17


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
    (float32 in training, float64 in the exactness tests)."""
    V = logits.shape[-1]
    has_mask = mask_id is not None and 0 <= mask_id < V
    N = V - int(has_mask)
    logp = real_log_probs(logits, mask_id)
    a, da = alpha.to(logp.dtype)[:, None], dalpha.to(logp.dtype)
    xbar_theta = N * a * logp.exp() + (1.0 - a)  # (n, V); the mask column is 1 - alpha (x_theta = 0 there)
    log_xbar = xbar_theta.log()
    S = log_xbar.sum(-1) - (log_xbar[:, mask_id] if has_mask else 0.0)  # over the real tokens only
    a = a[:, 0]
    lz = log_xbar.gather(-1, z[:, None])[:, 0]
    lx = log_xbar.gather(-1, x[:, None])[:, 0]
    same = z == x
    xbar_z = (1.0 - a) + N * a * same.to(a.dtype)
    term1 = N * (1.0 / xbar_z - 1.0 / lz.exp())
    c = (1.0 - a) / (N * a + 1.0 - a)
    log_c = c.log()
    inner = S - N * lz
    t2_same = -c * inner + (N - 1) * c * log_c
    t2_diff = -inner - N * a / (1.0 - a) * (lx - lz) - log_c / c
    term2 = torch.where(same, t2_same, t2_diff)
    return da / (N * a) * (term1 - term2)


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
    row_loss_bytes = 30  # launch.plan: bytes per vocabulary entry of a chunk of the row loss (its temporaries)

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        self.schedule = get_schedule(dcfg.schedule, dcfg.poly_exponent)
        self.eps = dcfg.eps
        choice(dcfg, "noise_removal", "ancestral", ("ancestral", "greedy", "none"))
        if not 0.0 <= float(getattr(dcfg, "psi_kappa", 1.0)) <= 1.0:
            raise ValueError(f"diffusion.psi_kappa={dcfg.psi_kappa} must be in [0, 1] (1: the ancestral step)")
        if int(getattr(dcfg, "self_correct_steps", 0)) < 0:
            raise ValueError(f"diffusion.self_correct_steps={dcfg.self_correct_steps} must be >= 0")

    def chunk(self, ce_chunk: int) -> int:
        """Rows of full-vocabulary logits per chunk: diffusion.row_chunk (its temporaries take about 3x the
        bytes per entry of a cross-entropy chunk), or ce_chunk when row_chunk is 0."""
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
        uniform that names the replacement token; a pure function of (seed, step)."""
        return add_token_draw(draw_step_noise(seed, step, global_batch, seq_len, stratified=stratified,
                                              random_length_prob=random_length_prob), seed, step, _TAG_TOK)

    def replaced(self, x0, t, mask_uniform, tok_u) -> torch.Tensor:
        a, _ = self.alpha(t)
        return corrupt(x0, mask_uniform < (1.0 - a)[:, None], absorb=False, mask_id=self.mask_id, tok_u=tok_u,
                       n_real=self.n_real)

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        t = noise_level(noise.u, self.eps)
        xt = self.replaced(x0, t, noise.mask_uniform, noise.extra["tok_u"])
        return Noised(x0=x0, xt=xt, t=t, at=None, doc_ids=doc_ids)

    def row_loss(self, batch: Noised, t: torch.Tensor):
        """The per-row loss over every position (row-major), for the model's chunked all-position loss."""
        B, L = batch.xt.shape
        a, da = self.alpha(t.float())
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
        B, L = batch.x0.shape
        per = model(batch.xt, doc_ids=batch.doc_ids, t=batch.t, row_loss=self.row_loss(batch, batch.t),
                    ce_chunk=self.chunk(ce_chunk))
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
