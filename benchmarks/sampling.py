"""Sampler quality and speed: every sampler x decoding policy x KV cache x steps, scored by an oracle.

    python benchmarks/sampling.py --ckpt runs/SYNTH [--samples 32] [--prompt-len 32] [--gen-length 96]
        [--block-length 32] [--temperatures 0,1] [--grid full|quick|target] [--repeat 1] [--threads N] [--json F]
    python benchmarks/sampling.py --ckpt runs/SHAKESPEARE --ar-ckpt runs/SHAKESPEARE-AR   # real text

On a checkpoint trained on the built-in synthetic language (data.kind=synthetic) the true language is
known exactly (data/synthetic.py), so every sample is scored against it:
  - nll: the exact per-token negative log-likelihood of the generated tokens under the true language, given
    the prompt (-log P(x_t | x_t-1) averaged over the generated tokens), mean over samples; a sample with a
    transition the language forbids has infinite NLL: those are left out of the mean and counted in `p>0`;
  - H: the true entropy rate, the expected NLL of real continuations. Ancestral sampling from a perfect
    model sits at H; mode-seeking decoding (greedy, confidence-ordered) sits below it; errors sit above;
  - valid: the fraction of generated transitions the language allows;
  - unigram H: the entropy of each sample's token histogram (repetition shows up as low entropy);
  - bigram TV (--grid remdm): total variation between the generated adjacent pairs and the language's pair
    distribution, one number for both errors and mode collapse (real data: its sampling floor).
The first row scores real continuations from the language itself (the reference). Prompts are the first
--prompt-len tokens of sequences from the language (--prompt-len 0: unconditional).

On a text checkpoint, --ar-ckpt (an AR run trained with this project on the same data) gives the generative
perplexity of the samples (exp of their mean NLL under the AR model, MDLM's Gen PPL) next to the unigram
entropy; prompts are windows of --text (default: the tail of Tiny Shakespeare).

--grid remdm measures inference-time scaling: MDLM ancestral, LLaDA low-confidence (T = 0 and 1) and ReMDM
(cap, rescale, conf, loop; top-p 1 and 0.9) at steps = L/4, L/2, L, 2L, 4L (L = --gen-length), scored as above.
For whole unconditional sequences: --prompt-len 0 --gen-length L --block-length L.

Speed: tokens/s (generated tokens / wall time, best of --repeat), tokens/CPU-s (the same per second of this
process's CPU time: with --threads 1 it is what a setting costs even on a busy shared machine, and the
speedup column uses it), NFE (forward passes per row) and `canvas`:
token positions pushed through the model per row, in units of one full forward of the canvas (a cached
step costs a fraction of one). Every row has its own generator (batch-invariant sampling).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.sample import generate, row_generators  # noqa: E402

# (sampler, decode, kv_cache, steps as a fraction of gen_length, threshold/factor)
FULL_GRID = [
    ("llada", "fixed", "none", 1.0, None),
    ("llada", "fixed", "none", 0.5, None),
    ("llada", "fixed", "none", 0.25, None),
    ("llada", "fixed", "prefix", 1.0, None),
    ("llada", "fixed", "dual", 1.0, None),
    ("llada", "threshold", "none", 1.0, 0.9),
    ("llada", "threshold", "prefix", 1.0, 0.9),
    ("llada", "threshold", "dual", 1.0, 0.9),
    ("llada", "threshold", "dual", 1.0, 0.7),
    ("llada", "factor", "dual", 1.0, 1.0),
    ("mdlm", "fixed", "none", 1.0, None),
    ("mdlm", "fixed", "dual", 1.0, None),
]
QUICK_GRID = [FULL_GRID[i] for i in (0, 2, 5, 7, 9, 10)]
TARGET_GRID = [FULL_GRID[i] for i in (0, 7)]  # the baseline and threshold 0.9 + dual cache

# --grid remdm, inference-time scaling: every setting at steps = L/4, L/2, L, 2L, 4L (L = --gen-length).
# (label, sampler, temperature, ReMDM (strategy, eta, top_p) or None). The etas are the reference scripts'; top-p
# 1 isolates the remasking, 0.9 is the reference's nucleus (remdm with eta = 0 is MDLM's ancestral step, so
# "mdlm top-p 0.9" is MDLM with the nucleus alone).
SCALING_GRID = [
    ("mdlm ancestral", "mdlm", 1.0, None),
    ("llada low-confidence", "llada", 0.0, None),
    ("llada low-confidence", "llada", 1.0, None),
    ("remdm cap eta=0.008", "remdm", 1.0, ("cap", 0.008, 1.0)),
    ("remdm rescale eta=0.015", "remdm", 1.0, ("rescale", 0.015, 1.0)),
    ("remdm conf", "remdm", 1.0, ("conf", 0.0, 1.0)),
    ("remdm loop eta=0.02", "remdm", 1.0, ("loop", 0.02, 1.0)),
    ("mdlm top-p 0.9 (remdm eta=0)", "remdm", 1.0, ("cap", 0.0, 0.9)),
    ("remdm rescale eta=0.015 top-p 0.9", "remdm", 1.0, ("rescale", 0.015, 0.9)),
    ("remdm loop eta=0.02 top-p 0.9", "remdm", 1.0, ("loop", 0.02, 0.9)),
]
SCALING_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0)


def language_of(cfg):
    from data.synthetic import MarkovLanguage
    s = cfg.data.synthetic
    return MarkovLanguage(s.num_symbols, s.branching, s.concentration, s.seed)


def oracle_scores(lang, prompts: np.ndarray, gen: np.ndarray) -> dict:
    """Exact scores of generated continuations gen (N, G) after prompts (N, P) under the Markov language
    (data/synthetic.py MarkovLanguage.score: nll, nll_se, finite, valid, unigram_entropy)."""
    return lang.score(prompts, gen)


@torch.no_grad()
def gen_ppl(ar_model, prompts: list[list[int]], gen: list[list[int]]) -> float:
    """exp(mean NLL of the generated tokens under the AR model, teacher-forced after the prompt)."""
    total, count = 0.0, 0
    for p, g in zip(prompts, gen):
        x = torch.tensor([p + g])
        logits = ar_model(x[:, :-1]).float()[0, len(p) - 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(g)[:, None])
        total -= float(lp.sum())
        count += len(g)
    return math.exp(total / count)


def text_unigram_entropy(gen: list[list[int]]) -> float:
    out = []
    for row in gen:
        _, c = np.unique(np.asarray(row), return_counts=True)
        p = c / c.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def timed_generate(model, prompts, repeat: int, seeds, **kw):
    """(output, best wall seconds, best CPU seconds of this process, stats)."""
    wall, cpu, out, stats = float("inf"), float("inf"), None, None
    for _ in range(max(1, repeat)):
        st: dict = {}
        t, c = time.perf_counter(), time.process_time()
        out = generate(model, prompts, generator=row_generators(seeds), stats=st, **kw)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        stats = st
    return out, wall, cpu, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a diffusion run (synthetic language: oracle scores)")
    ap.add_argument("--ar-ckpt", help="an AR run on the same data: generative perplexity (text checkpoints)")
    ap.add_argument("--samples", type=int, default=32, help="rows, generated as one batch")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=96)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--grid", choices=["full", "quick", "target", "remdm"], default="full",
                    help="remdm: inference-time scaling, MDLM / LLaDA / ReMDM at L/4..4L steps (--temperatures "
                         "unused: each row has its own)")
    ap.add_argument("--repeat", type=int, default=1, help="time each setting this many times, keep the best")
    ap.add_argument("--scaling-steps", default=",".join(f"{f:g}" for f in SCALING_STEPS),
                    help="--grid remdm: the step counts, as multiples of --gen-length")
    default_text = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
    ap.add_argument("--text", default=str(default_text),
                    help="text for the prompts of a text checkpoint (default: ../shared/data Tiny Shakespeare)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from eval.load import load
    run = load(args.ckpt)
    model, cfg = run.model, run.cfg
    if run.is_ar:
        print("error: --ckpt must be a diffusion run (pass AR runs as --ar-ckpt)", file=sys.stderr)
        return 2
    N, P, G = args.samples, args.prompt_len, args.gen_length
    if P + G > cfg.model.max_seq_len:
        print(f"error: prompt-len + gen-length exceeds model.max_seq_len={cfg.model.max_seq_len}", file=sys.stderr)
        return 2
    synthetic = cfg.data.kind == "synthetic"
    rng = np.random.default_rng(args.seed)
    if synthetic:
        lang = language_of(cfg)
        truth = lang.sample(rng.random((N, P + G)))
        prompts_np = truth[:, :P]
        prompts = prompts_np.tolist() if P else None
        H = lang.entropy_rate if P else lang.entropy_per_token(G)
        print(f"# {run.path}: synthetic language, {lang.num_symbols} symbols; true entropy rate {lang.entropy_rate:.4f}"
              f" nats/token (H of a {G}-token unconditional sample {lang.entropy_per_token(G):.4f})")
        ref = oracle_scores(lang, prompts_np, truth[:, P:])
    else:
        if not args.ar_ckpt:
            print("error: a text checkpoint needs --ar-ckpt (an AR run on the same data) for generative perplexity",
                  file=sys.stderr)
            return 2
        ar = load(args.ar_ckpt).model
        ids = run.tokenizer.encode(Path(args.text).read_text()[-200_000:])
        starts = rng.integers(0, len(ids) - P - G, size=N)
        prompts = [ids[s:s + P] for s in starts] if P else [[run.tokenizer.eos_id]] * N
        real = [ids[s + P:s + P + G] for s in starts]
        ref = {"gen_ppl": gen_ppl(ar, prompts, real), "unigram_entropy": text_unigram_entropy(real)}
        print(f"# {run.path}: real text, generative perplexity under {args.ar_ckpt}")
    print(f"# {N} samples x {G} tokens after a {P}-token prompt, blocks of {args.block_length}, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}")
    seeds = [args.seed * 100_003 + i for i in range(N)]
    rows = []
    mask_id = cfg.model.mask_id
    generate(model, prompts[:2] if prompts else None, mask_id=mask_id, gen_length=G, steps=G // 4,
             block_length=args.block_length, batch_size=2)  # warm-up
    if args.grid == "remdm":
        def score(gen: np.ndarray) -> dict:
            if synthetic:
                sc = oracle_scores(lang, prompts_np, gen)
                return {**sc, "nll_minus_H": sc["nll"] - H}
            g = gen.tolist()
            return {"gen_ppl": gen_ppl(ar, prompts, g), "unigram_entropy": text_unigram_entropy(g)}
        rows = scaling(model, prompts, seeds, score, mask_id=mask_id, gen_length=G, block_length=args.block_length,
                       batch_size=N, objective=run.objective, synthetic=synthetic, ref=ref,
                       H=H if synthetic else None, repeat=args.repeat,
                       fracs=[float(f) for f in args.scaling_steps.split(",")])
        if args.json:
            Path(args.json).write_text(json.dumps({"reference": ref, "H": H if synthetic else None, "rows": rows},
                                                  indent=1))
        return 0
    grid = {"full": FULL_GRID, "quick": QUICK_GRID, "target": TARGET_GRID}[args.grid]
    base_tps = {}
    # On a shared machine the wall clock measures the other processes too; with one thread, this process's
    # CPU time is the work the setting itself needs.
    speed_key = "tokens_per_cpu_s" if torch.get_num_threads() == 1 else "tokens_per_s"
    print(f"# speedup from {'CPU time (1 thread)' if speed_key == 'tokens_per_cpu_s' else 'wall time'}")
    for T in [float(t) for t in args.temperatures.split(",")]:
        for sampler, decode, kv, frac, knob in grid:
            steps = max(G // args.block_length, int(G * frac) // (G // args.block_length) * (G // args.block_length))
            kw = dict(mask_id=mask_id, gen_length=G, steps=steps, block_length=args.block_length, temperature=T,
                      sampler=sampler, decode=decode, kv_cache=kv, batch_size=N, pad_id=0)
            if decode == "threshold":
                kw["threshold"] = knob
            if decode == "factor":
                kw["factor"] = knob
            out, dt, cpu, st = timed_generate(model, prompts, args.repeat, seeds, **kw)
            gen = out[:, -G:].cpu().numpy()
            row = {"T": T, "sampler": sampler, "decode": decode + (f" {knob}" if knob is not None else ""),
                   "kv_cache": kv, "steps": steps, "tokens_per_s": N * G / dt, "seconds": dt,
                   "tokens_per_cpu_s": N * G / cpu, "cpu_seconds": cpu,
                   "nfe": st["forward_rows"] / N, "canvas": st["forward_tokens"] / (N * (P + G))}
            if synthetic:
                row.update(oracle_scores(lang, prompts_np, gen))
                row["nll_minus_H"] = row["nll"] - H
            else:
                g = gen.tolist()
                row.update(gen_ppl=gen_ppl(ar, prompts, g), unigram_entropy=text_unigram_entropy(g))
            key = (T,)
            if sampler == "llada" and decode == "fixed" and kv == "none" and frac == 1.0:
                base_tps[key] = row[speed_key]
            row["speedup"] = row[speed_key] / base_tps[key] if key in base_tps else float("nan")
            rows.append(row)
            print_row(row, synthetic, first=len(rows) == 1, ref=ref, H=H if synthetic else None)
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": ref, "rows": rows}, indent=1))
    return 0


def scaling(model, prompts, seeds, score, *, gen_length: int, block_length: int, batch_size: int, synthetic: bool,
            ref: dict, H, repeat: int, fracs=SCALING_STEPS, **kw) -> list[dict]:
    """The --grid remdm rows: each SCALING_GRID setting at each of `fracs` x gen_length steps, scored."""
    from model.remdm import ReMDMConfig
    n_blocks = gen_length // block_length
    rows = []
    if synthetic:
        print("| steps | sampler | T | top-p | NFE | NLL | NLL - H | p>0 | valid | unigram H | bigram TV | CPU s |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| | real data | | | | {ref['nll']:.4f} ± {ref['nll_se']:.4f} | {ref['nll'] - H:+.4f} "
              f"| {100 * ref['finite']:.0f}% | {100 * ref['valid']:.2f}% | {ref['unigram_entropy']:.3f} "
              f"| {ref['bigram_tv']:.3f} | |")
    else:
        print("| steps | sampler | T | top-p | NFE | Gen PPL | unigram H | CPU s |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        print(f"| | real text | | | | {ref['gen_ppl']:.2f} | {ref['unigram_entropy']:.3f} | |")
    for frac in fracs:
        steps = max(n_blocks, round(gen_length * frac / n_blocks) * n_blocks)
        for label, sampler, T, rem in SCALING_GRID:
            remdm = ReMDMConfig(*rem) if rem is not None else None
            out, dt, cpu, st = timed_generate(model, prompts, repeat, seeds, gen_length=gen_length, steps=steps,
                                              block_length=block_length, temperature=T, sampler=sampler,
                                              batch_size=batch_size, pad_id=0, remdm=remdm, **kw)
            row = {"steps": steps, "steps_over_L": frac, "setting": label, "sampler": sampler, "T": T,
                   "top_p": rem[2] if rem is not None else 1.0, "nfe": st["forward_rows"] / batch_size,
                   "seconds": dt, "cpu_seconds": cpu, **score(out[:, -gen_length:].cpu().numpy())}
            rows.append(row)
            head = f"| {steps} | {label} | {T:g} | {row['top_p']:g} | {row['nfe']:.0f} |"
            if synthetic:
                print(head + f" {row['nll']:.4f} ± {row['nll_se']:.4f} | {row['nll_minus_H']:+.4f} "
                             f"| {100 * row['finite']:.0f}% | {100 * row['valid']:.2f}% | {row['unigram_entropy']:.3f} "
                             f"| {row['bigram_tv']:.3f} | {cpu:.0f} |", flush=True)
            else:
                print(head + f" {row['gen_ppl']:.2f} | {row['unigram_entropy']:.3f} | {cpu:.0f} |", flush=True)
    return rows


def print_row(r: dict, synthetic: bool, first: bool, ref: dict, H) -> None:
    if first:
        if synthetic:
            print("| T | sampler | decode | cache | steps | NFE | canvas | tokens/s | tokens/CPU-s | speedup | NLL "
                  "| NLL - H | p>0 | valid | unigram H |")
            print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            print(f"| | real data | | | | | | | | | {ref['nll']:.4f} ± {ref['nll_se']:.4f} | {ref['nll'] - H:+.4f} "
                  f"| {100 * ref['finite']:.0f}% | {100 * ref['valid']:.2f}% | {ref['unigram_entropy']:.3f} |")
        else:
            print("| T | sampler | decode | cache | steps | NFE | canvas | tokens/s | tokens/CPU-s | speedup | Gen PPL "
                  "| unigram H |")
            print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            print(f"| | real text | | | | | | | | | {ref['gen_ppl']:.2f} | {ref['unigram_entropy']:.3f} |")
    head = (f"| {r['T']:g} | {r['sampler']} | {r['decode']} | {r['kv_cache']} | {r['steps']} | {r['nfe']:.1f} "
            f"| {r['canvas']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['speedup']:.1f}x |")
    if synthetic:
        print(head + f" {r['nll']:.4f} ± {r['nll_se']:.4f} | {r['nll_minus_H']:+.4f} | {100 * r['finite']:.0f}% "
                     f"| {100 * r['valid']:.2f}% | {r['unigram_entropy']:.3f} |", flush=True)
    else:
        print(head + f" {r['gen_ppl']:.2f} | {r['unigram_entropy']:.3f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
