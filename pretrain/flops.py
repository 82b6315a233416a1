"""Peak FLOP/s for MFU: a table for known accelerators, a measurement on CPU."""
from __future__ import annotations

import time

import torch

# Dense bf16 peak (no sparsity), per device.
_CUDA_PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
               "A800": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12, "B200": 2250e12}


def measure_matmul_peak(device="cpu", dtype=torch.float32, n: int = 2048, reps: int = 5) -> float:
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
