"""Generate text from a checkpoint.

    python -m eval.generate --ckpt runs/shakespeare --prompt "ROMEO:" --gen-length 128 --steps 64 \
        --block-length 32 [--temperature 0.7] [--remasking low_confidence|random] [--sampler llada|mdlm] \
        [--cfg-scale 1.0] [--min-new-tokens 16] [--stop-at-eos] [--num-samples 4] [--visualize] \
        [--decode fixed|threshold|factor] [--threshold 0.9] [--factor 1.0] [--kv-cache none|prefix|dual] \
        [--refresh-every 0]

Fast generation (model/sample.py): `--decode threshold --threshold 0.9` unmasks every position of the block
whose confidence exceeds 0.9 (at least one per step), `--decode factor` applies Fast-dLLM's factor rule;
with those, --steps is an upper bound (default gen-length: one token per step at least). `--kv-cache prefix`
reuses the keys/values of the prompt and finished blocks within a block, `dual` those of the masked suffix
too; both are refreshed when a block completes (and every --refresh-every steps), and for a diffusion model
both are approximations. For an AR checkpoint any --kv-cache other than none is the ordinary exact cache.

Several --prompt flags (or --prompt-file, one prompt per line) are generated together as one left-padded
batch. --visualize prints the partially unmasked text after every step (░ = still masked). AR checkpoints
decode left to right (block/steps/remasking options do not apply to them).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .load import load
from model.remdm import ReMDMConfig
from model.sample import generate, render, row_generators, strip_after_eos


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 on GPU (fp16 overflows in these models), fp32 on CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def prompt_prefix(tok, use_bos: bool) -> list[int]:
    """Start-of-text conditioning: BOS when the tokenizer has one, else EOS (the document separator)."""
    if not use_bos:
        return []
    for special in (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)):
        if special is not None:
            return [special]
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run directory, checkpoint folder or .safetensors export")
    ap.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable); default: none")
    ap.add_argument("--prompt-file", help="file with one prompt per line")
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    ap.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: gen-length)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; >0: Gumbel-max sampling")
    ap.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    ap.add_argument("--sampler", choices=["llada", "mdlm", "remdm", "psi"], default="llada",
                    help="llada: confidence/random remasking; mdlm: ancestral sampler with prediction caching; "
                    "psi (uniform / hybrid checkpoints): the Psi-mixing step with diffusion.psi_kappa; "
                         "remdm: ReMDM, which re-masks decoded tokens (model/remdm.py)")
    ap.add_argument("--remdm-strategy", choices=["cap", "rescale", "conf", "loop"], default="rescale",
                    help="ReMDM's remasking schedule (--sampler remdm)")
    ap.add_argument("--eta", type=float, default=0.015, help="ReMDM's remasking strength (cap/rescale/loop)")
    ap.add_argument("--top-p", type=float, default=0.9, help="ReMDM's nucleus (1: off)")
    ap.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance weight w (0: off)")
    ap.add_argument("--decode", choices=["fixed", "threshold", "factor"], default="fixed",
                    help="parallel decoding policy of the llada sampler (fixed: LLaDA's even split)")
    ap.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of --decode threshold")
    ap.add_argument("--factor", type=float, default=1.0, help="factor of --decode factor")
    ap.add_argument("--kv-cache", choices=["none", "prefix", "dual"], default="none",
                    help="KV cache for block decoding (approximate for diffusion, exact for AR)")
    ap.add_argument("--refresh-every", type=int, default=0,
                    help="also refresh the cache every N steps inside a block (0: only when a block completes)")
    ap.add_argument("--min-new-tokens", type=int, default=0, help="forbid EOS before this many generated tokens")
    ap.add_argument("--stop-at-eos", action="store_true", help="fill everything after the first EOS with EOS")
    ap.add_argument("--no-bos", action="store_true", help="do not prepend BOS (or EOS) to prompts")
    ap.add_argument("--visualize", action="store_true", help="print the canvas after every step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default; on a shared CPU, 1-2 "
                    "threads avoid oversubscribed spinning)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    try:
        run = load(args.ckpt, device=device, dtype=resolve_dtype(args.dtype, device))
    except FileNotFoundError as e:  # a wrong --ckpt: the message says what would be valid
        raise SystemExit(f"error: {e}") from None
    tok, cfg = run.tokenizer, run.cfg
    texts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file) as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        texts = [""]
    texts = [t for t in texts for _ in range(args.num_samples)]
    prefix = prompt_prefix(tok, not args.no_bos)
    prompts = [prefix + tok.encode(t) if t else list(prefix) for t in texts]
    limit = cfg.model.max_seq_len
    if max(map(len, prompts)) + args.gen_length > limit:
        print(f"error: prompt + gen-length exceeds model.max_seq_len={limit}", file=sys.stderr)
        return 2
    if run.is_ar and not any(prompts):
        print("error: this AR checkpoint's tokenizer has no BOS/EOS to start from: give a --prompt",
              file=sys.stderr)
        return 2
    steps = args.steps or args.gen_length
    # one generator per row (seed + row index): a row's sample does not depend on the other prompts
    gen = row_generators([args.seed * 1_000_003 + i for i in range(len(prompts))], device)
    eos = getattr(tok, "eos_id", None)
    mask_id = cfg.model.mask_id
    P = max(map(len, prompts))

    def show(step: int, x: torch.Tensor) -> None:
        for i, row in enumerate(x[:, P:].tolist()):
            tag = f"[step {step:>3}]" + (f"[{i}]" if len(texts) > 1 else "")
            print(f"{tag} {render(tok, row, mask_id)!r}")

    stats: dict = {}
    t0 = time.perf_counter()
    try:
        out = generate(run.model, prompts if any(prompts) else None, mask_id=mask_id, gen_length=args.gen_length,
                       steps=steps, block_length=args.block_length, temperature=args.temperature,
                       remasking=args.remasking, sampler=args.sampler, generator=gen, batch_size=len(prompts),
                       cfg_scale=args.cfg_scale, eos_id=eos, min_new_tokens=args.min_new_tokens,
                       stop_at_eos=args.stop_at_eos and eos is not None, callback=show if args.visualize else None,
                       decode=args.decode, threshold=args.threshold, factor=args.factor, kv_cache=args.kv_cache,
                       refresh_every=args.refresh_every, stats=stats, objective=run.objective,
                       remdm=ReMDMConfig(args.remdm_strategy, args.eta, args.top_p))
    except ValueError as e:  # an impossible option combination (e.g. --decode threshold --sampler mdlm)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    kind = "AR left-to-right" if run.is_ar else (
        f"{args.sampler}" + (f", {args.remasking} remasking" if args.sampler == "llada" else ""))
    if not run.is_ar and args.decode != "fixed":
        kind += f", {args.decode} decoding " + (f"(tau {args.threshold})" if args.decode == "threshold"
                                                 else f"(factor {args.factor})")
    own_blocks = getattr(run.objective, "block_size", None)  # block diffusion: its own blocks, its exact cache
    if args.kv_cache != "none":
        kind += " | exact KV cache" if run.is_ar or own_blocks else f" | {args.kv_cache} KV cache"
        if args.refresh_every and not run.is_ar:
            kind += f" (refresh every {args.refresh_every})"
    print(f"# {run.path} (step {run.step}) | {kind} | {len(prompts)} x {args.gen_length} tokens, {steps} steps, "
          f"block {own_blocks or args.block_length or args.gen_length}, temperature {args.temperature}, cfg {args.cfg_scale}")
    for text, row in zip(texts, out[:, P:].tolist()):
        body = tok.decode(strip_after_eos(row, eos))
        print("=" * 80)
        print(f"{text}\033[1m{body}\033[0m" if sys.stdout.isatty() else f"{text}{body}")
    print("=" * 80)
    canvas = len(prompts) * (P + args.gen_length)  # token positions of one full forward of the batch
    print(f"# {len(prompts) * args.gen_length / dt:.1f} tokens/s ({dt:.2f} s, {stats['forwards']} forward passes, "
          f"{stats['forward_tokens'] / canvas:.1f} full-canvas equivalents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
