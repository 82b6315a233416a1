"""Prepare a corpus for pretraining: text -> tokenizer -> sharded token files + metadata.

    python -m data.prepare --input ../shared/data/tinyshakespeare/input.txt --tokenizer bpe --vocab-size 4096 \\
        --out data_cache/shakespeare
    python -m data.prepare --hf-dataset wikitext --hf-config wikitext-103-raw-v1 --tokenizer gpt2 \\
        --doc-split wikitext --out data_cache/wikitext103
    python -m data.prepare --megatron /data/pile_text_document --tokenizer gpt2 --out data_cache/pile

Output folder (see data/shards.py): meta.json, tokenizer.json + tokenizer_meta.json and Megatron-format shards
(uint16 ids when the vocabulary fits, else int32), every document followed by EOS.

Safety: the folder appears only when complete. Work happens in OUT.partial/ next to it; every shard is written
under a temporary name and renamed when whole, then recorded in OUT.partial/state.json. An interrupted run
(Ctrl-C, a killed job) is resumed by running the same command again: finished shards are kept, the unfinished
one is redone. An input problem (missing file, invalid UTF-8, empty corpus) removes the staging folder and
writes nothing. `--megatron` registers existing Megatron-LM data without copying it.

Input cleaning: `--strip-gutenberg` (data.prepare.strip_gutenberg) keeps only the lines between a Project
Gutenberg book's `*** START OF ...` and `*** END OF ...` marker lines, dropping its header and licence; a file
without both markers is skipped with a warning. E.g. `--input "../shared/data/gutenberg/*.txt" --strip-gutenberg
--doc-split file`: one book = one document, so a validation split holds out whole books.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .inputs import DOC_SPLITS, InputSpec, describe, expand_files, files_state, iter_documents
from .megatron import IndexedShard, ShardWriter, token_dtype
from .shards import FORMAT_NAME, FORMAT_VERSION, META_FILE, DataError, read_meta
from .tokenizer import MASK_TOKEN, DocumentEncoder, TextTokenizer, build_tokenizer, load_tokenizer_spec, with_specials

STATE_FILE = "state.json"


@dataclass
class PrepareJob(InputSpec):
    """Everything that determines the prepared tokens (worker count and progress display do not): where the
    text comes from (InputSpec) and how it becomes token ids."""
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    bpe_sample_bytes: int = 1 << 30  # the BPE is trained on the first this-many bytes of documents
    mask_token: str = MASK_TOKEN
    eos_token: str = ""
    shard_tokens: int = 100_000_000
    writer: str = "native"  # or megatron-core (byte-identical output, through its IndexedDatasetBuilder)

    def input_spec(self) -> InputSpec:
        return InputSpec(**{f.name: copy.copy(getattr(self, f.name)) for f in fields(InputSpec)})

    def settings(self) -> dict:
        d = asdict(self)
        d.pop("writer")  # both writers produce the same bytes
        if not d.get("strip_gutenberg"):
            d.pop("strip_gutenberg", None)  # off: folders prepared before the option existed stay valid
        if self.tokenizer != "bpe":
            d.pop("vocab_size")
            d.pop("bpe_sample_bytes")
        return d

    @classmethod
    def from_config(cls, pc) -> "PrepareJob":
        """From pretrain.config.PrepareConfig."""
        return cls(**{f.name: copy.copy(getattr(pc, f.name)) for f in fields(cls)})


# ----------------------------------------------------------------------------- staging helpers

def _write_json(path: Path, obj) -> None:
    """Atomic: a reader sees the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _clean_stage(stage: Path, keep: set[str]) -> None:
    """Remove everything the state does not vouch for (temporary files, a shard cut off mid-write)."""
    for p in stage.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _normalized(settings: dict) -> dict:
    """Settings with input paths made absolute, so `../x.txt` and `/abs/x.txt` name the same input."""
    from .shards import resolve_path
    d = dict(settings)
    if d.get("inputs"):
        d["inputs"] = [str(resolve_path(p).resolve()) if not any(c in p for c in "*?[") else p for p in d["inputs"]]
    return d


def _check_out(out: Path, settings: dict) -> Optional[dict]:
    """The existing meta when `out` is already prepared with the same settings; None when `out` is free."""
    if (out / META_FILE).is_file():
        meta = read_meta(out)
        if _normalized(meta.get("job") or {}) != _normalized(settings):
            theirs = meta.get("job") or {}
            diff = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
            raise DataError(f"{out} was prepared with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items()) or 'another source'}); "
                            f"delete it or prepare into another folder")
        return meta
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not a prepared dataset: refusing to write into it")
    return None


# ----------------------------------------------------------------------------- parallel encoding

_ENCODER: Optional[DocumentEncoder] = None


def _worker_init(tok_json: str, eos_id: Optional[int]) -> None:
    # One process, one thread: the workers are the parallelism (tokenizers' own thread pool would oversubscribe).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Forked workers inherit the parent's Python signal handlers (a training run's preemption handler, say),
    # which would turn the pool's terminate() into a flag and hang it: workers die on SIGTERM/SIGINT.
    for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
        if s is not None:
            signal.signal(s, signal.SIG_DFL)
    global _ENCODER
    _ENCODER = DocumentEncoder(tok_json, eos_id)


def _worker_encode(docs: list[str]):
    return _ENCODER.encode_docs(docs)


def _chunks(docs: Iterator[str], chunk_bytes: int) -> Iterator[tuple[list[str], int]]:
    buf, size = [], 0
    for d in docs:
        buf.append(d)
        size += len(d)
        if size >= chunk_bytes:
            yield buf, size
            buf, size = [], 0
    if buf:
        yield buf, size


def encode_stream(docs: Iterator[str], tok: TextTokenizer, workers: int, chunk_bytes: int = 1 << 20,
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(flat ids, lengths, characters) per chunk of documents, in input order, `workers` processes encoding.
    At most 2 chunks per worker are in flight, so memory stays bounded however large the corpus."""
    tok_json = tok.tok.to_str()
    chunks = _chunks(docs, chunk_bytes)
    if workers <= 1:
        enc = DocumentEncoder(tok_json, tok.eos_id)
        for texts, size in chunks:
            flat, lengths = enc.encode_docs(texts)
            yield flat, lengths, size
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pending: collections.deque = collections.deque()
    with ctx.Pool(workers, initializer=_worker_init, initargs=(tok_json, tok.eos_id)) as pool:
        for texts, size in chunks:
            pending.append((pool.apply_async(_worker_encode, (texts,)), size))
            if len(pending) >= 2 * workers:
                res, sz = pending.popleft()
                yield (*res.get(), sz)
        while pending:
            res, sz = pending.popleft()
            yield (*res.get(), sz)


# ----------------------------------------------------------------------------- the preparation

def _progress(total: Optional[int], enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, file=sys.stderr,
                disable=None)  # off when stderr is not a terminal


def prepare(job: PrepareJob, out, workers: int = 1, progress: bool = True, chunk_bytes: int = 1 << 20,
            on_shard: Optional[Callable[[dict], None]] = None, log: Callable[[str], None] = print) -> dict:
    """Prepare `job` into folder `out`; returns its meta. Already prepared with the same settings: returns at
    once. `on_shard(entry)` is called after each shard is safely on disk."""
    out = Path(out)
    settings = job.settings()
    existing = _check_out(out, settings)
    if existing is not None:
        return existing
    if bool(job.inputs) == bool(job.hf_dataset):
        raise DataError("give either input files (--input / data.prepare.inputs) or a hub dataset "
                        "(--hf-dataset / data.prepare.hf_dataset), not both and not neither")
    if job.doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got {job.doc_split!r}")
    if job.shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {job.shard_tokens}")
    spec = job.input_spec()
    files = expand_files(spec.inputs) if not job.hf_dataset else None  # missing inputs fail before any write
    inputs_state = files_state(files) if files is not None else None
    if job.writer == "megatron-core":
        from .megatron import _megatron_core
        _megatron_core()  # fail now, not after tokenizing
    workers = workers if workers > 0 else (os.cpu_count() or 1)

    stage = out.with_name(out.name + ".partial")
    state = None
    if (stage / STATE_FILE).is_file():
        state = json.loads((stage / STATE_FILE).read_text())
        if state.get("job") != settings or state.get("inputs") != inputs_state:
            log(f"discarding {stage}: it was staged from other inputs or settings")
            shutil.rmtree(stage)
            state = None
    elif stage.exists():
        shutil.rmtree(stage)  # no state yet: nothing finished in there
    created = state is None
    if state is None:
        stage.mkdir(parents=True)
        state = {"job": settings, "inputs": inputs_state, "shards": [], "docs_done": 0, "text_chars": 0}
        _write_json(stage / STATE_FILE, state)
    keep = {STATE_FILE, "tokenizer.json", "tokenizer_meta.json"}
    for s in state["shards"]:
        keep |= {s["prefix"] + ".bin", s["prefix"] + ".idx"}
    _clean_stage(stage, keep)

    writer = bar = None
    t0 = time.time()
    try:
        tok = None
        if (stage / "tokenizer.json").is_file() and (stage / "tokenizer_meta.json").is_file():
            tok = TextTokenizer.load(stage)
            if state.get("fingerprint") not in (None, tok.fingerprint):
                raise DataError(f"{stage}: its tokenizer changed (fingerprint {tok.fingerprint}, shards made with "
                                f"{state['fingerprint']}); delete {stage} and prepare again")
        if tok is None:
            if state["shards"]:
                raise DataError(f"{stage} has shards but lost its tokenizer; delete {stage} and prepare again")
            tok = _make_tokenizer(job, spec, files, progress, log)
            tok.save(stage)
        if tok.vocab_size > 1 << 31:
            raise DataError(f"vocabulary of {tok.vocab_size} ids is too large for 32-bit token files")
        state["fingerprint"] = tok.fingerprint
        _write_json(stage / STATE_FILE, state)
        dtype = token_dtype(tok.vocab_size)
        skip = state["docs_done"]
        if skip:
            log(f"resuming {out}: {len(state['shards'])} finished shard(s), {skip:,} documents done")

        def docs_after_skip():
            it = iter_documents(spec, files)
            for _ in range(skip):
                if next(it, None) is None:
                    raise DataError(f"the inputs now hold fewer than the {skip} documents already prepared")
            yield from it

        total = sum(f.stat().st_size for f in files) if files is not None else None
        bar = _progress(total, progress, f"tokenizing ({workers} worker{'s' if workers > 1 else ''})")
        if bar is not None:
            bar.update(min(state["text_chars"], total or state["text_chars"]))

        def commit():
            nonlocal writer
            writer.commit()
            entry = {"prefix": Path(writer.prefix).name, "tokens": writer.tokens, "docs": writer.docs}
            state["shards"].append(entry)
            state["docs_done"] += writer.docs
            state["text_chars"] = chars_done
            _write_json(stage / STATE_FILE, state)
            writer = None
            if on_shard is not None:
                on_shard(entry)

        chars_done = state["text_chars"]
        for flat, lengths, size in encode_stream(docs_after_skip(), tok, workers, chunk_bytes):
            if int(flat.max(initial=0)) >= tok.vocab_size:  # cannot happen with a sane tokenizer; cheap to check
                raise DataError(f"the tokenizer produced id {int(flat.max())} >= its vocabulary {tok.vocab_size}")
            ends = np.cumsum(lengths)
            start_doc, start_tok = 0, 0
            while start_doc < len(lengths):
                if writer is None:
                    writer = ShardWriter(stage / _shard_name(len(state["shards"])), dtype, backend=job.writer)
                room = job.shard_tokens - writer.tokens
                # The shard closes after the first document that fills it: boundaries depend only on the
                # documents, not on how they were chunked, so a resumed run cuts the same shards.
                last = int(np.searchsorted(ends - start_tok, room, side="left"))
                stop = min(len(lengths), last + 1)
                writer.add(flat[start_tok:int(ends[stop - 1])], lengths[start_doc:stop])
                start_tok, start_doc = int(ends[stop - 1]), stop
                if writer.tokens >= job.shard_tokens:
                    commit()
            chars_done += size  # progress bookkeeping only (a resume restarts the bar near here)
            if bar is not None:
                bar.update(size)
        if writer is not None and writer.docs:
            commit()
        elif writer is not None:
            writer.abort()
            writer = None
        if bar is not None:
            bar.close()
        n_docs = sum(s["docs"] for s in state["shards"])
        if n_docs == 0:
            where = job.hf_dataset or ", ".join(map(str, files or []))
            raise DataError(f"the corpus is empty: no non-blank document in {where}"
                            + (f" (field {job.text_field!r})" if job.hf_dataset or any(
                                f.suffix in (".jsonl", ".json", ".parquet") for f in files or []) else ""))
        n_tokens = sum(s["tokens"] for s in state["shards"])
        meta = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id,
                          "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id, "spec": job.tokenizer},
            "dtype": str(dtype), "eos_appended": tok.eos_id is not None,
            "tokens": n_tokens, "docs": n_docs,
            "shards": state["shards"],
            "source": describe(spec, files),
            "job": settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t0, 2), "workers": workers,
        }
        _write_json(stage / META_FILE, meta)
        (stage / STATE_FILE).unlink()
        os.replace(stage, out)
        log(f"prepared {out}: {n_tokens:,} tokens in {n_docs:,} documents, {len(state['shards'])} shard(s), "
            f"vocabulary {tok.vocab_size} ({dtype}), {meta['seconds']:.1f} s")
        return meta
    except DataError:
        if bar is not None:
            bar.close()
        # The input itself is wrong: leave nothing behind (a rerun must start over from fixed inputs anyway).
        if writer is not None:
            writer.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    except BaseException:
        if bar is not None:
            bar.close()
        # Interrupted or crashed: keep the finished shards for a resume; drop the unfinished one.
        if writer is not None:
            writer.abort()
        if created and not state["shards"] and not (stage / "tokenizer.json").exists():
            shutil.rmtree(stage, ignore_errors=True)
        elif stage.exists():
            log(f"\ninterrupted: {len(state['shards'])} finished shard(s) kept in {stage}; run the same command "
                f"again to resume")
        raise


def _make_tokenizer(job: PrepareJob, spec: InputSpec, files, progress: bool, log) -> TextTokenizer:
    if job.tokenizer != "bpe":
        tok = build_tokenizer(job.tokenizer, job.vocab_size, mask_token=job.mask_token, eos_token=job.eos_token)
        log(f"tokenizer {job.tokenizer}: {tok.vocab_size} ids (mask {tok.mask_id}, eos {tok.eos_id})")
        return tok

    def sample():  # the first bpe_sample_bytes of documents, in batches (what train_from_iterator takes best)
        size, batch = 0, []
        for d in iter_documents(spec, files):
            batch.append(d)
            size += len(d)
            if len(batch) == 1000:
                yield batch
                batch = []
            if size >= job.bpe_sample_bytes:
                break
        if batch:
            yield batch
    log(f"training a byte-level BPE of {job.vocab_size} ids on the corpus (at most its first "
        f"{job.bpe_sample_bytes / 2**20:,.0f} MiB)")
    t = time.time()
    tok = build_tokenizer("bpe", job.vocab_size, texts=sample(), mask_token=job.mask_token,
                          eos_token=job.eos_token, show_progress=progress)
    log(f"BPE trained in {time.time() - t:.1f} s: {tok.vocab_size} ids (eos {tok.eos_id}, mask {tok.mask_id}, "
        f"pad {tok.pad_id})")
    return tok


# ----------------------------------------------------------------------------- Megatron datasets as they are

def register_megatron(prefixes: list[str], out, tokenizer: str, mask_token: str = MASK_TOKEN, eos_token: str = "",
                      reader: str = "native", check_ids: bool = True, log: Callable[[str], None] = print) -> dict:
    """Make existing Megatron-LM data (PREFIX.bin/.idx, e.g. from Megatron's preprocess_data.py) trainable here
    without copying it: the folder holds meta.json (pointing at the prefixes) and the tokenizer. The ids must
    come from `tokenizer`; with check_ids every id is scanned against its vocabulary. A mask token missing from
    the vocabulary is added after the existing ids, so the data never contains it."""
    out = Path(out)
    abs_prefixes = [str(Path(p).expanduser().resolve()) for p in prefixes]
    settings = {"megatron": abs_prefixes, "tokenizer": tokenizer, "mask_token": mask_token, "eos_token": eos_token}
    existing = _check_out(out, settings)
    if existing is not None:
        return existing
    shards = [IndexedShard(p, reader=reader) for p in abs_prefixes]  # missing or broken files fail here
    tok = with_specials(load_tokenizer_spec(tokenizer), mask_token, eos_token)
    entries = []
    for p, shard in zip(abs_prefixes, shards):
        if check_ids and shard.num_tokens:
            top = 0
            for a in range(0, shard.num_tokens, 1 << 24):
                top = max(top, int(np.asarray(shard.tokens(a, min(shard.num_tokens, a + (1 << 24)))).max()))
            if top >= tok.vocab_size:
                raise DataError(f"{p}.bin holds id {top} but tokenizer {tokenizer} has {tok.vocab_size} ids: the "
                                f"data was tokenized with another tokenizer")
        entries.append({"prefix": p, "tokens": shard.num_tokens, "docs": shard.num_docs})
    # Megatron's preprocessing appends EOS only with --append-eod: look at how documents end.
    ends = [int(s.document(d)[-1]) for s in shards for d in range(min(s.num_docs, 200)) if s.doc_start(d + 1) > s.doc_start(d)]
    eos_appended = bool(ends) and tok.eos_id is not None and bool(np.mean(np.array(ends) == tok.eos_id) > 0.9)
    if not eos_appended:
        log("note: these documents do not end in EOS (prepared without --append-eod); packed samples still keep "
            "documents apart through the document ids")
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        tok.save(stage)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id,
                              "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id, "spec": tokenizer},
                "dtype": str(shards[0].dtype) if shards else None, "eos_appended": eos_appended,
                "tokens": sum(e["tokens"] for e in entries), "docs": sum(e["docs"] for e in entries),
                "shards": entries, "source": {"megatron": abs_prefixes}, "job": settings,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(stage / META_FILE, meta)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"registered {len(entries)} Megatron prefix(es) in {out}: {meta['tokens']:,} tokens, {meta['docs']:,} docs")
    return meta


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("source (one of)")
    src.add_argument("--input", nargs="+", default=[], metavar="PATH",
                     help="local files, globs or folders: .txt (and other text), .jsonl, .json, .parquet, each "
                          "optionally .gz")
    src.add_argument("--hf-dataset", default="", help="a Hugging Face dataset id, e.g. wikitext")
    src.add_argument("--megatron", nargs="+", default=[], metavar="PREFIX",
                     help="register existing Megatron .bin/.idx prefixes (no copy; needs --tokenizer)")
    ap.add_argument("--hf-config", default="", help="dataset config, e.g. wikitext-103-raw-v1")
    ap.add_argument("--split", default="train")
    ap.add_argument("--no-streaming", action="store_true", help="download the hub dataset instead of streaming it")
    ap.add_argument("--text-field", default="text", help="record field / column holding the text")
    ap.add_argument("--doc-split", default="paragraph", choices=DOC_SPLITS,
                    help="what a document is in text files (records are one document each; wikitext groups "
                         "lines or records into articles)")
    ap.add_argument("--max-docs", type=int, default=0, help="stop after this many documents (0: all)")
    ap.add_argument("--strip-gutenberg", action="store_true",
                    help="input cleaning for Project Gutenberg books: keep only the text between the '*** START OF' "
                         "and '*** END OF' marker lines (header and licence dropped); a file without them is refused")
    ap.add_argument("--on-decode-error", default="strict", choices=("strict", "replace"),
                    help="strict: stop at invalid UTF-8, naming file and byte offset; replace: use U+FFFD")
    ap.add_argument("--tokenizer", default="bpe",
                    help="bpe (train a byte-level BPE on the corpus), a tokenizer.json, a folder holding one, or a "
                         "hub name such as gpt2")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE size including special tokens")
    ap.add_argument("--bpe-sample-mb", type=float, default=1024, help="train the BPE on the first N MiB")
    ap.add_argument("--mask-token", default=MASK_TOKEN)
    ap.add_argument("--eos-token", default="", help="default: the tokenizer's own EOS, else <|endoftext|> is added")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: one per core)")
    ap.add_argument("--writer", default="native", choices=("native", "megatron-core"))
    ap.add_argument("--reader", default="native", choices=("native", "megatron-core"),
                    help="with --megatron: how to open the prefixes for checking")
    ap.add_argument("--no-check-ids", action="store_true", help="with --megatron: skip scanning ids")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", required=True, help="output folder")
    a = ap.parse_args(argv)
    try:
        if a.megatron:
            if a.input or a.hf_dataset or a.tokenizer == "bpe":
                ap.error("--megatron takes no --input/--hf-dataset and needs --tokenizer (the one the data used)")
            register_megatron(a.megatron, a.out, a.tokenizer, a.mask_token, a.eos_token, reader=a.reader,
                              check_ids=not a.no_check_ids)
            return 0
        job = PrepareJob(inputs=a.input, hf_dataset=a.hf_dataset, hf_config=a.hf_config, split=a.split,
                         streaming=not a.no_streaming, text_field=a.text_field, doc_split=a.doc_split,
                         on_decode_error=a.on_decode_error, max_docs=a.max_docs,
                         strip_gutenberg=a.strip_gutenberg, tokenizer=a.tokenizer,
                         vocab_size=a.vocab_size, bpe_sample_bytes=int(a.bpe_sample_mb * 2**20),
                         mask_token=a.mask_token, eos_token=a.eos_token, shard_tokens=a.shard_tokens,
                         writer=a.writer)
        prepare(job, a.out, workers=a.workers, progress=not a.no_progress)
    except (DataError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
