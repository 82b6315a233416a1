"""Helpers shared by the objectives whose vocabulary holds a mask id anywhere in it (LLaDA's is 126336) and
whose noise either masks or redraws tokens uniformly (uniform, hybrid, sedd, d3pm, dfm): one copy of each.

  the real tokens      real_count, real_ids, real_columns, real_log_probs, uniform_tokens, RealVocab.n_real,
                       need_mask, enumeration_states
  noising              corrupt (mask or redraw where hit), add_token_draw (the per-position token uniforms)
  brute force (tests)  pattern_probs (q(Z | x0) per enumerated sequence)
  evaluation           pad_draws (one (R, L) tensor per field of a batch of eval draws), noised_draws, row_sums
  sampling             real_token_probs, categorical, RealVocab.start_canvas, start_generation, count_forward
  configuration        choice (a validated diffusion.* setting)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import StepNoise, pad
from .mdm import autocast_for, eval_generator


# ----------------------------------------------------------------------------------------- the real tokens
def real_count(vocab_size: int, mask_id: Optional[int]) -> int:
    """N: the number of real (non-mask) token ids of a vocabulary."""
    return vocab_size - (1 if mask_id is not None and 0 <= mask_id < vocab_size else 0)


def real_ids(r: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """Map r in [0, N) onto the real token ids (skipping the mask id)."""
    return r if mask_id is None else r + (r >= mask_id).to(r.dtype)


def uniform_tokens(tok_u: torch.Tensor, n_real: int, mask_id: Optional[int]) -> torch.Tensor:
    """Uniform draws in [0, 1) -> uniformly random real token ids."""
    r = (tok_u.double() * n_real).long().clamp_(max=n_real - 1)
    return real_ids(r, mask_id)


def real_columns(V: int, mask_id: Optional[int], dtype, device) -> torch.Tensor:
    """(V,) 1 at real token ids, 0 at the mask id (excluded by its index, wherever it sits)."""
    keep = torch.ones(V, dtype=dtype, device=device)
    if mask_id is not None and 0 <= mask_id < V:
        keep[mask_id] = 0.0
    return keep


def real_log_probs(logits: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """log-softmax over the vocabulary with the mask id's logit set to -inf (a head over the real tokens)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if mask_id is not None and 0 <= mask_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


class RealVocab:
    """Mixin for objectives that count the real tokens (vocab_size and mask_id set by Objective.__init__)."""

    @property
    def n_real(self) -> int:
        if self.vocab_size is None:
            raise ValueError(f"diffusion.objective={self.name} needs the vocabulary size (model.vocab_size)")
        return real_count(self.vocab_size, self.mask_id)

    def start_canvas(self, ids: torch.Tensor, real: Optional[torch.Tensor], gen_length: int, noise, *,
                     absorb: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A sampler's canvas [prompt ids | gen_length draws from the prior: all masks (absorb), or uniform
        real tokens from the sampler's noise stream (model.sample.Noise)] and its key padding."""
        B, dev = ids.shape[0], ids.device
        if absorb:
            gen = torch.full((B, gen_length), _mask_known(self.mask_id), dtype=torch.long, device=dev)
        else:
            every = torch.ones(B, dtype=torch.bool, device=dev)
            gen = uniform_tokens(noise.rows(every, gen_length), self.n_real, self.mask_id)
        return start_generation(ids, real, gen)


def graph_setting(dcfg, mask_id: Optional[int], vocab_size: Optional[int]) -> str:
    """diffusion.graph (sedd, d3pm): "absorb" (masking: needs a mask token) or "uniform"."""
    graph = choice(dcfg, "graph", "absorb", ("absorb", "uniform"))
    if graph == "absorb":
        need_mask("diffusion.graph=absorb", mask_id, vocab_size)
    return graph


def need_mask(setting: str, mask_id: Optional[int], vocab_size: Optional[int]) -> None:
    """A setting that masks tokens needs a mask id inside the vocabulary. An unset one (None) passes here: a
    config is validated before the data (the synthetic language, a tokenizer) resolves model.mask_id; masking
    without one fails in `corrupt` / `start_canvas`."""
    if mask_id is not None and vocab_size is not None and not 0 <= mask_id < vocab_size:
        raise ValueError(f"{setting} needs a mask token inside the vocabulary: model.mask_id={mask_id} is not "
                         f"below model.vocab_size={vocab_size}")


def _mask_known(mask_id: Optional[int]) -> int:
    if mask_id is None:
        raise ValueError("masking needs a mask token: set model.mask_id (or data whose tokenizer has one)")
    return mask_id


def enumeration_states(vocab_size: int, mask_id: Optional[int], with_mask: bool) -> list[int]:
    """The token ids a noised position can hold: the real ones, after the mask id when it can be masked."""
    real = [i for i in range(vocab_size) if i != mask_id]
    return [mask_id] + real if with_mask else real


# ---------------------------------------------------------------------------------------------- noising
def corrupt(x0: torch.Tensor, hit: torch.Tensor, *, absorb: bool, mask_id: Optional[int],
            tok_u: Optional[torch.Tensor] = None, n_real: int = 0) -> torch.Tensor:
    """x0 with the positions `hit` masked (absorb) or redrawn uniformly over the real tokens from tok_u."""
    if absorb:
        return torch.where(hit, torch.full_like(x0, _mask_known(mask_id)), x0)
    return torch.where(hit, uniform_tokens(tok_u, n_real, mask_id).to(x0.device), x0)


def add_token_draw(noise: StepNoise, seed: int, step: int, tag: int) -> StepNoise:
    """Adds extra["tok_u"], a uniform per position of the global batch naming the token a redrawn position
    takes; a pure function of (seed, tag, step), cut per micro-batch with the positions."""
    G, L = noise.mask_uniform.shape
    noise.extra["tok_u"] = torch.rand(G, L, generator=eval_generator(seed, tag, step))
    noise.positional = noise.positional + ("tok_u",)
    return noise


def position_uniforms(seed: int, length: int, seq: int, sample: int, *tags: int) -> list[torch.Tensor]:
    """One (length,) tensor of uniforms per tag for Monte Carlo sample `sample` of evaluation sequence `seq`
    (which positions are noised, which tokens they take, ...): a pure function of (seed, tag, seq, sample)."""
    return [torch.rand(length, generator=eval_generator(seed, tag, seq, sample)) for tag in tags]


def pattern_probs(Z: torch.Tensor, x0: torch.Tensor, mask_id, p_mask: float, p_same: float,
                  p_other: float) -> torch.Tensor:
    """(K,) float64 prod_i q(Z_ki | x0_i) for per-token probabilities of a mask, of x0 itself and of another
    token (brute-force enumeration in tests; float64 throughout)."""
    per = torch.full(Z.shape, p_other, dtype=torch.float64)
    per[Z == x0[None]] = p_same
    if mask_id is not None:
        per[Z == mask_id] = p_mask
    return per.prod(1)


# ------------------------------------------------------------------------------------------- evaluation
def pad_draws(draws, fills: dict, length: int, device) -> list[torch.Tensor]:
    """One right-padded (R, length) tensor per field of the draws' noise, in the order of `fills` (field ->
    padding value)."""
    return [pad([d.noise[k] for d in draws], fill, device, length=length)[0] for k, fill in fills.items()]


def noised_draws(x0: torch.Tensor, draws, key: str, dtype, perturb) -> tuple[torch.Tensor, ...]:
    """A batch of eval draws noised: (level (R,) from each draw's noise[key], x_t (R, L), scored (R, L)), with
    x_t = perturb(x0, level, pos, tok) at scored positions and x0 elsewhere."""
    level = torch.tensor([d.noise[key] for d in draws], dtype=dtype, device=x0.device)
    pos, tok, scored = pad_draws(draws, {"pos": 2.0, "tok": 0.0, "scored": False}, x0.shape[1], x0.device)
    return level, torch.where(scored, perturb(x0, level, pos, tok), x0), scored


def row_sums(draws, sel: torch.Tensor, keep: torch.Tensor, per_token, *, prior: float = 0.0,
             scored: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R,) float64 on the host, what `eval_sums` returns: per_token(key_padding) -> (n,) losses at the
    positions `sel` (row-major, run under the device's autocast; not called when sel is empty) summed per row,
    times each draw's weight, plus `prior` nats per scored token."""
    sums = torch.zeros(sel.shape[0], dtype=torch.float64, device=sel.device)
    if bool(sel.any()):
        with autocast_for(sel.device):
            per = per_token(None if bool(keep.all()) else keep)
        sums.index_add_(0, sel.nonzero()[:, 0], per.double())
    sums = sums.cpu() * torch.tensor([d.weight for d in draws], dtype=torch.float64)
    return sums + prior * scored.sum(1).double().cpu() if prior else sums


# --------------------------------------------------------------------------------------------- sampling
def real_token_probs(model, x: torch.Tensor, key_padding, level: float, mask_id: Optional[int],
                     temperature: float = 0.0) -> torch.Tensor:
    """(B, W, V) float64: a time-conditioned network's clean-token distribution over the real tokens at noise
    level `level` (this project's t: 1 is noise); temperature > 0 divides the logits."""
    tt = torch.full((x.shape[0],), float(level), dtype=torch.float32, device=x.device)
    with autocast_for(x.device):
        logits = model(x, key_padding=key_padding, t=tt)
    logits = logits.double()
    if temperature > 0:
        logits = logits / temperature
    return real_log_probs(logits, mask_id).exp()


def categorical(q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of q (n, V) float64 (unnormalised) by inverting its CDF at u (n,) float64."""
    cdf = q.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp_(max=q.shape[-1] - 1)


def start_generation(ids: torch.Tensor, real: Optional[torch.Tensor],
                     gen: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The sampler's canvas [prompt ids | initial generated tokens gen (B, G)] and its key padding (None when
    every prompt token is real)."""
    x = torch.cat([ids, gen.to(ids.device)], 1)
    kp = None if real is None or bool(real.all()) else \
        torch.cat([real, torch.ones(gen.shape, dtype=torch.bool, device=ids.device)], 1)
    return x, kp


def count_forward(stats: dict, rows: int, width: int) -> None:
    """model.sample's cost counters for one network call over `rows` sequences of `width` tokens."""
    stats["forwards"] = stats.get("forwards", 0) + 1
    stats["forward_rows"] = stats.get("forward_rows", 0) + rows
    stats["forward_tokens"] = stats.get("forward_tokens", 0) + rows * width


# ---------------------------------------------------------------------------------------- configuration
def choice(dcfg, key: str, default, choices: Sequence):
    """diffusion.<key> (default when the config has no such field), checked against its choices."""
    value = getattr(dcfg, key, default)
    if value not in choices:
        raise ValueError(f"diffusion.{key}={value!r}; choices: {', '.join(map(str, choices))}")
    return value
