"""Parameter and FLOP accounting.

Training FLOPs per token, by term (forward + backward = 3x the forward; a multiply-add is 2 FLOPs):

    weights    6 * N_nonembed                        every weight matmul (attention projections, SwiGLU)
    attention  12 * n_layers * d_model * L * a       scores Q K^T and the weighted sum over values
    head       6 * d_model * vocab * h               the output projection

with L the sequence length, `a` the share of the score matrix the kernel computes (1: the full L x L square,
what bidirectional attention does and what dense kernels do for causal models too; 0.5: causal kernels that
skip the masked half), and `h` the share of positions whose logits are computed (1 for the autoregressive
baseline; the mean masked fraction for masked diffusion, whose loss needs logits only at masked positions).
Norms, RoPE, softmax and the embedding lookup are left out (O(d) per token, not O(d^2)).

Time conditioning (model.time_conditioning=adaln) adds a fourth term, per sequence rather than per token:

    conditioning  6 * N_cond / L                    time embedding MLP and modulation layers, once per row

N_cond (`conditioning_params`) is part of count_params' non_embedding count, and the weights term counts
N_nonembed - N_cond; the modulation itself (a multiply-add per channel) is O(d) per token, left out like norms.
"""
from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig


def count_params(model: nn.Module) -> dict[str, int]:
    """Total, embedding (input table + output head) and non-embedding parameter counts, and of the latter the
    time conditioning's ("conditioning": time embedding and modulation layers; 0 without time conditioning).

    Works on meta-device models, so the largest configs are counted without memory."""
    from .transformer import is_conditioning
    total = emb = cond = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.startswith(("tok_embeddings.", "output.")):
            emb += n
        elif is_conditioning(name):
            cond += n
    return {"total": total, "embedding": emb, "non_embedding": total - emb, "conditioning": cond}


def conditioning_params(cfg: ModelConfig) -> int:
    """Parameters of the time conditioning (equal to count_params(...)["conditioning"]): the time embedding MLP
    (TIME_FREQS -> cond_dim -> cond_dim), per block Linear(cond_dim, 6 dim), the final Linear(cond_dim, 2 dim),
    all with biases."""
    if cfg.time_conditioning == "none":
        return 0
    from .transformer import TIME_FREQS
    c, d = cfg.cond_dim, cfg.dim
    embed = TIME_FREQS * c + c + c * c + c
    return embed + cfg.n_layers * (c * 6 * d + 6 * d) + c * 2 * d + 2 * d


def flops_by_term(cfg: ModelConfig, seq_len: int, n_nonembed: int, *, head_fraction: float = 1.0,
                  attention_fraction: float = 1.0) -> dict[str, float]:
    """Training FLOPs per token of a sequence of `seq_len` tokens, by term (see the module docstring):
    {"weights", "attention", "head", "conditioning", "total"}. n_nonembed: count_params(model)["non_embedding"]
    (which includes the time conditioning's parameters; their once-per-row work is the "conditioning" term,
    spread over the row's seq_len tokens)."""
    if not 0 <= head_fraction <= 1 or not 0 < attention_fraction <= 1:
        raise ValueError(f"head_fraction={head_fraction} must lie in [0, 1] and attention_fraction="
                         f"{attention_fraction} in (0, 1]")
    n_cond = conditioning_params(cfg)
    if n_nonembed < n_cond:
        raise ValueError(f"n_nonembed={n_nonembed} is below the time conditioning's own {n_cond} parameters: pass "
                         f"count_params(model)['non_embedding'], which includes them")
    terms = {"weights": 6.0 * (n_nonembed - n_cond),
             "attention": 12.0 * cfg.n_layers * cfg.dim * seq_len * attention_fraction,
             "head": 6.0 * cfg.dim * cfg.vocab_size * head_fraction,
             "conditioning": 6.0 * n_cond / seq_len}
    terms["total"] = terms["weights"] + terms["attention"] + terms["head"] + terms["conditioning"]
    return terms


def flops_per_token(cfg: ModelConfig, seq_len: int, n_nonembed: int) -> float:
    """Training FLOPs per token with the head counted at every position and attention over the full square:

        6 * N_nonembed + 6 * d_model * vocab + 12 * n_layers * d_model * L

    (with time conditioning, its parameters' 6 * N_cond counted once per row: 6 * N_cond / L per token)

    (the MFU convention: the work a dense kernel does, whatever the objective)."""
    return flops_by_term(cfg, seq_len, n_nonembed)["total"]
