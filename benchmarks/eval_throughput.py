"""Throughput of generation (tokens/s) and conditional log-likelihood (examples/s): batched vs one at a time.

    python benchmarks/eval_throughput.py [--ckpt RUN] [--threads 1] [--device cpu]

Without --ckpt a random model of the configs/shakespeare.yaml shape (5.5M parameters, 4096-token vocabulary)
is used: throughput does not depend on the weights. Generation: `--prompts` prompts of random lengths,
gen_length 64, one token per step (steps = 64), blocks of 32, LLaDA low-confidence remasking; batched = all
prompts in one left-padded batch, one-at-a-time = each prompt alone (the reference implementations' way).
Log-likelihood: `--examples` (context, continuation) pairs, K Monte Carlo samples each; compared: every
(example, sample) row alone; one example per call with its K samples batched (LLaDA's reference harness);
and rows of many examples batched together (eval/likelihood.py).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.likelihood import conditional_loglikelihood  # noqa: E402
from model.sample import generate, generate_many  # noqa: E402
from model import Transformer  # noqa: E402
from model.config import ModelConfig  # noqa: E402


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--mc-samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128, help="rows per forward for batched likelihood")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.ckpt:
        from eval.load import load
        run = load(args.ckpt, device=device)
        model, mask_id, vocab = run.model, run.cfg.model.mask_id, run.cfg.model.vocab_size
        desc = str(run.path)
    else:
        cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=768, vocab_size=4096, mask_id=1, max_seq_len=256)
        model = Transformer(cfg).to(device)
        model.init_weights(seed=0)
        model.eval()
        mask_id, vocab, desc = 1, 4096, "random model, configs/shakespeare.yaml shape"
    rng = random.Random(0)
    G = args.gen_length
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(8, 48))] for _ in range(args.prompts)]
    kw = dict(mask_id=mask_id, gen_length=G, steps=G, block_length=min(32, G), pad_id=0)
    generate(model, prompts[:2], **kw)  # warm-up
    t_batched = timed(lambda: generate(model, prompts, **kw), device)
    t_bucketed = timed(lambda: generate_many(model, prompts, batch_size=len(prompts), **kw), device)
    t_single = timed(lambda: [generate(model, [p], **kw) for p in prompts], device)
    n_tok = len(prompts) * G

    ctxs = [[rng.randrange(2, vocab) for _ in range(rng.randint(16, 96))] for _ in range(args.examples)]
    conts = [[rng.randrange(2, vocab) for _ in range(rng.randint(2, 8))] for _ in range(args.examples)]
    K = args.mc_samples
    ll = lambda c, x, bs: conditional_loglikelihood(model, c, x, mask_id=mask_id, mc_samples=K, batch_size=bs)
    ll(ctxs[:2], conts[:2], K)  # warm-up
    t_rows = timed(lambda: [ll([c], [x], 1) for c, x in zip(ctxs[:8], conts[:8])], device) * len(ctxs) / 8
    t_per_example = timed(lambda: [ll([c], [x], K) for c, x in zip(ctxs, conts)], device)
    t_ll_batched = timed(lambda: ll(ctxs, conts, args.batch_size), device)

    # Multiple-choice style: one-token answers are exact with a single forward each, so "one at a time" is a
    # batch of one row; batching many examples is where the reference harnesses lose most.
    ones = [[x[0]] for x in conts]
    t_one_single = timed(lambda: [ll([c], [x], 1) for c, x in zip(ctxs, ones)], device)
    t_one_batched = timed(lambda: ll(ctxs, ones, args.batch_size), device)

    res = {
        "model": desc, "device": str(device), "threads": torch.get_num_threads(),
        "generation": {"prompts": len(prompts), "gen_length": G, "steps": G, "block_length": kw["block_length"],
                       "batched_tokens_per_s": n_tok / t_batched, "bucketed_tokens_per_s": n_tok / t_bucketed,
                       "one_at_a_time_tokens_per_s": n_tok / t_single, "speedup": t_single / t_bucketed},
        "loglikelihood": {"examples": len(ctxs), "mc_samples": K, "batch_size": args.batch_size,
                          "batched_examples_per_s": len(ctxs) / t_ll_batched,
                          "per_example_examples_per_s": len(ctxs) / t_per_example,
                          "row_at_a_time_examples_per_s": len(ctxs) / t_rows,
                          "speedup_vs_per_example": t_per_example / t_ll_batched,
                          "speedup_vs_row_at_a_time": t_rows / t_ll_batched,
                          "one_token_batched_examples_per_s": len(ctxs) / t_one_batched,
                          "one_token_one_at_a_time_examples_per_s": len(ctxs) / t_one_single},
    }
    g, l = res["generation"], res["loglikelihood"]
    print(f"{desc} on {device} ({res['threads']} threads)")
    print(f"generation, {len(prompts)} prompts x {G} tokens, {G} steps, block {kw['block_length']}:")
    print(f"  one batch, mixed prompt lengths   {g['batched_tokens_per_s']:9.1f} tokens/s")
    print(f"  length-bucketed batches           {g['bucketed_tokens_per_s']:9.1f} tokens/s")
    print(f"  one at a time                     {g['one_at_a_time_tokens_per_s']:9.1f} tokens/s"
          f"   (bucketed is {g['speedup']:.1f}x)")
    print(f"loglikelihood, {len(ctxs)} examples x {K} MC samples:")
    print(f"  batched rows of many examples ({args.batch_size}/forward) {l['batched_examples_per_s']:8.2f} examples/s")
    print(f"  one example per call, its K samples batched          {l['per_example_examples_per_s']:8.2f} examples/s")
    print(f"  one (example, sample) row per forward                {l['row_at_a_time_examples_per_s']:8.2f} examples/s")
    print(f"one-token continuations (exact, 1 forward each), {len(ctxs)} examples:")
    print(f"  batched        {l['one_token_batched_examples_per_s']:8.2f} examples/s")
    print(f"  one at a time  {l['one_token_one_at_a_time_examples_per_s']:8.2f} examples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
