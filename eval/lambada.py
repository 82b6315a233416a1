"""LAMBADA last-word accuracy for masked diffusion LMs, two ways.

    python -m eval.lambada --ckpt runs/NAME [--data lambada_test.jsonl] [--limit N] [--mc-samples K]

The target is the passage's last word (split on spaces, as lm-eval's lambada_openai does), scored with its
leading space; under a BPE it often spans several tokens, which must be predicted *jointly*:

  greedy   The continuation is fully masked (its length is given) and decoded by greedy iterative
           unmasking: each step predicts every masked position and unmasks the most confident one. Correct
           when the decoded tokens equal the target exactly. This is what lm-eval's lambada `acc` measures:
           lm-eval reads `is_greedy` from loglikelihood(), and the `unmask` model computes is_greedy with this
           same decoding (eval/lm_eval_model.py), so the two numbers agree. (For AR models is_greedy is the
           usual teacher-forced argmax check, which equals greedy left-to-right decoding.)
  ranking  Every distinct word of the passage, plus the target, is a candidate last word; each is scored by
           the conditional log-likelihood estimate (LLaDA's Monte Carlo ELBO, exact for one-token words),
           and the passage counts as correct when the target scores highest. It asks whether the model's
           likelihood prefers the right word among plausible ones, and is not comparable to lm-eval's acc.
           (Roughly 80% of LAMBADA targets occur earlier in the passage; including the target in the set keeps
           the task solvable for the rest.)

Also reported: mean log-likelihood of the target and lm-eval's `perplexity` (exp of minus the mean over
passages of the target's log-likelihood; an upper bound for diffusion models).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .likelihood import conditional_loglikelihood, encode_pair, greedy_fill

SHARED_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lambada" / "lambada_test.jsonl"
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def split_passage(text: str) -> tuple[str, str]:
    """(context, target with its leading space), exactly as lm-eval's lambada_openai task builds them."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def candidate_words(context: str, target: str) -> list[str]:
    """Distinct words of the passage in order of first appearance, the target (without its space) included."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(context):
        seen.setdefault(w, None)
    seen.setdefault(target.strip(), None)
    return list(seen)


def load_passages(path: Optional[str]) -> list[str]:
    if path is None:
        if SHARED_FILE.is_file():
            path = str(SHARED_FILE)
        else:
            from datasets import load_dataset
            return list(load_dataset("EleutherAI/lambada_openai", "default", split="test")["text"])
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@torch.no_grad()
def evaluate_lambada(model, tok, passages: list[str], *, mask_id: int, mc_samples: int = 16, batch_size: int = 64,
                     max_length: Optional[int] = None, ranking: bool = True, seed: int = 0,
                     prefix_id: Optional[int] = None, objective=None) -> dict:
    """Greedy and ranking accuracies (see the module docstring) plus per-passage details."""
    pairs = [encode_pair(tok, *split_passage(p), prefix_id) for p in passages]
    ctxs = [c for c, _ in pairs]
    conts = [x for _, x in pairs]
    t0 = time.perf_counter()
    preds = greedy_fill(model, ctxs, [len(c) for c in conts], mask_id=mask_id, batch_size=batch_size,
                        max_length=max_length, objective=objective)
    t_greedy = time.perf_counter() - t0
    greedy_ok = [p == c for p, c in zip(preds, conts)]
    t0 = time.perf_counter()
    target_ll = conditional_loglikelihood(model, ctxs, conts, mask_id=mask_id, mc_samples=mc_samples,
                                          batch_size=batch_size, seed=seed, max_length=max_length,
                                          objective=objective)
    t_ll = time.perf_counter() - t0
    rank_ok: list[Optional[bool]] = [None] * len(passages)
    best_words: list[Optional[str]] = [None] * len(passages)
    t_rank = 0.0
    if ranking:
        t0 = time.perf_counter()
        jobs = []  # (passage, word, ctx ids, cont ids)
        for i, p in enumerate(passages):
            context, target = split_passage(p)
            for w in candidate_words(context, target):
                if w == target.strip():
                    continue  # the target's own score is target_ll[i]
                c, x = encode_pair(tok, context, " " + w, prefix_id)
                jobs.append((i, w, c, x))
        lls = conditional_loglikelihood(model, [j[2] for j in jobs], [j[3] for j in jobs], mask_id=mask_id,
                                        mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                                        max_length=max_length, objective=objective)
        best = [(target_ll[i].logprob, split_passage(p)[1].strip()) for i, p in enumerate(passages)]
        for (i, w, _, _), ll in zip(jobs, lls):
            if ll.logprob > best[i][0]:
                best[i] = (ll.logprob, w)
        for i, p in enumerate(passages):
            best_words[i] = best[i][1]
            rank_ok[i] = best[i][1] == split_passage(p)[1].strip()
        t_rank = time.perf_counter() - t0
    n = len(passages)
    mean_ll = sum(r.logprob for r in target_ll) / max(n, 1)
    multi = [i for i in range(n) if len(conts[i]) > 1]
    out = {
        "n": n,
        "greedy_acc": sum(greedy_ok) / max(n, 1),
        "ranking_acc": (sum(bool(r) for r in rank_ok) / max(n, 1)) if ranking else None,
        "lm_eval_acc_equivalent": "greedy_acc",
        "target_mean_loglik": mean_ll,
        "perplexity": math.exp(min(-mean_ll, 700.0)),
        "multi_token_targets": len(multi),
        "greedy_acc_multi_token": (sum(greedy_ok[i] for i in multi) / len(multi)) if multi else None,
        "mc_samples": mc_samples,
        "seconds": {"greedy": t_greedy, "target_loglik": t_ll, "ranking": t_rank},
        "details": [{"target": split_passage(p)[1], "greedy": tok.decode(preds[i]), "greedy_ok": greedy_ok[i],
                     "ranked_best": best_words[i], "ranking_ok": rank_ok[i], "target_loglik": target_ll[i].logprob,
                     "target_tokens": len(conts[i])} for i, p in enumerate(passages)],
    }
    return out


def main(argv=None) -> int:
    from .generate import resolve_device, resolve_dtype
    from .load import load
    ap = argparse.ArgumentParser(prog="python -m eval.lambada", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", help="LAMBADA jsonl (field text); default: shared/data copy, else the hub")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--mc-samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-ranking", action="store_true", help="skip the (costlier) likelihood ranking")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", help="write the JSON report here")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    run = load(args.ckpt, device=device, dtype=resolve_dtype("auto", device))
    refusal = None if run.is_ar else run.objective.conditional_refusal()
    if refusal:  # sedd, d3pm, dfm, uniform, hybrid: the masked-answer estimator is not their bound
        raise SystemExit(f"eval.lambada: {refusal}")
    passages = load_passages(args.data)[:args.limit]
    tok = run.tokenizer
    prefix = getattr(tok, "bos_id", None)
    prefix = prefix if prefix is not None else getattr(tok, "eos_id", None)
    res = evaluate_lambada(run.model, tok, passages, mask_id=run.cfg.model.mask_id, mc_samples=args.mc_samples,
                           batch_size=args.batch_size, max_length=min(run.cfg.data.seq_len, run.cfg.model.max_seq_len),
                           ranking=not args.no_ranking, seed=args.seed, prefix_id=prefix,
                           objective=None if run.is_ar else run.objective)
    res.update(ckpt=str(run.path), step=run.step, kind="ar" if run.is_ar else "diffusion")
    rank = "skipped" if res["ranking_acc"] is None else f"{res['ranking_acc']:.4f}"
    print(f"LAMBADA ({res['n']} passages, {res['multi_token_targets']} with multi-token targets), {run.path}")
    print(f"  greedy joint decoding acc : {res['greedy_acc']:.4f}   <- what lm-eval's lambada_openai acc reports")
    print(f"  likelihood ranking acc    : {rank}   (target vs. the passage's words)")
    print(f"  target mean log-lik {res['target_mean_loglik']:.4f} nats, perplexity {res['perplexity']:.2f}"
          f"{' (upper bound)' if not run.is_ar else ''}")
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
