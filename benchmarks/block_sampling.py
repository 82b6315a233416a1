"""Block-diffusion sampling with the exact KV cache of finished blocks against none (model/block_sample.py).

    python benchmarks/block_sampling.py [--vocab 65] [--batches 1,8] [--gen-length 256] [--block-size 16]
        [--steps-per-block 16] [--repeat 3] [--threads 1] [--dim 128 --layers 4 --heads 4 --ffn 512 | --preset P]

A randomly initialised model of the quickstart shape (d 128, 4 layers; --vocab 4096 for the Shakespeare
recipe's vocabulary) with model.max_seq_len = the generated length (no sliding window), unconditional,
temperature 1, the same generator for both runs. Cache and no-cache runs alternate within each repeat, so a
change of the machine's load hits both; the table gives the best of --repeat for each. Timings are CPU time of
this process (with --threads 1 that is what a run costs even on a busy shared machine) and wall time;
`ratio` = no-cache time / cache time (CPU time). `identical` compares the two outputs token for token (every
repeat). `positions` = token positions pushed through the model per row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer  # noqa: E402
from model.objectives import DiffusionConfig, build_objective  # noqa: E402
from model.sample import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps-per-block", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--preset", default="", help="a model preset instead of --dim/--layers/--heads/--ffn/--vocab "
                    "(bench-25m: the training-step benchmark's shape)")
    args = ap.parse_args()
    if args.preset:
        from model import get_preset
        p = get_preset(args.preset)
        args.dim, args.layers, args.heads, args.ffn, args.vocab = p.dim, p.n_layers, p.n_heads, p.ffn_dim, p.vocab_size
    if args.gen_length % args.block_size:
        raise SystemExit(f"--gen-length {args.gen_length} must be a multiple of --block-size {args.block_size}")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn,
                      vocab_size=args.vocab, mask_id=args.vocab - 1, max_seq_len=args.gen_length)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.eval()
    obj = build_objective(DiffusionConfig(objective="block", block_size=args.block_size), mask_id=cfg.mask_id,
                          vocab_size=cfg.vocab_size)
    steps = args.steps_per_block * args.gen_length // args.block_size

    def run(batch: int, cache: str):
        stats: dict = {}
        c0, w0 = time.process_time(), time.perf_counter()
        out = generate(model, None, batch_size=batch, mask_id=cfg.mask_id, gen_length=args.gen_length,
                       steps=steps, temperature=1.0, generator=torch.Generator().manual_seed(0), objective=obj,
                       kv_cache=cache, stats=stats)
        return time.process_time() - c0, time.perf_counter() - w0, out, stats

    print(f"d {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, {args.gen_length} tokens, block "
          f"{args.block_size}, {args.steps_per_block} steps per block, {torch.get_num_threads()} thread(s), "
          f"best of {args.repeat} (cache / none interleaved)")
    print("| batch | cache | CPU s | wall s | tok/CPU-s | positions/row | ratio (CPU) | identical |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        run(batch, "prefix")  # warm-up
        best = {"prefix": [float("inf")] * 2, "none": [float("inf")] * 2}
        outs, positions, same = {}, {}, True
        for _ in range(args.repeat):
            for cache in ("prefix", "none"):
                cpu, wall, outs[cache], stats = run(batch, cache)
                best[cache] = [min(best[cache][0], cpu), min(best[cache][1], wall)]
                positions[cache] = stats["forward_tokens"] // batch
            same &= torch.equal(outs["prefix"], outs["none"])
        tokens = batch * args.gen_length
        for cache in ("prefix", "none"):
            cpu, wall = best[cache]
            ratio = f"{best['none'][0] / best['prefix'][0]:.2f}x" if cache == "prefix" else ""
            print(f"| {batch} | {'exact' if cache == 'prefix' else 'none'} | {cpu:.2f} | {wall:.2f} | "
                  f"{tokens / cpu:.1f} | {positions[cache]} | {ratio} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
