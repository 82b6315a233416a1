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
"""
from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig


def count_params(model: nn.Module) -> dict[str, int]:
    """Total, embedding (input table + output head) and non-embedding parameter counts.

    Works on meta-device models, so the largest configs are counted without memory."""
    total = emb = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.startswith(("tok_embeddings.", "output.")):
            emb += n
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def flops_by_term(cfg: ModelConfig, seq_len: int, n_nonembed: int, *, head_fraction: float = 1.0,
                  attention_fraction: float = 1.0) -> dict[str, float]:
    """Training FLOPs per token of a sequence of `seq_len` tokens, by term (see the module docstring):
    {"weights", "attention", "head", "total"}."""
    if not 0 <= head_fraction <= 1 or not 0 < attention_fraction <= 1:
        raise ValueError(f"head_fraction={head_fraction} must lie in [0, 1] and attention_fraction="
                         f"{attention_fraction} in (0, 1]")
    terms = {"weights": 6.0 * n_nonembed,
             "attention": 12.0 * cfg.n_layers * cfg.dim * seq_len * attention_fraction,
             "head": 6.0 * cfg.dim * cfg.vocab_size * head_fraction}
    terms["total"] = terms["weights"] + terms["attention"] + terms["head"]
    return terms


def flops_per_token(cfg: ModelConfig, seq_len: int, n_nonembed: int) -> float:
    """Training FLOPs per token with the head counted at every position and attention over the full square:

        6 * N_nonembed + 6 * d_model * vocab + 12 * n_layers * d_model * L

    (the MFU convention: the work a dense kernel does, whatever the objective)."""
    return flops_by_term(cfg, seq_len, n_nonembed)["total"]
