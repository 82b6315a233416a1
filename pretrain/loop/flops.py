"""Peak FLOP/s for MFU: a table for known accelerators, a measurement on CPU."""
from __future__ import annotations

import time

import torch

# Dense bf16 peak (no sparsity), per device.
# Dense bf16 peaks; the first key contained in the device name wins, so variants come before their family
# (H100 SXM is 989, PCIe 756, NVL 835; GB200 2.5e15 before B200).
_CUDA_PEAKS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
               "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12,
               "GB200": 2500e12, "B200": 2250e12}


def measure_matmul_peak(device="cpu", dtype=torch.float32, n: int = 1024, reps: int = 3) -> float:
    """Best observed FLOP/s of an n x n x n matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first run warms up
        if a.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    if configured > 0:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _CUDA_PEAKS.items():
            if key in name:
                return value, f"{name} bf16 datasheet"
        return measure_matmul_peak(device, torch.bfloat16, n=8192), f"{name} measured bf16 matmul"
    return measure_matmul_peak(device), "measured fp32 matmul (CPU)"


# ----------------------------------------------------------------------------- compute budgets

def length_moments(seq_len: int, random_length_prob: float) -> tuple[float, float]:
    """(E[l], E[l^2]) of a training sequence's length: l = L, or with probability r uniform on {1..L} (LLaDA's
    random-length batches). E[l] = L (1 - r) + r (1 + L) / 2 is SMDM's correction."""
    L, r = seq_len, random_length_prob
    return L * (1 - r) + r * (1 + L) / 2, L * L * (1 - r) + r * (L + 1) * (2 * L + 1) / 6


def step_flops(cfg, n_nonembed: int) -> dict[str, float]:
    """Expected training FLOPs of one optimizer step of `cfg` (pretrain.config.Config, vocab known), by term,
    plus the expected tokens per step. Weight and head FLOPs scale with a sequence's length l, attention with l^2;
    the head is counted where the objective computes logits (its logit_fraction: every position for AR, the
    mean masked fraction for MDM); attention is counted over the full square (dense kernels, causal or not).
    An objective whose network input is m tokens per training token (block diffusion's [x_t, x_0]: m = 2)
    costs m x the weight FLOPs and m^2 x the attention FLOPs; one that runs the network P times per sequence
    (GenMD4's two masks per t: P = 2) costs P x everything; `tokens` stays the training tokens."""
    from model.objectives import build_objective
    from model.params import flops_by_term
    objective = build_objective(cfg.diffusion, mask_id=cfg.model.mask_id)
    h = objective.logit_fraction(cfg.data.seq_len)
    m, passes = objective.input_multiplier, objective.forward_passes
    e1, e2 = length_moments(cfg.data.seq_len, cfg.data.random_length_prob)
    per_tok = flops_by_term(cfg.model, 1, n_nonembed, head_fraction=h)  # attention per token at length 1
    G = cfg.train.global_batch_size * passes  # network rows per step
    out = {"weights": G * e1 * m * per_tok["weights"], "attention": G * e2 * m * m * per_tok["attention"],
           "head": G * e1 * per_tok["head"],
           "conditioning": G * per_tok["conditioning"]}  # time conditioning: once per row (0 without it)
    out["total"] = out["weights"] + out["attention"] + out["head"] + out["conditioning"]
    out["tokens"] = cfg.train.global_batch_size * e1
    out["head_fraction"] = h
    return out


def steps_for_budget(cfg, budget: float, n_nonembed: int) -> int:
    """The number of optimizer steps whose expected training FLOPs fit in `budget` (rounded down); 0 when the
    budget is below one step."""
    return int(budget // step_flops(cfg, n_nonembed)["total"])
