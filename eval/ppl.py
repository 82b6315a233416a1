"""Zero-shot perplexity bounds (named protocols, docs/science.md section 4) for a checkpoint, one command:

    python -m eval.ppl --ckpt runs/NAME --datasets wikitext2,ptb,lambada --data-dir ../shared/data
    python -m eval.ppl --ckpt runs/NAME --protocol bd3lms --datasets ptb --samples 8 --method count
    python -m eval.ppl --counts-only --tokenizer ../shared/data/gpt2-tokenizer --data-dir ../shared/data

Each dataset's documents (the hub's rows) are detokenized as the reference code does, tokenized with the
checkpoint's own tokenizer and wrapped into [BOS] + (seq_len - 2) + [EOS] blocks as the protocol says
(mdlm: an EOS after every document, every position scored; bd3lms: no separator, BOS not scored). Diffusion
checkpoints report an upper bound on the NLL (NELBO) with its Monte Carlo error, autoregressive ones the exact
NLL of the same blocks. Every result carries its counts (rows, stream tokens, blocks, scored tokens), the
tokenizer fingerprint, estimator, samples and seed. Results go to <run_dir>/eval/ppl.json and ppl.md (merged with
earlier results). --counts-only prints the counts without a model. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from model.objectives import OBJECTIVES

from .corpora import (DATASETS, DEFAULT_SPLIT, PROTOCOLS, Blocks, CorpusError, get_protocol, load_corpus,
                      tokenize_and_wrap)
from .elbo import Estimate, evaluate_blocks

LN2 = math.log(2.0)


def synthetic_blocks(tokenizer, seq_len: int, n_blocks: int) -> tuple[Blocks, float]:
    """Blocks from the synthetic language's validation stream (the stream train.py validates on), with the
    exact entropy per token at this length."""
    from data.synthetic import SyntheticSource
    lang = getattr(tokenizer, "lang", None)
    if lang is None:
        raise CorpusError("dataset 'synthetic' needs a checkpoint trained on the synthetic language")
    x, _ = SyntheticSource(lang, seq_len, "valid", 0).get(list(range(n_blocks)))
    rows = x.tolist()
    n_bytes = sum(len(tokenizer.decode(r).encode("utf-8")) for r in rows)
    return (Blocks(rows, seq_len, n_blocks * seq_len, n_bytes, n_bytes, None, None, n_rows=n_blocks,
                   n_stream_tokens=n_blocks * seq_len), lang.entropy_per_token(seq_len))


def count_row(*, dataset: str, split: str, source: str, blocks: Blocks, seq_len: int, protocol: str,
              rows_per_wrap: int, tokenizer, wrap_shards: int = 1) -> dict:
    """What identifies the evaluated data: anyone with the same tokenizer can recompute these numbers."""
    return {"dataset": dataset, "split": split, "source": source, "protocol": protocol,
            "rows_per_wrap": rows_per_wrap, "wrap_shards": wrap_shards, "seq_len": seq_len, **blocks.counts(),
            "bos_id": blocks.bos_id, "eos_id": blocks.eos_id,
            "tokenizer": getattr(tokenizer, "fingerprint", None), "vocab_size": getattr(tokenizer, "vocab_size", None),
            "covered_bytes": blocks.covered_bytes, "total_bytes": blocks.total_bytes}


def result_row(est: Estimate, *, dataset: str, split: str, source: str, blocks: Blocks, seq_len: int,
               seconds: float, step: Optional[int], ckpt: str, true_entropy: Optional[float] = None,
               protocol: str = "mdlm", rows_per_wrap: int = 1000, tokenizer=None, weights: str = "model",
               wrap_shards: int = 1) -> dict:
    row = {**count_row(dataset=dataset, split=split, source=source, blocks=blocks, seq_len=seq_len,
                       protocol=protocol, rows_per_wrap=rows_per_wrap, tokenizer=tokenizer, wrap_shards=wrap_shards),
           "checkpoint": ckpt, "step": step, "weights": weights, **est.to_dict()}
    row["bits_per_byte"] = est.total_nats / LN2 / blocks.covered_bytes if blocks.covered_bytes else float("nan")
    row["bits_per_byte_stderr"] = est.stderr_nats / LN2 / blocks.covered_bytes if blocks.covered_bytes else float("nan")
    row["seconds"] = seconds
    passes = est.n_sequences * seq_len * max(est.samples, 1)
    row["seconds_per_1M_tokens"] = seconds / passes * 1e6 if passes else float("nan")  # per MC sample
    if true_entropy is not None:
        row["true_entropy"] = true_entropy
    return row


def _key(r: dict) -> tuple:
    return (r["dataset"], r["split"], r.get("protocol"), r["method"], r["samples"], r["seed"], r["seq_len"],
            r.get("step"), r.get("weights"))


def counts_table(rows: list[dict]) -> str:
    head = ("| dataset | split | protocol | rows | stream tokens | blocks | scored tokens | seq_len | tokenizer |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['dataset']} | {r['split']} | {r['protocol']} | {r['rows']:,} | {r['stream_tokens']:,} | "
             f"{r['blocks']:,} | {r['scored_tokens']:,} | {r['seq_len']} | {r['tokenizer']} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> str:
    head = ("| dataset | split | protocol | weights | method | K | seed | rows | stream tokens | blocks | scored tokens "
            "| NELBO nats/tok | s.e. | ppl | ppl 95% CI | bits/byte | tokenizer | s / 1M tok |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        le = "" if r["method"] == "ar" else "<="
        se = "exact" if r["method"] == "ar" else f"{r['stderr']:.4f}" + ("*" if r["samples"] <= 1 else "")
        ci = "" if r["method"] == "ar" else f"[{r['ppl_ci95'][0]:.2f}, {r['ppl_ci95'][1]:.2f}]"
        truth = f" (true {r['true_entropy']:.4f})" if r.get("true_entropy") is not None else ""
        lines.append(f"| {r['dataset']} | {r['split']} | {r.get('protocol', '')} | {r.get('weights', '')} | "
                     f"{r['method']} | {r['samples']} | {r['seed']} | {r.get('rows', '')} | "
                     f"{r.get('stream_tokens', '')} | {r['blocks']} | {r['n_tokens']:,} | {r['nelbo']:.4f}{truth} | "
                     f"{se} | {le}{r['ppl']:.2f} | {ci} | {r['bits_per_byte']:.4f} | {r.get('tokenizer', '')} | "
                     f"{r['seconds_per_1M_tokens']:.1f} |")
    foot = ("\nProtocols: " + "; ".join(p.describe() for p in PROTOCOLS.values()) + ". stream tokens: the "
            "concatenated documents, separators included, before cutting into blocks; scored tokens: the positions "
            "the estimator scores (AR: seq_len - 1 per block). weights: ema when the checkpoint's EMA weights were "
            "evaluated.\nppl: exp(NELBO per token), an upper bound (<=) for diffusion checkpoints, exact for AR. s.e.: Monte "
            "Carlo standard error per token; * with K=1 it is the between-block spread (conservative). "
            "bits/byte: total nats / ln 2 / UTF-8 bytes of the detokenized text in the blocks. "
            "s / 1M tok: wall seconds per million block tokens per Monte Carlo sample.\n")
    return head + "\n".join(lines) + "\n" + foot


def write_results(out_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    """Merge with earlier results in out_dir/ppl.json (same dataset/split/method/K/seed/length/step replaced)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path_json, path_md = out_dir / "ppl.json", out_dir / "ppl.md"
    old = []
    if path_json.is_file():
        try:
            old = json.loads(path_json.read_text()).get("results", [])
        except (json.JSONDecodeError, AttributeError):
            old = []
    merged = {_key(r): r for r in old}
    merged.update({_key(r): r for r in rows})
    allrows = sorted(merged.values(), key=lambda r: (r["dataset"], r["split"], str(r.get("protocol")), r["method"],
                                                     r["samples"], r["seed"]))
    path_json.write_text(json.dumps({"results": allrows}, indent=1))
    path_md.write_text(markdown_table(allrows))
    return path_json, path_md


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.ppl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="run directory, checkpoint folder, or model.safetensors export")
    p.add_argument("--protocol", default="mdlm", choices=tuple(PROTOCOLS),
                   help="mdlm: EOS after every document, all 1024 positions scored (kuleshov-group/mdlm); bd3lms: "
                        "documents concatenated with nothing between them, BOS not scored (bd3lms zs_ppl scripts)")
    p.add_argument("--rows-per-wrap", type=int, default=None,
                   help="documents wrapped together (remainder dropped per group): the reference's datasets.map "
                        "batch of 1000 by default; 0 wraps the whole stream at once")
    p.add_argument("--wrap-shards", type=int, default=None,
                   help="the reference's num_proc: rows are split into this many contiguous shards before the "
                        "1000-row wrap batches (default 1, as its zero-shot scripts ran)")
    p.add_argument("--raw-weights", action="store_true",
                   help="evaluate the trained weights even when the checkpoint holds EMA weights (default: EMA)")
    p.add_argument("--counts-only", action="store_true",
                   help="print rows, stream tokens, blocks and scored tokens per dataset without a model (a dry run)")
    p.add_argument("--tokenizer", default=None,
                   help="with --counts-only and no --ckpt: a tokenizer folder (vocab.json + merges.txt, or "
                        "tokenizer.json), a tokenizer.json file, or a run directory")
    p.add_argument("--datasets", default="wikitext2,ptb,lambada",
                   help=f"comma-separated: {', '.join(DATASETS)}, synthetic (synthetic-language runs)")
    p.add_argument("--split", default=None, help="validation | test | train; default: each dataset's protocol "
                   f"split ({', '.join(f'{k} {v}' for k, v in DEFAULT_SPLIT.items())})")
    p.add_argument("--data-dir", default=None, help="local files laid out like ../shared/data (see eval/corpora.py)")
    p.add_argument("--offline", action="store_true", help="never try the hub, local files only")
    p.add_argument("--method", default=None,
                   help="comma-separated estimators: mdlm (one antithetic t per sequence, default), t (K "
                   "stratified t per sequence), count (K stratified masked counts, LLaDA); AR checkpoints: ar")
    p.add_argument("--samples", type=int, default=1, help="Monte Carlo samples K per block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="rows (block x sample) per forward pass")
    p.add_argument("--seq-len", type=int, default=None,
                   help="block length including BOS and EOS (default: the protocol's 1024, or the model's "
                        "max_seq_len when that is shorter)")
    p.add_argument("--eps", type=float, default=None, help="t = (1-eps) u + eps for mdlm/t (default: the run's)")
    p.add_argument("--group", type=int, default=32, help="mdlm: blocks sharing one antithetic set of t")
    p.add_argument("--no-specials", action="store_true", help="plain blocks without BOS/EOS")
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks (quick checks; "
                   "synthetic default 64)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/eval)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_counting_tokenizer(spec: str):
    """A tokenizer for --counts-only: a run directory (its saved tokenizer) or any tokenizer spec data.prepare
    accepts (a GPT-2 folder with vocab.json + merges.txt, a tokenizer.json, a hub name)."""
    from data.tokenizer import META_FILE, TextTokenizer, build_tokenizer
    path = Path(spec)
    if path.is_dir() and (path / META_FILE).is_file() and (path / "tokenizer.json").is_file():
        return TextTokenizer.load(path)
    return build_tokenizer(spec, 0)


def _dataset_blocks(name, args, protocol, tok, seq_len, rank, world, say):
    """(blocks, source, split) of one dataset, or None after reporting why it cannot be evaluated."""
    # Rank 0 fetches first, so concurrent ranks find the hub cache filled rather than racing for it.
    corpus = None
    if rank == 0 or world == 1:
        corpus = _load_or_report(name, args)
    if world > 1:
        dist.barrier()
        if rank != 0:
            corpus = _load_or_report(name, args)
    if corpus is None:
        return None
    try:
        blocks = tokenize_and_wrap(corpus.docs, tok, seq_len, protocol=protocol, specials=not args.no_specials,
                                   max_blocks=args.max_blocks)
    except ValueError as e:
        say(f"{name}: cannot tokenize with this tokenizer: {e}")
        return None
    return blocks, corpus.source, corpus.split


def counts_main(args) -> tuple[list[dict], list[str]]:
    """--counts-only: the data and the protocol checked, no model needed."""
    if args.tokenizer:
        tok = load_counting_tokenizer(args.tokenizer)
    elif args.ckpt:
        from data import load_run_tokenizer
        from pretrain.checkpoint.store import find_checkpoint
        from pretrain.config import load_run_config
        run_dir, _ = find_checkpoint(args.ckpt, exports=True)
        tok = load_run_tokenizer(run_dir, load_run_config(run_dir))
    else:
        raise SystemExit("--counts-only needs --tokenizer PATH (e.g. ../shared/data/gpt2-tokenizer) or --ckpt RUN")
    protocol = get_protocol(args.protocol, args.rows_per_wrap, args.wrap_shards)
    seq_len = args.seq_len or 1024
    rows, failed = [], []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        got = _dataset_blocks(name, args, protocol, tok, seq_len, 0, 1, print)
        if got is None:
            failed.append(name)
            continue
        blocks, source, split = got
        rows.append(count_row(dataset=name, split=split, source=source, blocks=blocks, seq_len=seq_len,
                              protocol=protocol.name, rows_per_wrap=protocol.rows_per_wrap, tokenizer=tok,
                              wrap_shards=protocol.wrap_shards))
    print(f"counts | {protocol.describe()} | seq_len {seq_len} | tokenizer {getattr(tok, 'fingerprint', None)} "
          f"(vocab {tok.vocab_size}, BOS/EOS {rows[0]['bos_id'] if rows else None})")
    print(counts_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "counts.json").write_text(json.dumps({"counts": rows}, indent=1))
        (out / "counts.md").write_text(counts_table(rows))
    if failed:
        print(f"not counted: {', '.join(failed)}")
    return rows, failed


def main(argv=None) -> tuple[list[dict], list[str]]:
    """Returns (result rows, names of datasets that could not be evaluated)."""
    args = parse_args(argv)
    if args.counts_only:
        return counts_main(args)
    if not args.ckpt:
        raise SystemExit("--ckpt is required (or --counts-only --tokenizer PATH for a dry run without a model)")
    from pretrain.engines.parallel import init_distributed
    from .load import load

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        loaded = load(args.ckpt, device=device, ema=not args.raw_weights)
    except FileNotFoundError as e:  # a wrong --ckpt: the message says what would be valid
        raise SystemExit(f"error: {e}") from None
    model, tok = loaded.model, loaded.tokenizer
    mask_id = loaded.cfg.model.mask_id
    run_dir = loaded.run_dir
    weights = loaded.weights
    protocol = get_protocol(args.protocol, args.rows_per_wrap, args.wrap_shards)
    objective = loaded.objective
    methods = [m.strip() for m in (args.method or objective.eval_methods[0]).split(",") if m.strip()]
    for m in methods:
        if m not in objective.eval_methods:
            known = sorted({k for cls in OBJECTIVES.values() for k in cls.eval_methods})
            what = "does not fit this checkpoint" if m in known else "is not an estimator"
            raise SystemExit(f"--method {m} {what} (objective {objective.name}): use "
                             f"{', '.join(objective.eval_methods)}")
    if args.seq_len is None:
        args.seq_len = min(1024, model.cfg.max_seq_len)
        if args.seq_len < 1024:
            say(f"note: the model was trained with max_seq_len {args.seq_len}; blocks are {args.seq_len} tokens, "
                "not the protocol's 1024 (numbers are not comparable with published 1024-token results)")
    if args.seq_len > model.cfg.max_seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}: "
                         f"pass --seq-len {model.cfg.max_seq_len} or less")
    if args.samples < 1:
        raise SystemExit("--samples must be >= 1")
    eps = loaded.cfg.diffusion.eps if args.eps is None else args.eps
    say(f"eval.ppl | {loaded.path} (step {loaded.step}, {weights} weights) | {protocol.describe()} | methods "
        f"{','.join(methods)} | K {args.samples} | seed {args.seed} | seq_len {args.seq_len} | tokenizer "
        f"{getattr(tok, 'fingerprint', None)} | world {world} on {device}")

    rows, failed = [], []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        truth = None
        if name == "synthetic":
            blocks, truth = synthetic_blocks(tok, args.seq_len, args.max_blocks or 64)
            source, split = "synthetic:valid", "valid"
        else:
            got = _dataset_blocks(name, args, protocol, tok, args.seq_len, rank, world, say)
            if got is None:
                failed.append(name)
                continue
            blocks, source, split = got
        if blocks.n_blocks == 0:
            say(f"{name}: {blocks.n_stream_tokens} stream tokens, fewer than one block of {args.seq_len}: skipped")
            failed.append(name)
            continue
        x = torch.tensor(blocks.tokens, dtype=torch.long)
        maskable = blocks.maskable()
        maskable = None if maskable is None else torch.tensor(maskable, dtype=torch.bool)
        for method in methods:
            t0 = time.perf_counter()
            est = evaluate_blocks(model, x, method=method, samples=args.samples, seed=args.seed, mask_id=mask_id,
                                  maskable=maskable, eps=eps, batch_size=args.batch_size, group=args.group,
                                  progress=not args.no_progress, desc=f"{name} {method}", objective=objective)
            seconds = time.perf_counter() - t0
            row = result_row(est, dataset=name, split=split, source=source, blocks=blocks, seq_len=args.seq_len,
                             seconds=seconds, step=loaded.step, ckpt=str(loaded.path),
                             # AR scores tokens 2..L given their prefixes: what it bounds is the entropy rate
                             true_entropy=tok.lang.entropy_rate if truth is not None and objective.causal else truth,
                             protocol=protocol.name if name != "synthetic" else "synthetic",
                             rows_per_wrap=protocol.rows_per_wrap, tokenizer=tok, weights=weights,
                             wrap_shards=protocol.wrap_shards)
            row["scored_tokens"] = est.n_tokens
            row["objective"] = objective.name  # with `method`: which bound, estimated how
            if hasattr(objective, "prior_nats"):  # uniform / hybrid: the prior term included in the bound
                row["prior_nats_per_token"] = objective.prior_nats()
            rows.append(row)
            bound = "<=" if method != "ar" else "="
            say(f"{name:>12} {split:<10} {method:<5} K={args.samples:<3} {blocks.n_blocks:>5} blocks "
                f"{est.n_tokens:>8} scored | {est.nelbo:.4f} +- {est.stderr:.4f} nats/tok | ppl {bound} "
                f"{est.ppl:.2f} | {row['bits_per_byte']:.4f} bits/byte | {seconds:.1f}s")
    if rank == 0 and rows:
        out = Path(args.out) if args.out else run_dir / "eval"
        pj, pm = write_results(out, rows)
        print(markdown_table(rows))
        print(f"wrote {pj} and {pm}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if failed:
        say(f"not evaluated: {', '.join(failed)}")
    return rows, failed


def _load_or_report(name, args):
    try:
        return load_corpus(name, args.split, args.data_dir, hub=not args.offline)
    except CorpusError as e:
        print(str(e), file=sys.stderr)  # the message starts with the dataset name
        return None


if __name__ == "__main__":
    _rows, _failed = main()
    sys.exit(2 if _failed else 0)
