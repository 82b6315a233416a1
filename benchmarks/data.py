"""Data pipeline throughput next to the training step it feeds, printed as a table.

1. Tokenization, MB of UTF-8 text per second per worker, with a 32k byte-level BPE trained on the corpus:
   `tokenizers` alone (encode_batch_fast, one thread), unmask's DocumentEncoder (word cache; first pass with an
   empty cache, and steady state with a warm one, as on a corpus larger than its vocabulary of words), and the
   whole `python -m data.prepare` pipeline (read, tokenize, write shards) with 1 and 2 worker processes.
2. Loader tokens/s (Loader.micro_batch over packed shards with document ids) vs the training step's tokens/s
   (forward, backward, AdamW; fp32 CPU) for the quickstart model and for the shakespeare recipe's model.
   The loader must never be the bottleneck: the ratio column should stay far above 20x.

Corpus: the text files in ../shared/data (about 6 MB: WikiText-2, Tiny Shakespeare, LAMBADA, PTB) when present,
else generated Zipfian text of the same size.

    python benchmarks/data.py [--train-steps 4] [--loader-batches 200] [--threads 0]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # per-worker numbers: one thread each
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FILES = ["wikitext-2-raw/wiki.test.raw", "wikitext-2/wiki.valid.tokens", "tinyshakespeare/input.txt",
         "lambada/lambada_test.jsonl", "ptb/ptb.valid.txt"]


def corpus(tmp: Path) -> tuple[list[Path], str]:
    found = [SHARED / f for f in FILES if (SHARED / f).is_file()]
    if found:
        return found, "../shared/data: " + ", ".join(f.name for f in found)
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(1, 12))) for _ in range(50_000)]
    p = 1.0 / np.arange(1, len(lexicon) + 1)
    p /= p.sum()
    paras = []
    for _ in range(30_000):
        words = rng.choice(len(lexicon), size=rng.integers(20, 60), p=p)
        paras.append(" ".join(lexicon[w] for w in words).capitalize() + ".")
    f = tmp / "generated.txt"
    f.write_text("\n\n".join(paras))
    return [f], "generated Zipfian text (../shared/data absent)"


def docs_of(files: list[Path]) -> list[str]:
    from data.inputs import InputSpec, iter_documents
    return list(iter_documents(InputSpec(files=[str(f) for f in files], doc_split="paragraph")))


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def bench_tokenization(files, docs, tmp: Path) -> tuple[list[tuple], "object"]:
    from data.prepare import PrepareJob, prepare
    from data.tokenizer import DocumentEncoder, build_tokenizer
    nbytes = sum(len(d.encode()) for d in docs)
    t = time.perf_counter()
    tok = build_tokenizer("bpe", 32_000, texts=[docs])
    train_s = time.perf_counter() - t
    tok_file = tmp / "bpe32k.json"
    tok.tok.save(str(tok_file))
    rows = [("BPE training (32k, on the corpus, Rust threads)", f"{mb_per_s(nbytes, train_s):.2f}",
             f"{tok.vocab_size} ids in {train_s:.1f} s")]

    from tokenizers import Tokenizer
    raw = Tokenizer.from_str(tok.tok.to_str())
    t = time.perf_counter()
    raw.encode_batch_fast(docs, add_special_tokens=False)
    rows.append(("tokenizers encode_batch_fast, 1 thread", f"{mb_per_s(nbytes, time.perf_counter() - t):.2f}", ""))

    enc = DocumentEncoder(tok.tok.to_str(), tok.eos_id)
    t = time.perf_counter()
    flat, _ = enc.encode_docs(docs)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    enc.encode_docs(docs)
    warm = time.perf_counter() - t
    rows.append(("DocumentEncoder, 1 process, empty cache", f"{mb_per_s(nbytes, cold):.2f}",
                 f"{len(enc.cache):,} distinct pieces; {len(flat):,} tokens, {nbytes / len(flat):.2f} B/token"))
    rows.append(("DocumentEncoder, 1 process, warm cache", f"{mb_per_s(nbytes, warm):.2f}", "steady state"))

    out_first = None
    for workers in (1, 2):
        out = tmp / f"prepared_w{workers}"
        job = PrepareJob(inputs=[str(f) for f in files], tokenizer=str(tok_file))
        t = time.perf_counter()
        meta = prepare(job, out, workers=workers, progress=False, chunk_bytes=1 << 19, log=lambda *_: None)
        dt = time.perf_counter() - t
        rows.append((f"data.prepare end to end, {workers} worker{'s' if workers > 1 else ''}",
                     f"{mb_per_s(nbytes, dt) / workers:.2f}",
                     f"{mb_per_s(nbytes, dt):.2f} MB/s total; {meta['tokens']:,} tokens, {meta['docs']:,} docs"))
        out_first = out_first or out
    return rows, out_first


def bench_loader(folder: Path, seq_len: int, batch: int, batches: int) -> float:
    from data import Loader
    from data.shards import PackedSource, PreparedDataset
    src = PackedSource(PreparedDataset(folder).split(0.01)[0], seq_len)
    loader = Loader(src, seed=0)
    loader.micro_batch(0, batch, batch, 0)
    t = time.perf_counter()
    for i in range(batches):
        x, d = loader.micro_batch(i * batch, batch, batch, 0)
    return batches * batch * seq_len / (time.perf_counter() - t)


def bench_train_step(config: str, vocab: int, steps: int) -> tuple[float, str, int, int]:
    from model import Transformer, count_params
    from pretrain.config import load_config
    from pretrain.diffusion import draw_step_noise, get_schedule, mdm_loss
    from pretrain.train import build_optimizer
    cfg = load_config(str(ROOT / config))
    m = cfg.model
    m.vocab_size, m.mask_id = m.vocab_size or vocab, m.mask_id if m.mask_id is not None else 1
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    model = Transformer(m)
    model.init_weights(seed=0)
    opt = build_optimizer(model, cfg.optim)
    x = torch.randint(2, m.vocab_size, (G, L))
    doc = torch.zeros(G, L, dtype=torch.long)
    doc[:, L // 2:] = 1  # two documents per row, as packed data has
    times = []
    for step in range(steps + 1):
        noise = draw_step_noise(0, step, G, L, stratified=True, random_length_prob=0.0, device="cpu")
        t = time.perf_counter()
        loss, _ = mdm_loss(model, x, noise.u, noise.mask_uniform, mask_id=m.mask_id, schedule=get_schedule("linear"),
                           eps=1e-3, doc_ids=doc)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    dt = float(np.median(times[1:]))
    n = count_params(model)["total"]
    return G * L / dt, f"{config}: {n / 1e6:.2f}M params, vocab {m.vocab_size}, batch {G} x {L}", G, L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the training step (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, what = corpus(tmp)
        docs = docs_of(files)
        nbytes = sum(len(d.encode()) for d in docs)
        print(f"corpus: {what}; {nbytes / 1e6:.2f} MB in {len(docs):,} documents; {os.cpu_count()} cores, load "
              f"average {os.getloadavg()[0]:.1f}\n")
        rows, folder = bench_tokenization(files, docs, tmp)
        print("| tokenization | MB/s per worker | notes |\n|---|---:|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
        print("\n| model | train step tok/s | loader tok/s (same batch shape) | loader / train |\n|---|---:|---:|---:|")
        for config, vocab in (("configs/quickstart.yaml", 65), ("configs/shakespeare.yaml", 4096)):
            if not (ROOT / config).is_file():
                continue
            train_tps, desc, G, L = bench_train_step(config, vocab, args.train_steps)
            load_tps = bench_loader(folder, L, G, args.loader_batches)
            print(f"| {desc} | {train_tps:,.0f} | {load_tps:,.0f} | {load_tps / train_tps:,.0f}x |")


if __name__ == "__main__":
    main()
