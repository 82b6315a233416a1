"""Hybrid noise (GIDD: von Ruette et al., ICML 2025; dvruette/gidd-easydel): masking mixed with uniform noise.

Forward process, per token: q_t(. | x) = alpha x + beta pi_t, beta = 1 - alpha, with the mixing distribution

    pi_t = rho(t) Uniform(real tokens) + (1 - rho(t)) [mask],   rho = sigmoid(log(alpha / beta) + logit(p_u))
         = alpha p_u / (alpha p_u + beta (1 - p_u))

(gidd-easydel `HybridMixingDistribution.pi_lambda` with scale 1 and shift logit(p_u)); p_u is
`diffusion.uniform_frac`, the uniform share of the noise at log-SNR 0 (alpha = 1/2). Noise is mostly masks
at high noise and mostly uniform tokens near the data. p_u = 0 is masked diffusion (`mdm`), p_u = 1 is
uniform-state diffusion (`uniform`), exactly (tests/test_obj_hybrid.py). alpha is the configured schedule at
t = (1 - eps) u + eps (as mdm), floored at 1e-6 (as uniform).

Loss (GIDD's ELBO, `GiddLoss` / `get_elbo_weights`), written in t rather than log-SNR:

    l = w_t(z) [ KL(q_t(. | x) || q_t(. | x_theta)) + r - log r - 1 ],   r = q_t(z | x) / q_t(z | x_theta)
    w_t(z) = (-alpha' pi_t(z) / alpha + beta d pi_t(z) / dt) / q_t(z | x)
           = -alpha' (1 + rho) / (alpha beta)                          at z = mask
           = -alpha' rho^2 / (alpha N q_t(z | x))                      at a real token z

(GIDD's per-log-SNR weight (pi - dpi/dlambda) / (pi + snr [z = x]) times |dlambda/dt| = -alpha' / (alpha beta)).
E_t E_z sum_positions l + prior is the NELBO; the prior is KL(q_1(. | x) || q_1(. | Uniform)), the
distribution the samplers start from, per token (zero when alpha(1) = 0).

`diffusion.hybrid_weighting: gidd` trains with GIDD's own loss instead: the per-log-SNR weight
w_t alpha beta / (-alpha'), clipped to 1e3, with the IS term scaled by `diffusion.beta_is_div` (GIDD's
defaults): a reweighted ELBO, not a bound, so evaluation always reports the ELBO above.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import Noised, StepNoise, noise_level, register
from .mdm import eval_generator
from .uniform import _TAG_KIND, UniformDiffusion, mixture_log_stats, real_count, uniform_tokens

LOSS_WEIGHT_CLIP = 1e3  # gidd-easydel GiddLoss: loss_weights.clip(0, 1e3)


def mix_rho(a: torch.Tensor, p_u: float) -> torch.Tensor:
    """rho(t): the uniform share of the noise at signal level alpha = a (exactly 0 / 1 at p_u = 0 / 1)."""
    if p_u <= 0.0:
        return torch.zeros_like(a)
    if p_u >= 1.0:
        return torch.ones_like(a)
    return a * p_u / (a * p_u + (1.0 - a) * (1.0 - p_u))


def gidd_nll(logits: torch.Tensor, z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, dalpha: torch.Tensor,
             *, p_u: float, mask_id: int, weighting: str = "elbo", beta_is_div: float = 1.0) -> torch.Tensor:
    """(n,) GIDD's per-token loss (module docstring) for logits (n, V), noised z (n,), clean x (n,), alpha and
    alpha' (n,); weighting "elbo" (the NELBO integrand) or "gidd" (GIDD's training weights)."""
    V = logits.shape[-1]
    N = real_count(V, mask_id)
    dt = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    a, da = alpha.to(dt), dalpha.to(dt)
    b = 1.0 - a
    rho = mix_rho(a, p_u)
    c0 = b * rho / N  # q_t(y | x) of a real token y != x (the uniform part of the noise)
    is_mask = z == mask_id
    zs = torch.where(is_mask, x, z)  # a safe index; the mask branch is masked out below
    # log q_t(y | x_theta) = log(alpha x_theta_y + c0) at the real tokens: its sum S and its values at x and
    # zs are all the loss reads of the logits (in log space at x and zs: finite when c0 = 0)
    S, lg = mixture_log_stats(logits, a, c0, torch.stack([x, zs], -1), mask_id=mask_id)
    log_px, log_pz = lg[:, 0], lg[:, 1]
    pos = c0 > 0
    kl = (N - 1) * torch.xlogy(c0, c0) + torch.xlogy(a + c0, a + c0) - torch.where(pos, c0 * S, 0.0) - a * log_px
    qz = a * (zs == x).to(dt) + c0
    ok = ~is_mask & pos  # without uniform noise (c0 = 0) a real z is x itself, whose weight is 0
    log_r = torch.where(ok, qz, 1.0).log() - torch.where(ok, log_pz, 0.0)
    is_div = torch.where(ok, log_r.exp() - log_r - 1.0, 0.0)
    w_mask = -da * (1.0 + rho) / (a * b)
    w_real = -da * rho ** 2 / (a * N * torch.where(ok, qz, 1.0))
    w = torch.where(is_mask, w_mask, torch.where(ok, w_real, 0.0))
    if weighting == "elbo":
        return w * (kl + is_div)
    lam_w = (w * a * b / (-da)).clamp(0.0, LOSS_WEIGHT_CLIP)  # GIDD's loss_weights (per unit log-SNR)
    return lam_w * (kl + beta_is_div * is_div)


@register
class HybridDiffusion(UniformDiffusion):
    """hybrid: GIDD's mask + uniform mixing with p_u = diffusion.uniform_frac; the ELBO at every position."""
    name = "hybrid"
    title = "hybrid (mask + uniform) diffusion"
    head_has_mask = False
    eval_methods = ("t", "mdlm")
    summary = "GIDD: masks mixed with uniform tokens (uniform_frac); KL + IS ELBO at every position"
    row_loss_bytes = 16  # launch.plan: the fused statistics, as uniform (benchmarks/row_loss_bytes.py: 0 + 12)

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        self.p_u = float(getattr(dcfg, "uniform_frac", 0.5))
        if not 0.0 <= self.p_u <= 1.0:
            raise ValueError(f"diffusion.uniform_frac={self.p_u} must be in [0, 1] (0: masked, 1: uniform)")
        self.weighting = getattr(dcfg, "hybrid_weighting", "elbo")
        if self.weighting not in ("elbo", "gidd"):
            raise ValueError(f"diffusion.hybrid_weighting={self.weighting!r}; choices: elbo, gidd")
        self.beta_is_div = float(getattr(dcfg, "beta_is_div", 1.0))

    def _need_mask(self):
        if self.mask_id is None or self.vocab_size is None or not 0 <= self.mask_id < self.vocab_size:
            raise ValueError("diffusion.objective=hybrid needs a mask token inside the vocabulary (model.mask_id)")

    def draw(self, seed, step, global_batch, seq_len, *, stratified=True, random_length_prob=0.0) -> StepNoise:
        """uniform's draw plus a uniform per position choosing mask or uniform token for the noised ones."""
        noise = super().draw(seed, step, global_batch, seq_len, stratified=stratified,
                             random_length_prob=random_length_prob)
        noise.extra["kind_u"] = torch.rand(global_batch, seq_len, generator=eval_generator(seed, _TAG_KIND, step))
        noise.positional = noise.positional + ("kind_u",)
        return noise

    def replaced_mixed(self, x0, t, mask_uniform, tok_u, kind_u) -> torch.Tensor:
        self._need_mask()
        a, _ = self.alpha(t)
        hit = mask_uniform < (1.0 - a)[:, None]
        uni = kind_u < mix_rho(a, self.p_u)[:, None]
        noise_tok = torch.where(uni, uniform_tokens(tok_u, self.n_real, self.mask_id).to(x0.device),
                                torch.full_like(x0, self.mask_id))
        return torch.where(hit, noise_tok, x0)

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        t = noise_level(noise.u, self.eps)
        xt = self.replaced_mixed(x0, t, noise.mask_uniform, noise.extra["tok_u"], noise.extra["kind_u"])
        return Noised(x0=x0, xt=xt, t=t, at=None, doc_ids=doc_ids)

    def eval_noised(self, x0, draws, t):
        from .base import pad
        dev = x0.device
        L = x0.shape[1]
        pos, _ = pad([d.noise["pos"] for d in draws], 2.0, dev, length=L)
        tok, _ = pad([d.noise["tok"] for d in draws], 0.0, dev, length=L)
        kind, _ = pad([d.noise["kind"] for d in draws], 1.0, dev, length=L)
        scored, _ = pad([d.noise["scored"] for d in draws], False, dev, length=L)
        xt = self.replaced_mixed(x0, t, pos, tok, kind)
        return torch.where(scored, xt, x0), scored

    def token_loss(self, logits, z, x, a, da, weighting: Optional[str] = None):
        return gidd_nll(logits, z, x, a, da, p_u=self.p_u, mask_id=self.mask_id,
                        weighting=weighting or "elbo", beta_is_div=self.beta_is_div)

    def train_token_loss(self, logits, z, x, a, da):
        return self.token_loss(logits, z, x, a, da, weighting=self.weighting)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        loss, stats = super().loss(model, batch, ce_chunk=ce_chunk)
        stats["masked_frac"] = (batch.xt == self.mask_id).float().mean().detach()
        return loss, stats

    def prior_nats(self) -> float:
        """KL(q_1(. | x) || q_1(. | Uniform)) per token."""
        self._need_mask()
        a = float(self.alpha(torch.ones(1, dtype=torch.float64))[0][0])
        N = self.n_real
        c0 = (1 - a) * float(mix_rho(torch.tensor(a, dtype=torch.float64), self.p_u)) / N
        px = a / N + c0
        kl = (a + c0) * math.log((a + c0) / px)
        if c0 > 0:
            kl += (N - 1) * c0 * math.log(c0 / px)
        return kl

    # -- brute force and generation
    def states(self) -> list[int]:
        return list(range(self.vocab_size))

    def noise_dist(self, a: float, V: int) -> torch.Tensor:
        rho = float(mix_rho(torch.tensor(a, dtype=torch.float64), self.p_u))
        pi = torch.full((V,), rho / self.n_real, dtype=torch.float64)
        pi[self.mask_id] = 1.0 - rho
        return pi

    def reverse_step(self, p_x0, z_t, t, s):
        """(n, V) float64: p(z_s | z_t) = q_{t|s}(z_t | z_s) q_s(z_s | p_x0) / q_t(z_t | p_x0), with
        q_{t|s}(z | y) = (alpha_t / alpha_s) [y = z] + beta_t pi_t(z) - (alpha_t / alpha_s) beta_s pi_s(z)
        (gidd-easydel `ancestral_sampling_step`, the product form; exact Bayes for a one-hot p_x0)."""
        a_t, a_s = self.step_alphas(t, s)
        V = p_x0.shape[-1]
        pi_t, pi_s = self.noise_dist(a_t, V).to(p_x0.device), self.noise_dist(a_s, V).to(p_x0.device)
        p = p_x0.double()
        q_s = a_s * p + (1 - a_s) * pi_s
        q_t_z = a_t * p.gather(-1, z_t[:, None]) + (1 - a_t) * pi_t[z_t][:, None]
        a_ts = a_t / a_s
        trans = (1 - a_t) * pi_t[z_t] - a_ts * (1 - a_s) * pi_s[z_t]  # (n,) the part that does not need y = z
        onehot = torch.zeros_like(p).scatter_(-1, z_t[:, None], 1.0)
        return q_s * (a_ts * onehot + trans[:, None]) / q_t_z

    def prior_sample(self, u: torch.Tensor) -> torch.Tensor:
        """z_1 ~ q_1(. | Uniform): a uniform token with probability alpha(1) + beta(1) rho(1), else a mask."""
        a = self.alpha_at(1.0)
        rho = float(mix_rho(torch.tensor(a, dtype=torch.float64), self.p_u))
        return torch.where(u[..., 0] < a + (1 - a) * rho, uniform_tokens(u[..., 1], self.n_real, self.mask_id),
                           torch.full(u.shape[:-1], self.mask_id, dtype=torch.long, device=u.device))
