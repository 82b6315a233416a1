"""Bytes per vocabulary entry of a chunk of each objective's per-row loss: what launch.plan's
`row_loss_bytes` stands for (the model recomputes one chunk of rows at a time in backward, so the peak is one
chunk's autograd graph).

    OMP_NUM_THREADS=1 python benchmarks/row_loss_bytes.py [--vocab 4096] [--rows 64]

Measured: the bytes the loss saves for backward (saved-tensor hooks, distinct storages) per entry of the
(rows, V) fp32 logits, printed with `+ 12`: the fp32 logits chunk itself, its gradient, and one (rows, V)
fp32 gradient temporary of the backward pass (the estimate that turns uniform's measured 16 into its
declared 30 within 2 bytes).
"""
from __future__ import annotations

import argparse

import torch

from model.objectives import DiffusionConfig, build_objective

CASES = [("uniform", {}), ("hybrid", {}), ("sedd", dict(graph="absorb")), ("sedd", dict(graph="uniform")),
         ("d3pm", dict(graph="absorb", d3pm_steps=100)), ("d3pm", dict(graph="uniform", d3pm_steps=100)),
         ("dfm", dict(source="mask")), ("dfm", dict(source="uniform"))]


def saved_bytes(fn, logits: torch.Tensor) -> int:
    seen: dict = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(logits)
    out.sum().backward()
    seen.pop(logits.untyped_storage().data_ptr(), None)  # the chunk itself is counted in the + 12
    return sum(seen.values())


def row_loss(obj, n: int, V: int, mask: int):
    """The objective's per-row loss at n rows (half of them noised where that matters), as a function of logits."""
    x = torch.randint(0, V - 1, (n,))
    x = x + (x >= mask).long()
    t = torch.full((n,), 0.5)
    masked = getattr(obj, "graph", None) == "absorb" or getattr(obj, "source", None) == "mask"
    z = torch.full_like(x, mask) if masked else torch.where(torch.arange(n) < n // 2, (x + 1) % (V - 1), x)
    if obj.name in ("uniform", "hybrid"):
        a, da = obj.alpha(t)
        return lambda lg: obj.token_loss(lg, z, x, a, da)
    if obj.name == "sedd":
        return lambda lg: obj.token_loss(lg, z, x, t)
    if obj.name == "d3pm":
        ti = torch.full((n,), obj.T // 2)
        return lambda lg: (lambda vb, ce: vb + obj.hybrid_lambda * ce)(*obj.terms(lg, z, x, ti))
    k = torch.full((n,), 0.3)
    return lambda lg: obj.token_loss(lg, z, x, k, torch.ones(n), obj.loss_kind)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args(argv)
    V, n, mask = args.vocab, args.rows, 7
    torch.manual_seed(0)
    print(f"{'objective':10s} {'settings':40s} saved B/entry  +12  declared row_loss_bytes")
    for name, kw in CASES:
        obj = build_objective(DiffusionConfig(objective=name, **kw), mask_id=mask, vocab_size=V)
        logits = torch.randn(n, V, requires_grad=True)
        b = saved_bytes(row_loss(obj, n, V, mask), logits) / (n * V)
        print(f"{name:10s} {str(kw):40s} {b:12.1f} {b + 12:5.0f}  {getattr(obj, 'row_loss_bytes', 0)}")


if __name__ == "__main__":
    main()
