"""Time one training step (forward, backward, AdamW; fp32, CPU) of each objective at the 25M benchmark shape,
and its peak memory, each objective in its own process.

    python benchmarks/objective_step.py [--steps 4] [--batch 8] [--seq 256] [--threads 1] [--row-chunk N]
        [--model dim=16 n_layers=2 ...]   (another shape: ModelConfig fields over bench-25m's)

The peak is the process's maximum RSS during the timed steps less its RSS before the first step (model and
optimizer state built, so the difference is activations + the loss's logits + gradients/optimizer growth).
Besides the wall time, each step's CPU time (time.process_time) is reported: with one thread it is what the
step costs, and unlike the wall time it hardly moves when other jobs share the cores.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [("mdm", "none"), ("uniform", "adaln"), ("hybrid", "adaln")]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def model_overrides(items: list[str]) -> dict:
    """--model KEY=VALUE ... -> {key: value} for ModelConfig fields (values parsed as the trainer's overrides)."""
    from pretrain.config import parse_override
    return dict(parse_override(item) for item in items)


def one(objective: str, cond: str, steps: int, warmup: int, batch: int, seq: int, chunk: int,
        row_chunk: int = -1, model: tuple = ()) -> dict:
    import torch
    from model import Transformer, get_preset
    from model.objectives import DiffusionConfig, build_objective
    import dataclasses
    cfg = dataclasses.replace(get_preset("bench-25m"), time_conditioning=cond, **model_overrides(list(model)))
    model = Transformer(cfg)
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dcfg = DiffusionConfig(objective=objective, ce_chunk=chunk)
    if row_chunk >= 0:  # else the config's default
        dcfg.row_chunk = row_chunk
    obj = build_objective(dcfg, mask_id=cfg.mask_id, vocab_size=cfg.vocab_size)
    x0 = torch.randint(0, cfg.vocab_size - 1, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step(i):
        noise = obj.draw(0, i, batch, seq).rows(slice(0, batch))
        loss, _ = obj.loss(model, obj.noise(x0, noise), ce_chunk=chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step(0)  # optimizer state exists from here on
    base = rss_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for i in range(warmup):
        step(1 + i)
    times, cpu = [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(100 + i)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"objective": objective, "time_conditioning": cond, "median_s": statistics.median(times),
            "best_s": min(times), "cpu_median_s": statistics.median(cpu), "peak_over_base_mb": max(peak, peak0) - base, "vocab": cfg.vocab_size,
            "threads": torch.get_num_threads(), "row_chunk": dcfg.row_chunk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=4096, help="diffusion.ce_chunk (rows of logits per chunk)")
    ap.add_argument("--row-chunk", type=int, default=-1,
                    help="diffusion.row_chunk of uniform/hybrid (rows per chunk of the row loss; -1: the default)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                    help="ModelConfig fields replacing the bench-25m shape, e.g. the noise-type sweep's smallest "
                         "model: dim=16 n_layers=2 n_heads=2 ffn_dim=64 cond_dim=32 vocab_size=2048 mask_id=1 max_seq_len=128")
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        name, cond = args.case.split(":")
        print(json.dumps(one(name, cond, args.steps, args.warmup, args.batch, args.seq, args.chunk,
                             args.row_chunk, tuple(args.model))))
        return
    rows = []
    for name, cond in CASES:
        cmd = [sys.executable, __file__, "--case", f"{name}:{cond}", "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--chunk", str(args.chunk),
               "--row-chunk", str(args.row_chunk), "--threads", str(args.threads)] + (["--model", *args.model]
                                                                                    if args.model else [])
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                               .splitlines()[-1]))
    ref = rows[0]
    print(f"{' '.join(args.model) or 'bench-25m'}: batch {args.batch} x seq {args.seq}, vocab {ref['vocab']}, "
          f"ce_chunk {args.chunk}, "
          f"row_chunk {rows[-1]['row_chunk']}, threads {ref['threads']}")
    print("| objective | time cond. | step median (best) | x mdm | CPU time per step | x mdm | peak over base | x mdm |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['time_conditioning']} | {r['median_s'] * 1e3:.0f} ({r['best_s'] * 1e3:.0f}) ms | "
              f"{r['median_s'] / ref['median_s']:.2f} | {r['cpu_median_s'] * 1e3:.0f} ms | "
              f"{r['cpu_median_s'] / ref['cpu_median_s']:.2f} | {r['peak_over_base_mb']:.0f} MB | "
              f"{r['peak_over_base_mb'] / max(ref['peak_over_base_mb'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
