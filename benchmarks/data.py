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

Every rate is given per wall-clock second and per CPU second (process time, children included): on a shared
machine the second is what one fully available core would do, so the per-core goal (>= 5 MB/s) is read there.

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
    return list(iter_documents(InputSpec(inputs=[str(f) for f in files], doc_split="paragraph")))


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


class Clock:
    """Wall time and CPU time (this process and its finished children) of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, self._cpu() - self.c

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def bench_tokenization(files, docs, tmp: Path) -> tuple[list[tuple], "object"]:
    from data.prepare import PrepareJob, prepare
    from data.tokenizer import DocumentEncoder, build_tokenizer
    nbytes = sum(len(d.encode()) for d in docs)
    rate = lambda c: (f"{mb_per_s(nbytes, c.wall):.2f}", f"{mb_per_s(nbytes, c.cpu):.2f}")  # noqa: E731
    with Clock() as c:
        tok = build_tokenizer("bpe", 32_000, texts=[docs])
    tok_file = tmp / "bpe32k.json"
    tok.tok.save(str(tok_file))
    rows = [("BPE training (32k ids on the corpus; Rust threads)", *rate(c), f"{tok.vocab_size} ids in {c.wall:.1f} s")]

    from tokenizers import Tokenizer
    raw = Tokenizer.from_str(tok.tok.to_str())
    with Clock() as c:
        raw.encode_batch_fast(docs, add_special_tokens=False)
    rows.append(("tokenizers encode_batch_fast, 1 thread", *rate(c), "reference"))

    enc = DocumentEncoder(tok.tok.to_str(), tok.eos_id)
    with Clock() as c:
        flat, _ = enc.encode_docs(docs)
    rows.append(("DocumentEncoder, 1 process, empty cache", *rate(c),
                 f"first pass: {len(enc.cache):,} distinct pieces to encode; {len(flat):,} tokens, "
                 f"{nbytes / len(flat):.2f} B/token"))
    with Clock() as c:
        enc.encode_docs(docs)
    rows.append(("DocumentEncoder, 1 process, warm cache", *rate(c), "steady state on a large corpus"))

    out_first = None
    for workers in (1, 2):
        out = tmp / f"prepared_w{workers}"
        job = PrepareJob(inputs=[str(f) for f in files], tokenizer=str(tok_file))
        with Clock() as c:
            meta = prepare(job, out, workers=workers, progress=False, chunk_bytes=1 << 19, log=lambda *_: None)
        wall, cpu = rate(c)
        rows.append((f"data.prepare end to end, {workers} worker{'s' if workers > 1 else ''} (read, encode, write)",
                     f"{float(wall) / workers:.2f}", cpu,
                     f"{wall} MB/s in all; {meta['tokens']:,} tokens, {meta['docs']:,} docs; cold caches"))
        out_first = out_first or out
    return rows, out_first


def bench_loader(folder: Path, seq_len: int, batch: int, batches: int) -> tuple[float, float]:
    from data import Loader
    from data.shards import PackedSource, PreparedDataset
    src = PackedSource(PreparedDataset(folder).split(0.01)[0], seq_len)
    loader = Loader(src, seed=0)
    loader.micro_batch(0, batch, batch, 0)
    with Clock() as c:
        for i in range(batches):
            loader.micro_batch(i * batch, batch, batch, 0)
    n = batches * batch * seq_len
    return n / c.wall, n / c.cpu


def bench_train_step(config: str, vocab: int, steps: int) -> tuple[float, float, str, int, int]:
    from model import Transformer, count_params
    from pretrain.config import load_config
    from model.objectives import draw_step_noise, get_schedule
    from model.objectives.mdm import mdm_loss
    from pretrain.loop.train import build_optimizer
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
    walls, cpus = [], []
    for step in range(steps + 1):
        noise = draw_step_noise(0, step, G, L, stratified=True, random_length_prob=0.0, device="cpu")
        with Clock() as c:
            loss, _ = mdm_loss(model, x, noise.u, noise.mask_uniform, mask_id=m.mask_id,
                               schedule=get_schedule("linear"), eps=1e-3, doc_ids=doc)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        walls.append(c.wall)
        cpus.append(c.cpu)
    n = count_params(model)["total"]
    return (G * L / float(np.median(walls[1:])), G * L / float(np.median(cpus[1:])),
            f"{config}: {n / 1e6:.2f}M params, vocab {m.vocab_size}, batch {G} x {L}", G, L)


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
        print("| tokenization | MB/s per worker (wall) | MB/s per CPU second | notes |\n|---|---:|---:|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print(f"\n| model (torch {torch.get_num_threads()} threads) | train step tok/s: wall | per CPU s | loader tok/s "
              "(same batch shape): wall | per CPU s | loader / train (wall) |\n|---|---:|---:|---:|---:|---:|")
        for config, vocab in (("configs/quickstart.yaml", 65), ("configs/shakespeare.yaml", 4096)):
            if not (ROOT / config).is_file():
                continue
            tw, tc, desc, G, L = bench_train_step(config, vocab, args.train_steps)
            lw, lc = bench_loader(folder, L, G, args.loader_batches)
            print(f"| {desc} | {tw:,.0f} | {tc:,.0f} | {lw:,.0f} | {lc:,.0f} | {lw / tw:,.0f}x |")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
