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
    noise_removal: Literal["ancestral", "greedy", "none"] = "ancestral"  # uniform/hybrid samplers: the last step
    psi_kappa: float = 1.0  # uniform/hybrid sampler "psi": kappa of the Psi step (1: ancestral)
    self_correct_steps: int = 0  # uniform/hybrid samplers: GIDD self-correction rounds after denoising
    # objective=block (BD3-LM, model/objectives/block.py)
    block_size: int = 0  # tokens per block; must divide data.seq_len (1: AR, seq_len: masked diffusion)
    block_t_min: float = 0.0  # training noise interval [t_min, t_max] (BD3-LM's clipping); 0: diffusion.eps
    block_t_max: float = 1.0  # the weight stays 1/t; the logged bound always uses (eps, 1)
    block_keep_first: bool = False  # the bd3lms protocol: position 0 (BOS) is never masked and never scored
    genmd4: GenMD4Config = field(default_factory=GenMD4Config)  # objective=genmd4 only
