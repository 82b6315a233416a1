"""The `diffusion` section of a run config: which objective, and its settings (validated by the objective)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class GenMD4Config:
    """diffusion.genmd4: GenMD4's learned per-token schedule (model/objectives/genmd4.py)."""
    samples_per_t: int = 2  # masks drawn per t and averaged (2: GenMD4's leave-one-out REINFORCE; 1: md4 issue 4)
    mask_eps: float = 1e-4  # alpha_v(t) = 1 - (1 - mask_eps) t^{w_v}: a little signal left at t = 1 (md4's eps)
    power_init: float = 1.0  # every w_v starts here (1: the linear schedule)
    learn_exponents: bool = True  # false: w stays power_init (MD4's poly-k with GenMD4's 1 or 2 masks per t)


@dataclass
class DiffusionConfig:
    objective: str = "mdm"  # a registered objective (model/objectives/__init__.py): mdm, ar, ...
    schedule: Literal["linear", "cosine", "poly", "cos_alpha"] = "linear"  # cosine/poly: MD4's (eps-squeezed); cos_alpha: alpha = cos(pi t/2)
    poly_exponent: float = 2.0  # schedule=poly: alpha = 1 - t^k (MD4's polyk)
    eps: float = 1e-3  # p_mask = (1 - eps) t + eps keeps t off zero
    t_sampling: Literal["stratified", "uniform"] = "stratified"  # stratified over the global batch
    ce_chunk: int = 4096  # rows of logits per loss chunk, recomputed in backward (0: all at once)
    # objective=uniform|hybrid (model/objectives/uniform.py, hybrid.py)
    uniform_frac: float = 0.5  # hybrid: GIDD's p_u, the uniform share of the noise at alpha = 1/2 (0: mdm, 1: uniform)
    hybrid_weighting: Literal["elbo", "gidd"] = "elbo"  # hybrid: train on the ELBO, or GIDD's clipped loss weights
    beta_is_div: float = 1.0  # hybrid_weighting=gidd: weight of GIDD's IS-divergence term
    row_chunk: int = 256  # uniform/hybrid: rows per chunk of the full-vocabulary row loss (0: ce_chunk)
    noise_removal: Literal["ancestral", "greedy", "none"] = "ancestral"  # uniform/hybrid samplers: the last step
    psi_kappa: float = 1.0  # uniform/hybrid sampler "psi": kappa of the Psi step (1: ancestral)
    self_correct_steps: int = 0  # uniform/hybrid samplers: GIDD self-correction rounds after denoising
    # objective=uniform: DUO's Gaussian-latent curriculum (model/objectives/uniform.py; docs/objectives.md)
    curriculum_steps: int = 0  # train steps (step < this) on soft inputs from a Gaussian latent; 0: off
    curriculum_log10_tau: float = -3.0  # log10 of the tempered softmax's temperature (DUO's scripts: -3)
    curriculum_gamma_min: float = -3.55  # the latent's log noise-to-signal range, linear in t (DUO OWT: -3.55,
    curriculum_gamma_max: float = -1.85  # -1.85; LM1B: -3.5, -1.75)
    curriculum_top_k: int = 0  # keep the k largest latent entries per position (0: the full (B, L, V) softmax)
    # objective=block (BD3-LM, model/objectives/block.py)
    block_size: int = 0  # tokens per block; must divide data.seq_len (1: AR, seq_len: masked diffusion)
    block_t_min: float = 0.0  # training noise interval [t_min, t_max] (BD3-LM's clipping); 0: diffusion.eps
    block_t_max: float = 1.0  # the weight stays 1/t; the logged bound always uses (eps, 1)
    block_keep_first: bool = False  # the bd3lms protocol: position 0 (BOS) is never masked and never scored
    block_clip_search: bool = False  # BD3-LM's var_min: validation adopts the interval of least loss variance
    block_clip_widths: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])  # and (eps, 1)
    block_clip_delta: float = 0.05  # candidate intervals start at multiples of this
    # objective=sedd (model/objectives/sedd.py) and d3pm (model/objectives/d3pm.py)
    graph: Literal["absorb", "uniform"] = "absorb"  # sedd/d3pm: absorbing (mask) or uniform transitions
    sedd_noise: Literal["loglinear", "geometric"] = "loglinear"  # sedd: sigma(t) (SEDD's noise_lib)
    sedd_noise_eps: float = 1e-3  # sedd loglinear: 1 - e^{-sigma} = (1 - e) t
    sigma_min: float = 1e-4  # sedd geometric: sigma = sigma_min^{1-t} sigma_max^t
    sigma_max: float = 20.0
    scale_by_sigma: bool = True  # sedd absorb: s = f - log(e^sigma - 1) - log N (SEDD's default)
    sedd_predictor: Literal["analytic", "euler"] = "analytic"  # sedd sampler (then SEDD's Denoiser)
    d3pm_steps: int = 1000  # d3pm: T, the number of discrete steps
    d3pm_schedule: Literal["standard", "linear", "cosine"] = "standard"  # standard: beta_t = 1/(T - t + 1)
    d3pm_beta_min: float = 1e-3  # d3pm linear: beta from beta_min to beta_max (D3PM's defaults)
    d3pm_beta_max: float = 0.2
    hybrid_lambda: float = -1.0  # d3pm: weight of the hybrid CE (-1: 0.01 absorb, 0 uniform, as D3PM)
    # objective=dfm (model/objectives/dfm.py)
    source: Literal["mask", "uniform"] = "mask"  # dfm: the source distribution of the mixture path
    kappa_exponent: float = 1.0  # dfm: polynomial scheduler kappa = s^n (s: DFM's time, 1 - t)
    dfm_loss: Literal["generalized_kl", "cross_entropy"] = "generalized_kl"  # cross_entropy is not a bound
    dfm_carry_over: bool = False  # dfm, mask source: unmasked tokens are copied (SUBS); off = the library's head
    genmd4: GenMD4Config = field(default_factory=GenMD4Config)  # objective=genmd4 only
