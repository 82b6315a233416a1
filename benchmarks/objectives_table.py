"""The objectives of one equal-compute sweep side by side: bound, gap, samples scored, sampling speed.

    python benchmarks/objectives_table.py runs/cpu-objectives-quickstart [--samples 64] [--json F]
    python benchmarks/objectives_table.py runs/cpu-objectives-shakespeare --ar-run sh-ar-C6e12-s0

Reads a sweep's index (python -m launch.sweep run configs/sweeps/cpu-objectives-*.yaml) and prints, per run:
training steps, tokens and FLOPs; the held-out bound (nats/token, with its 95% interval and the estimator);
on the synthetic language its gap to the exact entropy, on text its gap to the AR run's exact NLL; for genmd4
runs the learned exponents' spread. Then each run's own sampler (objective.generate: masked objectives'
ancestral `mdlm` step, block diffusion block by block, the uniform/sedd/d3pm/dfm samplers) draws --samples
unconditional sequences of the training length in --steps steps (default: the length) at temperature 1, and
the samples are scored: on the synthetic language by the true language (NLL per token against its entropy,
valid transitions, unigram entropy, bigram TV against the language's pairs); on text by their generative
perplexity under the AR run and their unigram entropy. Block runs are sampled with the exact KV cache and
without it (same generators: the outputs must be identical) and both speeds are printed. Speed is generated
tokens per second of this process's CPU time (with --threads 1, what a sampler costs even on a shared machine).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampling import gen_ppl, language_of, text_unigram_entropy  # noqa: E402

from eval.load import load  # noqa: E402
from model.sample import generate, row_generators  # noqa: E402

Z95 = 1.959963984540054


def exponent_spread(loaded) -> str:
    from model.objectives.genmd4 import exponents_module
    w = exponents_module(loaded.model)().detach().double()
    mask_id, n = loaded.cfg.model.mask_id, getattr(loaded.tokenizer, "vocab_size", None) or w.numel()
    w = w[[i for i in range(min(n, w.numel())) if i != mask_id]]
    q = torch.quantile(w, torch.tensor([0.1, 0.9], dtype=w.dtype))
    return f"w {float(w.min()):.2f} / {float(q[0]):.2f} / {float(w.mean()):.2f} / {float(q[1]):.2f} / {float(w.max()):.2f}"


# Sampler variants beyond each objective's default, as (name, sampler, diffusion keys set for the draw).
VARIANTS = {
    "uniform": [("psi kappa=0.5", "psi", {"psi_kappa": 0.5}), ("greedy tail", "mdlm", {"noise_removal": "greedy"}),
                ("self-correct x8", "mdlm", {"self_correct_steps": 8})],
    "sedd": [("euler", "mdlm", {"predictor": "euler"})],
}
VARIANTS["hybrid"] = VARIANTS["uniform"]


def sample(loaded, n: int, length: int, steps: int, seed: int, kv_cache: str = "none", sampler: str = "mdlm",
           keys: dict | None = None):
    """(rows, CPU seconds): n unconditional samples with the run's own sampler (diffusion `keys` set on its
    objective for this draw), one generator per row."""
    cfg, obj = loaded.cfg, loaded.objective
    prompt = None
    if obj.causal:  # AR needs a first token to condition on: the language's own first token, or BOS on text
        prompt = first_tokens(loaded, n, seed)
        length, steps = length - 1, max(1, steps - 1)
    kw = dict(mask_id=cfg.model.mask_id, gen_length=length, steps=steps, batch_size=n, temperature=1.0,
              generator=row_generators([seed * 100_003 + i for i in range(n)]), objective=obj)
    if not obj.causal:
        kw["sampler"] = sampler  # masked objectives: mdlm is the ancestral step; others read their own keys
    if obj.name == "block":
        kw["kv_cache"] = kv_cache
    # a key lives on the objective's config, or on the objective itself when it resolved it at construction
    targets = [(t, k) for k in keys or {} for t in (obj.cfg, obj) if hasattr(t, k)]
    if keys and {k for _, k in targets} != set(keys):
        raise SystemExit(f"{obj.name} has no sampler key(s) {sorted(set(keys) - {k for _, k in targets})}")
    saved = [(t, k, getattr(t, k)) for t, k in targets]
    for t, k in targets:
        setattr(t, k, keys[k])
    try:
        c = time.process_time()
        with torch.no_grad():
            out = generate(loaded.model, prompt, **kw)
        return out[:, -(length + (prompt is not None)):].tolist(), time.process_time() - c
    finally:
        for t, k, v in saved:
            setattr(t, k, v)


def first_tokens(loaded, n: int, seed: int) -> torch.Tensor:
    """(n, 1) first tokens for AR sampling: drawn from the synthetic language's stationary start (so the whole
    sequence is a draw from the model), or BOS (else EOS) on text."""
    if loaded.cfg.data.kind == "synthetic":
        lang = language_of(loaded.cfg)
        u = np.random.default_rng(seed + 7).random((n, 1))
        return torch.from_numpy(lang.sample(u)[:, :1].copy())
    tok = loaded.tokenizer
    first = getattr(tok, "bos_id", None)
    first = getattr(tok, "eos_id", None) if first is None else first
    if first is None:
        raise SystemExit("the AR run's tokenizer has neither BOS nor EOS to start a sample from")
    return torch.full((n, 1), int(first), dtype=torch.long)


def score(gen, lang, ar_model) -> dict:
    if lang is not None:
        sc = lang.score(np.zeros((len(gen), 0), dtype=np.int64), np.asarray(gen))
        return dict(nll=sc["nll"] if sc["finite"] else float("inf"), finite=sc["finite"], valid=sc["valid"],
                    unigram=sc["unigram_entropy"], bigram_tv=sc["bigram_tv"])
    out = dict(unigram=text_unigram_entropy(gen))
    if ar_model is not None:
        out["gen_ppl"] = gen_ppl(ar_model, [[g[0]] for g in gen], [g[1:] for g in gen])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="the sweep's run folder (runs/NAME, holding index.jsonl)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="sampling steps (0: the training length)")
    ap.add_argument("--ar-run", default="", help="text: the sweep's AR run, for generative perplexity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-samples", action="store_true", help="the bound table only")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = Path(args.sweep)
    index = d / "index.jsonl"
    if not index.is_file():
        raise SystemExit(f"{index} does not exist: run the sweep first (python -m launch.sweep run ...)")
    records = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{index} holds no finished run yet")
    first = load(d / records[0]["name"])
    synthetic = first.cfg.data.kind == "synthetic"
    L = records[0]["seq_len"]
    lang = language_of(first.cfg) if synthetic else None
    H = lang.entropy_per_token(L) if synthetic else None
    ar_nll = next((r["final_nelbo"] for r in records if r["objective"] == "ar"), None)
    ar_model = load(d / args.ar_run).model.eval() if args.ar_run else None
    steps = args.steps or L
    rows = []
    for r in records:
        label = r.get("label") or r["objective"]
        row = {"run": r["name"], "label": label, "objective": r["objective"], "steps": r["steps"],
               "tokens": r["tokens"], "flops": r["flops"], "bound": r["final_nelbo"], "ci95": Z95 * r["final_stderr"],
               "estimator": r["eval"]["method"], "sequences": r["eval"]["sequences"], "mc": r["eval"]["samples"]}
        loaded = load(d / r["name"])
        if synthetic:  # AR scores tokens 2..L given their prefixes: it bounds the entropy rate
            row["reference"] = float(lang.entropy_rate) if loaded.objective.causal else H
        else:
            row["reference"] = ar_nll if ar_nll is not None else float("nan")
        row["gap"] = row["bound"] - row["reference"]
        loaded.model.eval()
        if r["objective"] == "genmd4":
            row["exponents"] = exponent_spread(loaded)
        if not args.no_samples:
            modes = ["prefix", "none"] if r["objective"] == "block" else ["none"]
            outs = {}
            for mode in modes:
                outs[mode], cpu = sample(loaded, args.samples, L, steps, args.seed, mode)
                row[f"tok_per_cpu_s{'_nocache' if mode == 'none' and len(modes) > 1 else ''}"] = \
                    args.samples * L / cpu
            if len(modes) > 1:
                row["cache_identical"] = outs["prefix"] == outs["none"]
            row.update(score(outs[modes[0]], lang, ar_model))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.no_samples:
            continue
        for name, sampler, keys in VARIANTS.get(r["objective"], []):
            gen, cpu = sample(loaded, args.samples, L, steps, args.seed, sampler=sampler, keys=keys)
            var = {k: row[k] for k in ("run", "objective", "steps", "tokens", "flops", "bound", "ci95", "gap",
                                       "estimator", "sequences", "mc")}
            var.update(label=f"{label}, {name}", variant=True, tok_per_cpu_s=args.samples * L / cpu,
                       **score(gen, lang, ar_model))
            rows.append(var)
            print(json.dumps(var), file=sys.stderr, flush=True)
    ref = None
    if synthetic:  # the language's own samples: what a perfect sampler scores at this sample count
        real = lang.sample(np.random.default_rng(args.seed).random((args.samples, L)))
        ref = lang.score(np.zeros((args.samples, 0), dtype=np.int64), real)
    if args.json:
        Path(args.json).write_text(json.dumps({"sweep": str(d), "entropy": H, "rows": rows, "real": ref,
                                               "steps": steps, "samples": args.samples, "seq_len": L}, indent=1))
    print(table(rows, synthetic, H, steps, args.samples, L, ref))
    return 0


def table(rows, synthetic: bool, H, steps: int, n: int, L: int, ref=None) -> str:
    against = (f"the exact entropy H = {H:.4f} (AR: the entropy rate, as it scores tokens 2..L)" if synthetic
               else "the AR run's exact NLL")
    out = [f"Held-out bound (nats/token, 95% interval) and gap to {against}; {n} samples of {L} tokens in {steps} "
           f"steps, temperature 1, each run's own sampler", ""]
    head = "| objective | steps | tokens | bound | gap | estimator |"
    sep = "|---|---|---|---|---|---|"
    if synthetic:
        head += " sample NLL | valid | unigram H | bigram TV | tok/CPU-s |"
        sep += "---|---|---|---|---|"
    else:
        head += " gen PPL | unigram H | tok/CPU-s |"
        sep += "---|---|---|"
    out += [head, sep]
    if ref is not None:
        out.append(f"| real samples of the language | | | | | | {ref['nll']:.3f} | {100 * ref['valid']:.1f}% | "
                   f"{ref['unigram_entropy']:.2f} | {ref['bigram_tv']:.3f} | |")
    for r in rows:
        line = (f"| {r['label']} | {r['steps']} | {r['tokens']:.3g} | {r['bound']:.4f} ± {r['ci95']:.4f} | "
                f"{r['gap']:+.4f} | {r['estimator']} ({r['sequences']} x {r['mc']}) |")
        if r.get("variant"):  # another sampler of the run above: only the sample columns differ
            line = f"| {r['label']} | | | (same run) | | |"
        speed = ""
        if "tok_per_cpu_s" in r:
            speed = f"{r['tok_per_cpu_s']:.0f}"
            if "tok_per_cpu_s_nocache" in r:
                speed += (f" (no cache {r['tok_per_cpu_s_nocache']:.0f}, "
                          f"{'identical' if r['cache_identical'] else 'DIFFERENT'})")
        if synthetic and "valid" in r:
            nll = f"{r['nll']:.3f}" if math.isfinite(r["nll"]) else "inf"
            line += f" {nll} | {100 * r['valid']:.1f}% | {r['unigram']:.2f} | {r['bigram_tv']:.3f} | {speed} |"
        elif "unigram" in r:
            line += f" {r.get('gen_ppl', float('nan')):.1f} | {r['unigram']:.2f} | {speed} |"
        elif synthetic:
            line += " | | | | |"
        else:
            line += " | | |"
        out.append(line)
    spread = [f"- {r['label']}: {r['exponents']}" for r in rows if "exponents" in r]
    if spread:
        out += ["", "Learned exponents over the real tokens (min / 10% / mean / 90% / max):"] + spread
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
