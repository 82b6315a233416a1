"""Block diffusion's training step with SDPA by query tiles against the dense 2L mask, and mdm's step, in one
process (model/objectives/block.py TILE_ROWS; model.attention.sparse_tiles).

    python benchmarks/block_tiles.py [--rounds 6] [--threads 1] [--batch 8] [--seq 256] [--block-size 16]

The 25M benchmark shape (as benchmarks/train_step.py), fp32 on CPU, forward + backward + AdamW. The three steps
run interleaved, their order reversed every other round, after one warm-up each, so a change of the machine's
load hits all three; times are this process's CPU time (with --threads 1 the robust measure on a shared
machine). Prints each step's median and best, and each block variant's ratio to mdm (median of the per-round
ratios).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.objectives.block as block_mod  # noqa: E402
from model import Transformer, get_preset  # noqa: E402
from model.objectives import DiffusionConfig, LinearSchedule, build_objective, sample_u  # noqa: E402
from model.objectives.mdm import mdm_loss  # noqa: E402
from pretrain.config import OptimConfig  # noqa: E402
from pretrain.loop.train import build_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset("bench-25m")
    cfg.causal = False
    blk = build_objective(DiffusionConfig(objective="block", block_size=args.block_size), mask_id=cfg.mask_id,
                          vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    gen = torch.Generator().manual_seed(0)
    B, L = args.batch, args.seq
    x0 = torch.randint(0, cfg.vocab_size - 1, (B, L), generator=gen)
    counter = iter(range(1 << 30))
    tiles = block_mod.TILE_ROWS

    def step(name: str) -> None:
        if name == "mdm":
            loss, _ = mdm_loss(model, x0, sample_u(B, gen, stratified=True), torch.rand(B, L, generator=gen),
                               mask_id=cfg.mask_id, schedule=LinearSchedule(), eps=1e-3)
        else:
            block_mod.TILE_ROWS = tiles if name == "block, tiles" else 1 << 30  # 2L <= 2 TILE_ROWS: dense
            loss, _ = blk.micro_loss(model, x0, blk.draw(0, next(counter), B, L), ce_chunk=4096)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    names = ["mdm", "block, tiles", "block, dense mask"]
    for name in names:
        step(name)
    cpu = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c0 = time.process_time()
            step(name)
            cpu[name].append(time.process_time() - c0)
    block_mod.TILE_ROWS = tiles
    print(f"bench-25m, batch {B} x {L}, block {args.block_size}, tiles of {tiles} rows, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds, CPU time")
    print("| step | median s | best s | ratio to mdm (median per round) |")
    print("|---|---:|---:|---:|")
    for name in names:
        ratio = statistics.median(a / m for a, m in zip(cpu[name], cpu["mdm"]))
        print(f"| {name} | {statistics.median(cpu[name]):.3f} | {min(cpu[name]):.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
