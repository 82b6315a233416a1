"""ReMDM (Wang, Schiff, Sahoo, Kuleshov, NeurIPS 2025; kuleshov-group/remdm `diffusion.py::_ddpm_caching_update`,
`_sample`): a sampler for masked-diffusion checkpoints that may re-mask tokens it has already decoded, so
later steps can correct them. No retraining: any `mdm` or `genmd4` checkpoint.

One step t -> s < t, per position, with alpha the probability of being clean and sigma the remasking probability:
  - decoded (z_t = v != mask): stays v w.p. 1 - sigma, is re-masked w.p. sigma;
  - masked: becomes v w.p. p_theta(v) (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t), stays masked otherwise.
For any valid sigma (0 <= sigma <= min(1, (1 - alpha_s) / alpha_t)) the marginal P(z_s = x) = alpha_s is kept.
sigma = 0 is MDLM's ancestral step. The strategies (`strategy`, with `eta`), as the reference has them:
  - cap:     sigma = min(eta, (1 - alpha_s) / alpha_t)            (eta if alpha_t = 0)
  - rescale: sigma = eta * min(1, (1 - alpha_s) / alpha_t)         (eta if alpha_t = 0); ReMDM's own rule
  - conf:    sigma_l = softmax_l(psi) * min(1, (1 - alpha_s) / alpha_t) over decoded positions, where psi_l is
             minus the probability the decoded token had when it was decoded (-inf while masked / re-masked):
             low-confidence tokens are re-masked first; no eta
  - loop:    t > t_on: MDLM steps on alpha(t) = alpha_on (1 - t) / (1 - t_on); t <= t_off: MDLM steps on
             alpha(t) = 1 - t (1 - alpha_on) / t_off; in between ReMDM at constant alpha = alpha_on with
             sigma = eta (masks and re-masks balance, the number of masks stays constant in expectation).
Time grid (the reference's `_sample`): t_i = linspace(1, t_min = 1e-5, steps + 1), s = t - dt. The schedule
is the checkpoint's (linear alpha = 1 - t as in the reference; genmd4's per-token alpha_v(t), every quantity
above then a (V,) vector per token value); `loop` uses its own scalar profile for every objective. Top-p is the
reference's nucleus: tokens sorted by probability, those whose cumulative probability is <= top_p kept (the
first always), renormalised: stricter than the usual rule, the token that crosses top_p is dropped. After the
last step, positions still masked take the argmax of the model (the reference's noise_removal).
Categorical draws are inverse-CDF in float64 from one uniform per position, drawn from the row's generator,
so with one generator per row the output is batch-invariant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .decoding import ban_eos, forward_logits

STRATEGIES = ("cap", "rescale", "conf", "loop")
Alpha = Union[float, torch.Tensor]  # a scalar, or a (V,) vector per token value (genmd4)


@dataclass
class ReMDMConfig:
    strategy: str = "rescale"
    eta: float = 0.015  # the reference scripts: cap 0.008, rescale 0.015, loop 0.02 (conf has none)
    top_p: float = 0.9  # nucleus (1: off); the reference scripts use 0.9
    t_on: float = 0.55  # loop
    t_off: float = 0.05  # loop
    alpha_on: float = 0.9  # loop
    t_min: float = 1e-5

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown remdm strategy {self.strategy!r}; choices: {', '.join(STRATEGIES)}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"remdm eta={self.eta} must be in [0, 1] (a remasking probability)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"remdm top_p={self.top_p} must be in (0, 1] (1: off)")
        if not 0.0 < self.t_off < self.t_on < 1.0 or not 0.0 < self.alpha_on < 1.0:
            raise ValueError(f"remdm loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1 (got t_on={self.t_on}, "
                             f"t_off={self.t_off}, alpha_on={self.alpha_on})")


def nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """ReMDM's top-p on (N, V) probabilities: keep the sorted tokens whose cumulative probability is <= top_p
    (always the first), renormalise."""
    if top_p >= 1.0:
        return p
    sp, idx = torch.sort(p, descending=True, dim=-1)
    keep = sp.cumsum(-1) <= top_p
    keep[..., 0] = True
    sp = sp * keep
    sp = sp / sp.sum(-1, keepdim=True)
    return torch.zeros_like(p).scatter_(-1, idx, sp)


def sigma_max(alpha_t: Alpha, alpha_s: Alpha) -> Alpha:
    """min(1, (1 - alpha_s) / alpha_t), and 1 where alpha_t = 0."""
    if torch.is_tensor(alpha_t) or torch.is_tensor(alpha_s):
        a_t, a_s = torch.as_tensor(alpha_t, dtype=torch.float64), torch.as_tensor(alpha_s, dtype=torch.float64)
        return torch.where(a_t > 0, torch.clamp((1 - a_s) / a_t.clamp_min(1e-300), max=1.0), torch.ones_like(a_t))
    return min(1.0, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0


def sigma_for(strategy: str, eta: float, alpha_t: Alpha, alpha_s: Alpha) -> Alpha:
    """The remasking probability of cap / rescale (ReMDM's rule: eta * min(1, ...)) and of the conf bound."""
    if strategy == "cap":
        if torch.is_tensor(alpha_t) or torch.is_tensor(alpha_s):
            a_t = torch.as_tensor(alpha_t, dtype=torch.float64)
            a_s = torch.as_tensor(alpha_s, dtype=torch.float64)
            return torch.where(a_t > 0, torch.clamp((1 - a_s) / a_t.clamp_min(1e-300), max=eta),
                               torch.full_like(a_t, eta))
        return min(eta, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else eta
    if strategy == "rescale":
        return eta * sigma_max(alpha_t, alpha_s)
    if strategy == "conf":
        return sigma_max(alpha_t, alpha_s)
    raise ValueError(f"no sigma rule for {strategy!r}")


def _per_token(a: Alpha, V: int, device) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float64, device=device)
    return a.expand(V) if a.ndim == 0 else a[:V]


def step_probs(p_x0: torch.Tensor, z_t: torch.Tensor, alpha_t: Alpha, alpha_s: Alpha, sigma, mask_id: int, *,
               per_position: bool = False) -> torch.Tensor:
    """(N, V) float64 transition probabilities of N positions z_t (N,) from t to s. p_x0 (N, V): the model's
    clean-token distribution (its mask entry is ignored). alpha_t/alpha_s: scalars or (V,) per token value
    (alpha_t < 1). sigma: a scalar or a (V,) vector per token value; per_position: an (N,) vector (conf)."""
    N, V = p_x0.shape
    dev = p_x0.device
    a_t, a_s = _per_token(alpha_t, V, dev), _per_token(alpha_s, V, dev)
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=dev)
    if per_position:
        sig_rows = sig[:, None]  # (N, 1)
        sig_dec = sig
    else:
        sig_rows = _per_token(sig, V, dev)[None]  # (1, V)
        sig_dec = sig_rows[0][z_t.clamp_max(V - 1)]
    p = p_x0.double().clone()
    p[:, mask_id] = 0.0
    unmask = (a_s[None] - (1.0 - sig_rows) * a_t[None]) / (1.0 - a_t[None]).clamp_min(1e-300)
    out = p * unmask
    out[:, mask_id] = 0.0
    out[:, mask_id] = 1.0 - out.sum(-1)
    decoded = z_t != mask_id
    if bool(decoded.any()):
        zd, s_dec = z_t[decoded], sig_dec[decoded]
        rows = torch.zeros(zd.numel(), V, dtype=torch.float64, device=dev)
        rows.scatter_(1, zd[:, None], (1.0 - s_dec)[:, None])
        rows[:, mask_id] += s_dec
        out[decoded] = rows
    return out


def time_grid(steps: int, t_min: float = 1e-5) -> list[tuple[float, float]]:
    """The reference's (t, s) pairs: t_i = linspace(1, t_min, steps + 1)[i], s = t - (1 - t_min) / steps."""
    ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64).tolist()
    dt = (1.0 - t_min) / steps
    return [(ts[i], ts[i] - dt) for i in range(steps)]


def loop_alphas(t: float, s: float, cfg: ReMDMConfig) -> tuple[float, float, bool]:
    """(alpha_t, alpha_s, remask) of the loop strategy at step t -> s (remask: the middle phase)."""
    if t > cfg.t_on:
        f = cfg.alpha_on / (1.0 - cfg.t_on)
        return (1.0 - t) * f, (1.0 - s) * f, False
    if t <= cfg.t_off:
        f = (1.0 - cfg.alpha_on) / cfg.t_off
        return 1.0 - t * f, 1.0 - s * f, False
    return cfg.alpha_on, cfg.alpha_on, True


def objective_alpha(objective, t: float) -> Alpha:
    """The checkpoint's probability of being clean at t: scalar (mdm's schedule; linear 1 - t without an
    objective, as the reference) or a (V,) vector (genmd4)."""
    if objective is None:
        return 1.0 - t
    if hasattr(objective, "alpha"):
        return objective.alpha(t)
    if hasattr(objective, "schedule"):
        return float(objective.schedule.alpha(torch.tensor(t, dtype=torch.float64)))
    raise ValueError(f"ReMDM needs a masked-diffusion checkpoint; objective {objective.name!r} is not one")


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF categorical draws, float64: probs (N, V), u (N,) uniforms."""
    c = probs.cumsum(-1)
    return (c < u[:, None] * c[:, -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)


class ReMDMState:
    """Per-canvas state across steps: the conf strategy's psi (B, W) float32."""

    def __init__(self, shape, device):
        self.psi = torch.full(shape, float("-inf"), device=device)


def remdm_step(p_x0: torch.Tensor, z: torch.Tensor, t: float, s: float, cfg: ReMDMConfig, *, mask_id: int,
               u: torch.Tensor, objective=None, state: Optional[ReMDMState] = None,
               active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One ReMDM step on a canvas window z (B, W) with the model's p_x0 (B, W, V) (already top-p filtered);
    u (B, W) uniforms. Returns z_s. `active` (B, W) bool: positions that may change (others are copied)."""
    B, W, V = p_x0.shape
    if cfg.strategy == "loop":
        a_t, a_s, remask = loop_alphas(t, s, cfg)
        sigma = cfg.eta if remask else 0.0
    else:
        a_t, a_s = objective_alpha(objective, t), objective_alpha(objective, s)
        if cfg.strategy == "conf":
            smax = sigma_for("conf", cfg.eta, a_t, a_s)
            smax = float(smax) if not torch.is_tensor(smax) or smax.ndim == 0 else smax
            decoded = (z != mask_id) & (active if active is not None else True)
            psi = state.psi.masked_fill(~decoded, float("-inf"))
            eta_l = torch.softmax(psi, dim=-1)
            eta_l = torch.nan_to_num(eta_l, nan=0.0).masked_fill(~decoded, 0.0)  # rows with nothing decoded
            if torch.is_tensor(smax):  # genmd4: the bound of the position's own token
                smax = smax.to(z.device)[z.clamp_max(V - 1)]
            sigma = (eta_l.double() * smax).reshape(-1)
        else:
            sigma = sigma_for(cfg.strategy, cfg.eta, a_t, a_s)
    probs = step_probs(p_x0.reshape(B * W, V), z.reshape(-1), a_t, a_s, sigma, mask_id,
                       per_position=cfg.strategy == "conf")
    zs = draw(probs, u.reshape(-1)).reshape(B, W)
    if active is not None:
        zs = torch.where(active, zs, z)
    if cfg.strategy == "conf" and state is not None:
        newly = (z == mask_id) & (zs != mask_id)
        conf = -p_x0.gather(-1, zs.clamp_max(V - 1)[..., None]).squeeze(-1).float()
        state.psi = torch.where(newly, conf, state.psi)
        state.psi = state.psi.masked_fill((z != mask_id) & (zs == mask_id), float("-inf"))
    return zs


@torch.no_grad()
def remdm_generate(model, ids: torch.Tensor, real: Optional[torch.Tensor], *, cfg: ReMDMConfig, mask_id: int,
                   gen_length: int, steps: int, block_length: int, noise, objective=None, temperature: float = 1.0,
                   cfg_scale: float = 0.0, eos_id: Optional[int] = None, min_new_tokens: int = 0,
                   callback=None, stats: dict) -> torch.Tensor:
    """The ReMDM sampler behind model.sample.generate(sampler="remdm"): blocks left to right (one block when
    block_length = gen_length), `steps / n_blocks` ReMDM steps each on the reference's time grid, then the final
    argmax. temperature > 0 divides the logits (0 is taken as 1: ReMDM has no greedy mode)."""
    cfg.check()
    B, P = ids.shape
    device = ids.device
    x = torch.cat([ids, torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)], 1)
    if real is not None:
        real = torch.cat([real, torch.ones(B, gen_length, dtype=torch.bool, device=device)], 1)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    temp = temperature if temperature > 0 else 1.0
    step_no = 0
    every = torch.ones(B, dtype=torch.bool, device=device)
    for blk in range(n_blocks):
        start, end = P + blk * block_length, P + (blk + 1) * block_length
        state = ReMDMState((B, end - start), device)

        def probs_now():
            logits = forward_logits(model, x, real, start, end, mask_id=mask_id, prompt_len=P, cfg_scale=cfg_scale)
            ban_eos(logits, eos_id, start - P, min_new_tokens)
            stats["forwards"] += 1
            stats["forward_rows"] += B * (2 if cfg_scale else 1)
            stats["forward_tokens"] += B * x.shape[1] * (2 if cfg_scale else 1)
            return logits, torch.softmax(logits.double() / temp, -1)
        for t, s in time_grid(per_block, cfg.t_min):
            _, p = probs_now()
            p = nucleus(p.reshape(-1, p.shape[-1]), cfg.top_p).reshape(p.shape)
            u = noise.rows(every, end - start)
            x[:, start:end] = remdm_step(p, x[:, start:end], t, s, cfg, mask_id=mask_id, u=u, objective=objective,
                                         state=state)
            step_no += 1
            if callback is not None:
                callback(step_no, x)
        left = x[:, start:end] == mask_id
        if bool(left.any()):  # the reference's noise_removal: argmax at t_min
            logits, _ = probs_now()
            x[:, start:end] = torch.where(left, logits.argmax(-1), x[:, start:end])
    return x
