"""D3PM: discrete-time structured denoising diffusion (Austin et al., NeurIPS 2021; google-research d3pm/text).

Forward process over T steps (diffusion.d3pm_steps), per token, with the N real tokens (the mask id excluded by
its index) and the row convention Q_t[i, j] = q(x_t = j | x_{t-1} = i):
  graph "absorb":  Q_t = (1 - beta_t) I + beta_t 1 e_mask^T   (a token is masked with probability beta_t)
  graph "uniform": Q_t = (1 - beta_t) I + beta_t 1 1^T / N     (redrawn uniformly, possibly to itself)
Both compose in closed form: Qbar_t = Q_1 ... Q_t = abar_t I + (1 - abar_t) [mask column | 1 1^T / N], with
abar_t = prod_{s <= t} (1 - beta_s) (D3PM's polynomial state for the uniform matrix; float64 throughout).
Schedules (diffusion.d3pm_schedule), t = 1..T:
  "standard": beta_t = 1 / (T - t + 1), so abar_t = 1 - t / T (the absorbing schedule of the paper);
  "linear":   beta_t = beta_min + (beta_max - beta_min) (t - 1) / T (D3PM's linear_warmup_from);
  "cosine":   beta_t = clip(1 - f(t) / f(t - 1), 0, 0.999), f(k) = cos((k / T + 0.008) / 1.008 pi / 2) (iDDPM).
For absorb the last step masks everything (beta_T = 1, D3PM's MaskDiffusion), so the prior term is exactly 0;
for uniform the prior KL(q(x_T | x_0) || Uniform) is added to every bound.

Reverse model: the time-conditioned network predicts p~(x_0 | x_t) over the real tokens (the mask logit is set
to -inf: zero mass on the mask), and p(x_{t-1} | x_t) = sum_{x_0} q(x_{t-1} | x_t, x_0) p~(x_0 | x_t) in D3PM's
product form: p(x_{t-1} = y | x_t = z) proportional to Q_t[y, z] (p~ Qbar_{t-1})[y].

Training loss per token (time step t drawn DIRECTLY in {1..T}: t = ceil(u T), u stratified over the global
batch, so t = 1 occurs, unlike MDLM's copy): T [ L_{t-1} + lambda CE(p~, x_0) ], with
L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 2 and -log p(x_0 | x_1) for t = 1 (the same
formula with abar_0 = 1). lambda = diffusion.hybrid_lambda (default 0.01 absorb as in the paper, 0 uniform).
The reference's loss is L_{t-1} + lambda CE; ours is T times it, on the scale of the bound (Adam does not
see the factor; the relative weight of the two terms is the reference's). For absorb, L_{t-1} is zero at
unmasked tokens, and at masked ones it is c_t CE with c_t = (abar_{t-1} - abar_t) / (1 - abar_t), so the
absorbing loss runs on the masked positions only (the CE at unmasked ones only trains a copy that the sampler
never uses).

Bound (eval.ppl), always the pure variational bound, never the hybrid loss:
  "step": the single-step estimator T L_{t-1} + prior, t stratified over the K samples of a sequence;
  "full": the full T-term bound sum_t L_{t-1} + prior, one fresh x_t per t (needs --samples = T).
Sampler: ancestral in min(steps, T) jumps on the integer times round(T - i T / steps) (T / steps steps at a
time when steps divides T), each the closed-form skip posterior; steps = T is D3PM's ancestral sampler.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from .base import EvalDraw, Noised, Objective, StepNoise, draw_step_noise, register
from .common import (RealVocab, add_token_draw, categorical, corrupt, count_forward, enumeration_states,
                     graph_setting, noised_draws, pattern_probs, position_uniforms, real_columns,
                     real_log_probs, real_token_probs, row_sums)
from .mdm import eval_generator
from .uniform import prior_kl

_TAG_TOK, _TAG_EVAL_T, _TAG_EVAL_POS, _TAG_EVAL_TOK = 41, 42, 43, 44


def betas(kind: str, T: int, beta_min: float = 1e-3, beta_max: float = 0.2, absorb: bool = False) -> torch.Tensor:
    """(T + 1,) float64 beta_t for t = 0..T (beta_0 = 0 unused)."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    if kind == "standard":
        b = 1.0 / (T - t + 1.0)
    elif kind == "linear":
        b = beta_min + (beta_max - beta_min) * (t - 1) / T
    elif kind == "cosine":
        def f(k):
            return torch.cos((k / T + 0.008) / 1.008 * math.pi / 2)
        b = (1.0 - f(t) / f(t - 1)).clamp(0.0, 0.999)
    else:
        raise ValueError(f"diffusion.d3pm_schedule={kind!r}; choices: standard, linear, cosine")
    if absorb:
        b[-1] = 1.0  # the last step masks everything (D3PM's MaskDiffusion)
    return torch.cat([torch.zeros(1, dtype=torch.float64), b])


def posterior(p0: torch.Tensor, z: torch.Tensor, ab_s, ab_t, *, graph: str, mask_id: Optional[int]) -> torch.Tensor:
    """(n, V) q(x_s | x_t = z, x_0 ~ p0) in D3PM's product form, s < t: proportional to
    Qbar_{s->t}[y, z] (p0 Qbar_s)[y], for a distribution p0 (n, V) over real tokens (a one-hot gives the
    true posterior). ab_s, ab_t: (n,) or scalars, abar at s and t. Computed in p0's dtype."""
    V = p0.shape[-1]
    keep = real_columns(V, mask_id, p0.dtype, p0.device)
    ab_s = torch.as_tensor(ab_s, dtype=p0.dtype, device=p0.device).expand(p0.shape[0])[:, None]
    ab_t = torch.as_tensor(ab_t, dtype=p0.dtype, device=p0.device).expand(p0.shape[0])[:, None]
    a = torch.where(ab_s > 0, ab_t / ab_s.clamp_min(1e-300), torch.zeros_like(ab_s))  # keep prob from s to t
    onehot = torch.zeros_like(p0).scatter_(-1, z[:, None], 1.0)
    if graph == "absorb":
        m = torch.zeros_like(p0)
        m[:, mask_id] = 1.0
        prior_s = ab_s * p0 + (1 - ab_s) * m  # q(x_s) given p0
        is_mask = (z == mask_id)[:, None]
        trans = torch.where(is_mask, (1 - a) * keep + m, a * onehot)  # Qbar_{s->t}[y, z] over y
    else:
        N = float(keep.sum())
        prior_s = (ab_s * p0 + (1 - ab_s) / N) * keep
        trans = (a * onehot + (1 - a) / N) * keep
    num = trans * prior_s
    return num / num.sum(-1, keepdim=True)


def kl_rows(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (torch.xlogy(q, q) - torch.xlogy(q, p.clamp_min(1e-38)) * (q > 0)).sum(-1)


@register
class D3PM(RealVocab, Objective):
    """d3pm: discrete-time absorbing / uniform diffusion, KL per step + hybrid CE."""
    name = "d3pm"
    title = "discrete-time structured diffusion (D3PM)"
    time_conditioning = True
    head_has_mask = False
    eval_methods = ("step", "full")
    summary = "T discrete steps, absorb|uniform matrices; T (KL_t + lambda CE); t drawn in {1..T}"
    row_loss_bytes = 41  # launch.plan: bytes per logit of a row-loss chunk (benchmarks/row_loss_bytes.py): uniform; absorb 16

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        self.graph = graph_setting(dcfg, mask_id, vocab_size)
        self.T = int(getattr(dcfg, "d3pm_steps", 1000))
        if self.T < 1:
            raise ValueError(f"diffusion.d3pm_steps={self.T} must be >= 1")
        lam = float(getattr(dcfg, "hybrid_lambda", -1.0))
        self.hybrid_lambda = (0.01 if self.graph == "absorb" else 0.0) if lam < 0 else lam
        self.beta = betas(getattr(dcfg, "d3pm_schedule", "standard"), self.T, float(dcfg.d3pm_beta_min),
                          float(dcfg.d3pm_beta_max), absorb=self.graph == "absorb")
        self.abar = torch.cumprod(1.0 - self.beta, 0)  # abar_0 = 1
        self.logits_at = "masked" if self.graph == "absorb" else "all"
        if self.graph == "absorb":
            self.row_loss_bytes = 16  # c_t CE only (the uniform graph's two posteriors and their KL: 41)

    def prior_nats(self) -> float:
        return 0.0 if self.graph == "absorb" else prior_kl(float(self.abar[-1]), self.n_real)

    def level(self, t_int: torch.Tensor) -> torch.Tensor:
        """The network's noise-level input t / T in (0, 1]."""
        return t_int.float() / self.T

    # -- noising and the loss
    def draw(self, seed, step, global_batch, seq_len, *, stratified=True, random_length_prob=0.0) -> StepNoise:
        noise = draw_step_noise(seed, step, global_batch, seq_len, stratified=stratified,
                                random_length_prob=random_length_prob)
        return add_token_draw(noise, seed, step, _TAG_TOK) if self.graph == "uniform" else noise

    def step_of(self, u: torch.Tensor) -> torch.Tensor:
        """u in (0, 1] -> t = ceil(u T) in {1..T}: every step has probability 1 / T."""
        return torch.ceil(u.double() * self.T).long().clamp_(1, self.T)

    def perturb(self, x0, t_int, pos_u, tok_u=None):
        hit = pos_u.double() < (1.0 - self.abar.to(x0.device)[t_int])[:, None]
        return corrupt(x0, hit, absorb=self.graph == "absorb", mask_id=self.mask_id, tok_u=tok_u,
                       n_real=self.n_real if self.graph == "uniform" else 0)

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        t_int = self.step_of(noise.u).to(x0.device)
        xt = self.perturb(x0, t_int, noise.mask_uniform, noise.extra.get("tok_u"))
        at = (xt == self.mask_id) if self.graph == "absorb" else None
        return Noised(x0=x0, xt=xt, t=self.level(t_int), at=at, doc_ids=doc_ids, extra={"t_int": t_int})

    def terms(self, logits, z, x, t_int):
        """(vb, ce) per token: L_{t-1} and CE(p~, x_0), from logits (n, V) at tokens z, clean x, steps t_int."""
        logp = real_log_probs(logits, self.mask_id)
        ce = -logp.gather(-1, x[:, None])[:, 0]
        ab = self.abar.to(logits.device)
        ab_t, ab_s = ab[t_int].to(logits.dtype), ab[t_int - 1].to(logits.dtype)
        if self.graph == "absorb":  # masked positions only: c_t CE
            return (ab_s - ab_t) / (1.0 - ab_t) * ce, ce
        p = posterior(logp.exp(), z, ab_s, ab_t, graph=self.graph, mask_id=self.mask_id)
        q = posterior(torch.nn.functional.one_hot(x, logits.shape[-1]).to(logits.dtype), z, ab_s, ab_t,
                      graph=self.graph, mask_id=self.mask_id)
        return kl_rows(q, p), ce

    def selected(self, xt, scored=None):
        sel = (xt == self.mask_id) if self.graph == "absorb" else torch.ones_like(xt, dtype=torch.bool)
        return sel if scored is None else sel & scored

    def per_token(self, model, x0, xt, t_int, sel, *, train: bool, **kw):
        L = xt.shape[1]
        rows_t = t_int.repeat_interleave(L).reshape(xt.shape)[sel]
        z, x = xt[sel], x0[sel]
        lam = self.hybrid_lambda

        def rows(logits, sl):
            vb, ce = self.terms(logits, z[sl], x[sl], rows_t[sl])
            return self.T * (vb + lam * ce) if train else vb
        return model(xt, logits_at=sel, t=self.level(t_int), row_loss=rows, **kw)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        B, L = batch.x0.shape
        sel = self.selected(batch.xt)
        per = self.per_token(model, batch.x0, batch.xt, batch.extra["t_int"], sel, train=True,
                             doc_ids=batch.doc_ids, ce_chunk=ce_chunk)
        return per.sum() / (B * L), {"noised_frac": (batch.xt != batch.x0).float().mean().detach(),
                                     "prior": torch.tensor(self.prior_nats())}

    def logit_fraction(self, seq_len: int) -> float:
        return float((1.0 - self.abar[1:]).mean()) if self.graph == "absorb" else 1.0

    # -- the bound
    def eval_draw(self, method, *, seed, seq, sample, samples, maskable, eps, group) -> EvalDraw:
        if int(maskable.sum()) == 0:
            raise ValueError("a sequence with no scored positions has nothing to estimate")
        if method == "full":
            if samples != self.T:
                raise ValueError(f"the full bound sums all T = {self.T} terms: use --samples {self.T} "
                                 f"(or --method step)")
            t, weight = sample + 1, 1.0
        elif method == "step":
            u0 = torch.rand(1, generator=eval_generator(seed, _TAG_EVAL_T, seq), dtype=torch.float64).item()
            t, weight = 1 + min(self.T - 1, int(((u0 + sample / samples) % 1.0) * self.T)), float(self.T)
        else:
            raise ValueError(f"unknown estimator {method!r} for d3pm; choices: step, full")
        pos, tok = position_uniforms(seed, maskable.numel(), seq, sample, _TAG_EVAL_POS, _TAG_EVAL_TOK)
        return EvalDraw({"t": t, "pos": pos, "tok": tok, "scored": maskable.clone()}, weight)

    def eval_sums(self, model, x0, draws, *, keep, subs=True):
        t_int, xt, scored = noised_draws(x0, draws, "t", torch.long, self.perturb)
        sel = self.selected(xt, scored)
        return row_sums(draws, sel, keep, lambda kp: self.per_token(model, x0, xt, t_int, sel, train=False,
                                                                    key_padding=kp),
                        prior=self.prior_nats(), scored=scored)

    # -- brute force (tests)
    def states(self) -> list[int]:
        return enumeration_states(self.vocab_size, self.mask_id, self.graph == "absorb")

    def q_table(self, x0, Z, t: int) -> torch.Tensor:
        """(K,) float64 q(Z_k | x0) after t steps."""
        ab = float(self.abar[t])
        if self.graph == "absorb":
            vals = (1.0 - ab, ab, 0.0)
        else:
            vals = ((1 - ab) / self.n_real, ab + (1 - ab) / self.n_real, (1 - ab) / self.n_real)
        return pattern_probs(Z, x0, self.mask_id, *vals)

    def exact_nelbo(self, cond_logprobs, x0) -> float:
        """sum_{t=1..T} E_{x_t ~ q}[sum_i L_{t-1, i}] + L prior, every x_t enumerated. cond_logprobs(Z (K, L),
        t_int) -> (K, L, V) float64 log p~(x_0 | Z) (the mask column is ignored)."""
        L = x0.numel()
        x0 = x0.long()
        Z = torch.tensor(list(itertools.product(self.states(), repeat=L)), dtype=torch.long)
        total = 0.0
        for t in range(1, self.T + 1):
            qz = self.q_table(x0, Z, t)
            live = qz > 0
            Zl = Zl_ = Z[live]
            lp = cond_logprobs(Zl, t).double()
            sel = self.selected(Zl_)
            per = torch.zeros(Zl.shape, dtype=torch.float64)
            n = int(sel.sum())
            if n:
                vb, _ = self.terms(lp[sel], Zl[sel], x0.expand_as(Zl)[sel], torch.full((n,), t, dtype=torch.long))
                per[sel] = vb
            total += float((qz[live] * per.sum(1)).sum())
        return total + L * self.prior_nats()

    # -- generation
    def reverse_step(self, p_x0, z_t, t, s):
        """(N, V) float64 p(x_s | x_t) for levels t > s in (0, 1] (t = t_int / T)."""
        ti, si = round(t * self.T), round(s * self.T)
        return posterior(p_x0.double(), z_t, float(self.abar[si]), float(self.abar[ti]), graph=self.graph,
                         mask_id=self.mask_id)

    @torch.no_grad()
    def generate(self, model, ids, real, *, gen_length: int, steps: int, noise, temperature: float = 0.0,
                 callback=None, stats=None, **_):
        """Ancestral sampling over the T steps in min(steps, T) network calls, on the integer times
        round(T - i T / steps) (T / steps steps at a time when steps divides T), each jump the closed-form skip
        posterior; steps = T is D3PM's ancestral sampler. temperature > 0 divides the logits of p~."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        grid = sorted({round(self.T - i * self.T / steps) for i in range(steps + 1)}, reverse=True)
        stats = stats if stats is not None else {}
        B, P = ids.shape
        G, dev = gen_length, ids.device
        x, kp = self.start_canvas(ids, real, G, noise, absorb=self.graph == "absorb")
        allrows = torch.ones(B, dtype=torch.bool, device=dev)
        for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
            count_forward(stats, B, x.shape[1])
            p0 = real_token_probs(model, x, kp, t / self.T, self.mask_id, temperature)[:, P:]
            V = p0.shape[-1]
            q = posterior(p0.reshape(-1, V), x[:, P:].reshape(-1), float(self.abar[s]), float(self.abar[t]),
                          graph=self.graph, mask_id=self.mask_id)
            x[:, P:] = categorical(q, noise.rows(allrows, G).reshape(-1)).view(B, G)
            if callback is not None:
                callback(i + 1, x)
        return x
