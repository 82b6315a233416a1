"""GenMD4 (Shi et al., NeurIPS 2024; google-deepmind/md4 `genmd4.py`): masked diffusion with a learned,
state-dependent masking schedule, one exponent per vocabulary entry.

Schedule: token v is still clean at time t with probability (alpha_t)_v = 1 - (1 - mask_eps) t^{w_v}, with
w_v = softplus(w_hat_v) learned (initialised to power_init = 1, the linear schedule), so alpha_0 = 1 exactly
and alpha_1 = mask_eps (md4's eps = 1e-4; `diffusion.genmd4.mask_eps`). The forward process masks a token with
a probability that depends on its value.

Loss for one masked draw z at time t (per sequence; mu_n = softmax of the network's logits at position n with
the mask logit removed):
    L_diff(z) = (1/t) sum_{n : z_n = mask} [ w_{x_n} (-log mu_n(x_n) - 1) + sum_v w_v mu_n(v) ]
the continuous-time KL rate between the true and the model's reverse rates (w_v / t) mu(v); with every w_v = k
it is MD4's poly-k loss (k/t) sum_masked -log mu_n(x_n). The sum over v needs full softmax rows at masked
positions: computed by the model's chunked `row_loss` path, so (N, V) logits never exist whole.

The masks depend on w, so the gradient in w has a score-function part: with samples_per_t = 2 (GenMD4) two
masks share t and the leave-one-out REINFORCE term
    R = 0.5 stopgrad(L_diff(z1) - L_diff(z2)) (log q(z1|x) - log q(z2|x))
is added (mean zero, its gradient is the RLOO estimate of E[L grad_w log q]); with samples_per_t = 1 (the
ablation of md4 issue 4) it is the plain score-function term stopgrad(L_diff(z)) log q(z|x), unbiased but with
no baseline. Reconstruction (model-free): sum_n (1 - mask_eps) t1^{w_{x_n}} (-log softmax_v(w_v log t1)[x_n]),
the probability of being masked at t1 times the cross-entropy of guessing x_n from the schedule alone;
t1 = diffusion.eps, the same t1 at which t = (1 - t1) u + t1 starts. The prior term is neglected (alpha_1 =
mask_eps), as in the reference.

The differentiated loss is mean(L_diff + R) + recon; the NELBO mean(L_diff) + recon is what is logged
(stats["nelbo"]); R has mean zero but is not zero. Everything is per token: divided by B * L like mdm.

The exponents are an nn.Module (`VocabExponents`) that `init_modules` attaches to the model as
`model.noise_schedule` before parallelization, so the optimizer trains them, checkpoints hold them, and they
are resharded like everything else. They are excluded from weight decay (`no_decay_prefixes`): a deliberate
difference from the reference, whose AdamW decays w_hat towards 0 (w -> softplus(0) = 0.69).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import EvalDraw, Noised, Objective, StepNoise, draw_step_noise, noise_level, pad, register
from .mdm import _TAG_POS, MaskedDiffusion, autocast_for, draw_mask, eval_generator

MODULE_NAME = "noise_schedule"


class VocabExponents(nn.Module):
    """GenMD4's learned exponents: a (V,) parameter w_hat; forward() returns w = softplus(w_hat) in fp32.

    Call the module (not the parameter) to read w, so FSDP's hooks gather it when it is sharded."""
    initialises_itself = True  # Transformer.init_weights leaves it to reset_parameters

    def __init__(self, vocab_size: int, power_init: float = 1.0):
        super().__init__()
        self.power_init = float(power_init)
        self.w_hat = nn.Parameter(torch.empty(vocab_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.w_hat.fill_(math.log(math.expm1(self.power_init)))  # softplus^{-1}(power_init)

    def forward(self) -> torch.Tensor:
        w_hat = self.w_hat.full_tensor() if hasattr(self.w_hat, "full_tensor") else self.w_hat
        return F.softplus(w_hat.float())


def exponents_module(model) -> VocabExponents:
    """The model's VocabExponents, through DDP / torch.compile wrappers."""
    m = model
    while not hasattr(m, MODULE_NAME):
        inner = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
        if inner is None:
            raise ValueError("diffusion.objective=genmd4 needs the model's learned exponents "
                             f"(model.{MODULE_NAME}): call objective.init_modules(model) before training or "
                             "loading")
        m = inner
    return getattr(m, MODULE_NAME)


def mask_prob(x0: torch.Tensor, t: torch.Tensor, w: torch.Tensor, mask_eps: float) -> torch.Tensor:
    """(B, L): 1 - (alpha_t)_{x0} = (1 - mask_eps) t^{w_{x0}}."""
    return (1.0 - mask_eps) * t.to(w.dtype)[:, None] ** w[x0]


def log_q(x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, w: torch.Tensor, mask_eps: float,
          keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,): log q(z | x0, t) of the mask pattern, differentiable in w."""
    wx = w[x0]
    logt = torch.log(t.to(w.dtype))[:, None]
    lq_mask = math.log1p(-mask_eps) + wx * logt
    lq_keep = torch.log1p(-(1.0 - mask_eps) * torch.exp(wx * logt))
    out = torch.where(masked, lq_mask, lq_keep)
    if keep is not None:
        out = out * keep
    return out.sum(1)


def recon_loss(x0: torch.Tensor, w: torch.Tensor, t1: float, mask_eps: float, mask_id: int,
               keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,): sum_n (1 - mask_eps) t1^{w_{x_n}} * -log softmax_v(w_v log t1)[x_n] (the mask id excluded)."""
    logits = w * math.log(t1)
    logits = logits.masked_fill(torch.arange(w.numel(), device=w.device) == mask_id, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    per = (1.0 - mask_eps) * torch.exp(w[x0] * math.log(t1)) * -logp[x0]
    if keep is not None:
        per = per * keep
    return per.sum(1)


def diffusion_rows(logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(N,): w_{x} (-log mu(x) - 1) + sum_v w_v mu(v) per masked row (without the 1/t), mu the softmax with the
    mask logit removed (SUBS)."""
    logits = logits.float()
    if mask_id < logits.shape[-1]:
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    wv = w[:logits.shape[-1]]
    return w[targets] * (nll - 1.0) + (logp.exp() * wv).sum(-1)


def diffusion_loss(model, x0, xt, masked, t, w, *, mask_id, doc_ids=None, key_padding=None, ce_chunk=0,
                   time_conditioned=False) -> torch.Tensor:
    """(B,): L_diff(z) per sequence, through the model's chunked row_loss (full softmax rows at masked rows)."""
    targets = x0[masked]

    def row_loss(logits, rows):
        return diffusion_rows(logits, targets[rows], w, mask_id)
    kw = {"t": t} if time_conditioned else {}
    if key_padding is not None:
        kw["key_padding"] = key_padding
    r = model(xt, doc_ids=doc_ids, logits_at=masked, row_loss=row_loss, ce_chunk=ce_chunk, **kw)
    rows = masked.nonzero()[:, 0]
    sums = torch.zeros(x0.shape[0], dtype=r.dtype, device=x0.device).index_add(0, rows, r)
    return sums / t.to(r.dtype)


@register
class GenMD4(Objective):
    """genmd4: per-token learned exponents, value-dependent masking, RLOO REINFORCE for the exponents."""
    name = "genmd4"
    title = "GenMD4 (learned per-token masking schedule)"
    eval_methods = ("t", "mdlm")
    summary = "absorbing noise with learned per-token schedules 1 - t^{w_v}; full-row loss + RLOO for w"
    no_decay_prefixes = (MODULE_NAME + ".",)
    logged_stats = ("w_min", "w_mean", "w_max")

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        g = dcfg.genmd4
        if g.samples_per_t not in (1, 2):
            raise ValueError(f"diffusion.genmd4.samples_per_t={g.samples_per_t} must be 1 or 2 (2: GenMD4's "
                             f"two masks per t with leave-one-out REINFORCE; 1: the md4 issue 4 ablation)")
        if not 0.0 <= g.mask_eps < 1.0:
            raise ValueError(f"diffusion.genmd4.mask_eps={g.mask_eps} must be in [0, 1) (md4 uses 1e-4)")
        if not g.power_init > 0:
            raise ValueError(f"diffusion.genmd4.power_init={g.power_init} must be > 0 (1: linear)")
        if not 0.0 < dcfg.eps < 1.0:
            raise ValueError(f"diffusion.eps={dcfg.eps} is GenMD4's t1 and must be in (0, 1) (md4: 1e-3)")
        self.samples_per_t, self.mask_eps, self.power_init = g.samples_per_t, g.mask_eps, g.power_init
        self.eps = dcfg.eps
        self.learn = bool(g.learn_exponents)
        self.reinforce = self.learn  # tests switch it off (the negative control of the gradient test)
        self.module: Optional[VocabExponents] = None

    # -- the learned parameters
    def check_model(self, mcfg) -> None:
        super().check_model(mcfg)
        if getattr(mcfg, "mask_id", None) is not None and mcfg.mask_id >= mcfg.vocab_size:
            raise ValueError("diffusion.objective=genmd4 needs the mask id inside the output head "
                             "(model.mask_id < model.vocab_size)")

    def init_modules(self, model) -> None:
        if not hasattr(model, MODULE_NAME):
            setattr(model, MODULE_NAME, VocabExponents(model.cfg.vocab_size, self.power_init))
        self.module = getattr(model, MODULE_NAME)
        if not self.learn:  # the ablation: MD4's poly-(power_init) schedule, frozen, with 1 or 2 masks per t
            self.module.w_hat.requires_grad_(False)

    def exponents(self, model=None) -> torch.Tensor:
        """w (V,) fp32: the model's (through its module, so FSDP gathers it), or the attached module's."""
        if model is not None:
            return exponents_module(model)()
        if self.module is None:
            raise ValueError("genmd4 has no exponents yet: call init_modules(model) first")
        return self.module()

    def w_stats(self, w: torch.Tensor) -> dict:
        """Min/mean/max of w over real tokens (the mask id's entry is never used)."""
        real = w.detach()
        if self.mask_id is not None and self.mask_id < real.numel():
            real = torch.cat([real[:self.mask_id], real[self.mask_id + 1:]])
        return {"w_min": real.min(), "w_mean": real.mean(), "w_max": real.max()}

    # -- noise and loss
    def draw(self, seed, step, global_batch, seq_len, *, stratified=True, random_length_prob=0.0) -> StepNoise:
        noise = draw_step_noise(seed, step, global_batch, seq_len, stratified=stratified,
                                random_length_prob=random_length_prob)
        if self.samples_per_t == 2:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + step + 0x5EED) & 0x7FFF_FFFF_FFFF_FFFF)
            noise.extra["mask_uniform2"] = torch.rand(global_batch, seq_len, generator=gen)
            noise.positional = ("mask_uniform2",)
        return noise

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        """The masks depend on the current w, so they are drawn in loss() from these uniforms; xt is x0 here."""
        t = noise_level(noise.u, self.eps)
        extra = {"mask_uniform": noise.mask_uniform}
        if self.samples_per_t == 2:
            extra["mask_uniform2"] = noise.extra["mask_uniform2"]
        return Noised(x0=x0, xt=x0, t=t, doc_ids=doc_ids, extra=extra)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        x0, t = batch.x0, batch.t
        B, L = x0.shape
        w = self.exponents(model)
        cond = MaskedDiffusion._conditioned(model)
        p_mask = mask_prob(x0, t, w.detach(), self.mask_eps)
        keys = ["mask_uniform"] + (["mask_uniform2"] if self.samples_per_t == 2 else [])
        diffs, lqs, fracs = [], [], []
        for key in keys:
            masked = batch.extra[key] < p_mask
            xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
            diffs.append(diffusion_loss(model, x0, xt, masked, t, w, mask_id=self.mask_id, doc_ids=batch.doc_ids,
                                        ce_chunk=ce_chunk, time_conditioned=cond))
            lqs.append(log_q(x0, masked, t, w, self.mask_eps))
            fracs.append(masked.float().mean())
        diff = sum(diffs) / len(diffs)
        if not self.reinforce:
            reinforce = torch.zeros_like(diff)
        elif len(diffs) == 2:
            reinforce = 0.5 * (diffs[0] - diffs[1]).detach() * (lqs[0] - lqs[1])
        else:
            reinforce = diffs[0].detach() * lqs[0]
        recon = recon_loss(x0, w, self.eps, self.mask_eps, self.mask_id)
        loss = (diff + reinforce + recon).sum() / (B * L)
        stats = {"nelbo": ((diff + recon).sum() / (B * L)).detach(), "recon": (recon.sum() / (B * L)).detach(),
                 "masked_frac": (sum(fracs) / len(fracs)).detach(), **self.w_stats(w)}
        return loss, stats

    def logit_fraction(self, seq_len: int) -> float:
        """E_t[1 - alpha_t] at initialisation (w = power_init), per network pass (forward_passes counts the
        masks per t)."""
        k = self.power_init
        return (1.0 - self.mask_eps) * (1.0 - self.eps ** (k + 1)) / ((k + 1) * (1.0 - self.eps))

    @property
    def forward_passes(self) -> int:
        return self.samples_per_t  # one network pass per mask

    # -- the bound
    def eval_draw(self, method, *, seed, seq, sample, samples, maskable, eps, group) -> EvalDraw:
        """t from masked diffusion's "t"/"mdlm" streams (the same t and position uniforms); the mask itself
        depends on w and is drawn in eval_sums. The weight is 1: L_diff already carries its 1/t."""
        if method not in self.eval_methods:
            raise ValueError(f"unknown estimator {method!r} for genmd4; choices: {', '.join(self.eval_methods)}")
        _, inv_t = draw_mask(method, seed=seed, seq=seq, sample=sample, samples=samples, maskable=maskable, eps=eps,
                             group=group)
        pos = torch.rand(maskable.numel(), generator=eval_generator(seed, _TAG_POS, seq, sample),
                         dtype=torch.float64)
        return EvalDraw((1.0 / inv_t, pos, maskable, eps), 1.0)

    def eval_sums(self, model, x0, draws, *, keep, subs=True):
        """(R,): L_diff(z) + recon per row, the mask drawn with the model's w over the maskable positions."""
        w = self.exponents(model).double()
        t = torch.tensor([d.noise[0] for d in draws], dtype=torch.float64, device=x0.device)
        pos, _ = pad([d.noise[1] for d in draws], 2.0, x0.device, length=x0.shape[1])
        maskable, _ = pad([d.noise[2] for d in draws], False, x0.device, length=x0.shape[1])
        t1 = draws[0].noise[3]
        masked = (pos < mask_prob(x0, t, w, self.mask_eps)) & maskable
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        kp = None if keep is None or bool(keep.all()) else keep
        kw = {"t": t.float()} if MaskedDiffusion._conditioned(model) else {}
        with autocast_for(x0.device):
            logits = model(xt, key_padding=kp, logits_at=masked, **kw)
        r = diffusion_rows(logits.float(), x0[masked], w.float(), self.mask_id).double()
        rows = masked.nonzero()[:, 0]
        diff = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device).index_add_(0, rows, r) / t
        recon = recon_loss(x0, w, t1, self.mask_eps, self.mask_id, keep=maskable)
        return (diff + recon).cpu() * torch.tensor([d.weight for d in draws], dtype=torch.float64)

    def exact_nelbo(self, cond_logprobs, x0, *, w: Optional[torch.Tensor] = None, panels: int = 48,
                    nodes: int = 24) -> float:
        """The expectation of the estimator for one short sequence: every mask pattern enumerated, t integrated
        by Gauss-Legendre in log t over [t1, 1] (composite, `panels` x `nodes`), divided by (1 - t1) (t is
        uniform on [t1, 1]), plus the reconstruction term. cond_logprobs(xt (L,), t) -> (L, V) float64
        log-probabilities of the clean token given the input xt at time t (the mask logit is ignored)."""
        w = (self.exponents() if w is None else w).detach().double()
        t_nodes, t_weights = log_t_quadrature(self.eps, panels, nodes)
        total = 0.0
        for t, qw in zip(t_nodes, t_weights):
            total += qw * self.expected_diffusion(cond_logprobs, x0, w, t)
        recon = float(recon_loss(x0[None], w, self.eps, self.mask_eps, self.mask_id)[0])
        return total / (1.0 - self.eps) + recon

    def expected_diffusion(self, cond_logprobs, x0, w, t: float) -> torch.Tensor:
        """E_z[L_diff(z) | x0, t] by enumerating the 2^L mask patterns (differentiable in w when cond_logprobs
        does not depend on w)."""
        L = x0.numel()
        tt = torch.tensor([t], dtype=torch.float64)
        out = 0.0
        for pattern in itertools.product((False, True), repeat=L):
            masked = torch.tensor(pattern)[None]
            q = torch.exp(log_q(x0[None], masked, tt, w, self.mask_eps))[0]
            if not any(pattern):
                continue
            xt = torch.where(masked[0], torch.full_like(x0, self.mask_id), x0)
            logp = cond_logprobs(xt, t).double()
            r = diffusion_rows(logp[masked[0]], x0[masked[0]], w, self.mask_id)
            out = out + q * r.sum() / t
        return out

    # -- generation
    def alpha(self, t: float) -> torch.Tensor:
        """(V,) float64: (alpha_t)_v = 1 - (1 - mask_eps) t^{w_v}, the probability of token v being clean at t."""
        w = self.exponents().detach().double()
        return 1.0 - (1.0 - self.mask_eps) * torch.as_tensor(t, dtype=torch.float64) ** w

    def unmask_prob(self, t: float, s: float) -> torch.Tensor:
        """(V,) float64: P(a position masked at t, whose token is v, is clean at s) = 1 - (s / t)^{w_v}
        (= ((alpha_s)_v - (alpha_t)_v) / (1 - (alpha_t)_v); 1 at s = 0, MD4's final decode)."""
        w = self.exponents().detach().double()
        if s <= 0:
            return torch.ones_like(w)
        return 1.0 - (s / t) ** w

    def reverse_step(self, p_x0, z_t, t, s):
        """P(z_s = v) = mu(v) (1 - (s/t)^{w_v}) at a masked position, the rest stays masked; clean positions
        are kept. p_x0 (N, V) is the network's clean-token distribution (mask entry 0)."""
        p = self.unmask_prob(t, s).to(p_x0.device)
        out = p_x0.double() * p[:p_x0.shape[-1]]
        out[:, self.mask_id] = 0.0
        out[:, self.mask_id] = 1.0 - out.sum(-1)
        clean = z_t != self.mask_id
        out[clean] = F.one_hot(z_t[clean], out.shape[-1]).double()
        return out


def log_t_quadrature(t1: float, panels: int = 48, nodes: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Nodes t_i and weights c_i with sum_i c_i f(t_i) ~ int_{t1}^1 f(t) dt: composite Gauss-Legendre in
    u = log t (dt = t du), accurate for integrands like t^{w - 1} that are singular in t but smooth in log t."""
    x, wq = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(math.log(t1), 0.0, panels + 1)
    ts, cs = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        u = 0.5 * (b - a) * x + 0.5 * (b + a)
        ts.append(np.exp(u))
        cs.append(0.5 * (b - a) * wq * np.exp(u))
    return np.concatenate(ts), np.concatenate(cs)


def unmask_order(w: torch.Tensor, decode, k: int = 20, mask_id: Optional[int] = None,
                 n_real: Optional[int] = None) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The k tokens that unmask first and the k that unmask last in generation, with their exponents.

    P(still masked at t) = t^{w_v}: going from t = 1 down to 0 a token with a large w_v is clean early (its
    median unmasking time is 2^{-1/w_v}), one with a small w_v late. n_real: the tokenizer's vocabulary (padded
    head entries after it are skipped)."""
    w = w.detach().double().cpu()
    ids = [i for i in range(n_real or w.numel()) if i != mask_id]
    order = sorted(ids, key=lambda i: -float(w[i]))
    name = lambda i: (repr(decode([i])), float(w[i]))  # noqa: E731
    return [name(i) for i in order[:k]], [name(i) for i in order[-k:][::-1]]
