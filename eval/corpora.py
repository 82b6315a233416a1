"""Evaluation corpora of the zero-shot perplexity protocols: documents (the hub's rows) from local files or the
Hugging Face hub, detokenized, tokenized with the checkpoint's tokenizer, and wrapped into blocks as a named
protocol says (`PROTOCOLS`: mdlm, bd3lms). Local files give exactly the hub's rows (see the readers).

Local layout (`--data-dir`, the datasets' usual file names; `<s>` is the split's file token, valid/test/train):
    wikitext-2-raw/wiki.<s>.raw     wikitext-2/wiki.<s>.tokens        (wikitext2: raw preferred)
    wikitext-103-raw/wiki.<s>.raw   wikitext-103/wiki.<s>.tokens      (wikitext103)
    ptb/ptb.<s>.txt                 lambada/lambada_test.jsonl        ag_news/<split>.csv (label,title,description)
    lm1b/<split>.txt                pubmed/<split>.jsonl, arxiv/<split>.jsonl (field "article"), or <split>.txt
Without a local file the hub id is tried; when the hub is unreachable that fails within seconds with an error
that lists the local files that were found.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .detokenize import detokenize


class CorpusError(RuntimeError):
    """A dataset could not be found locally nor loaded from the hub; the message says what was looked for."""


# Protocol split per dataset (science.md section 4) when --split is not given.
DEFAULT_SPLIT = {"wikitext2": "validation", "wikitext103": "validation", "ptb": "validation", "lambada": "test",
                 "lm1b": "test", "ag_news": "test", "pubmed": "validation", "arxiv": "validation"}
DATASETS = tuple(DEFAULT_SPLIT)
_FILE_SPLIT = {"validation": "valid", "valid": "valid", "test": "test", "train": "train"}


@dataclass
class HubSource:
    path: str
    name: Optional[str]
    field: str
    splits: tuple[str, ...]  # the splits the hub dataset has


# Hub ids (science.md section 4); several candidates where the canonical id moved to a namespace.
HUB: dict[str, list[HubSource]] = {
    "wikitext2": [HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "text", ("train", "validation", "test")),
                  HubSource("wikitext", "wikitext-2-raw-v1", "text", ("train", "validation", "test"))],
    "wikitext103": [HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "text", ("train", "validation", "test")),
                    HubSource("wikitext", "wikitext-103-raw-v1", "text", ("train", "validation", "test"))],
    "ptb": [HubSource("ptb-text-only/ptb_text_only", None, "sentence", ("train", "validation", "test")),
            HubSource("ptb_text_only", None, "sentence", ("train", "validation", "test"))],
    "lambada": [HubSource("EleutherAI/lambada_openai", "en", "text", ("test",))],
    "lm1b": [HubSource("lm1b", None, "text", ("train", "test"))],
    "ag_news": [HubSource("fancyzhx/ag_news", None, "text", ("train", "test")),
                HubSource("ag_news", None, "text", ("train", "test"))],
    "pubmed": [HubSource("scientific_papers", "pubmed", "article", ("train", "validation", "test"))],
    "arxiv": [HubSource("scientific_papers", "arxiv", "article", ("train", "validation", "test"))],
}


def _read_wikitext(path: Path) -> list[str]:
    """WikiText files -> the hub's rows (the `wikitext` loading script): every line of the file is a row, read
    with Python's universal newlines; a line with text keeps its '\n', a blank line is the empty row ''
    (with per-document EOS each blank row still adds an EOS)."""
    with path.open(encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def _read_ptb(path: Path) -> list[str]:
    """PTB files -> the hub's rows (`ptb_text_only`): one stripped line a row, none dropped."""
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line in f]


def _read_jsonl(field_name: str) -> Callable[[Path], list[str]]:
    def read(path: Path) -> list[str]:
        docs = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    obj = json.loads(line)
                    if field_name not in obj:
                        raise CorpusError(f"{path}:{i + 1} has no field {field_name!r} (fields: {', '.join(obj)})")
                    docs.append(obj[field_name])
        return docs
    return read


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n") if line.strip()]


def _read_ag_news(path: Path) -> list[str]:
    """label,title,description rows (the original CSV has no header; one is skipped if present). The hub's
    `text` field is title and description joined by a space; the same here."""
    docs = []
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if i == 0 and row and row[0].strip().lower() in ("label", "class", "class index"):
                continue
            if len(row) < 3:
                raise CorpusError(f"{path}:{i + 1}: expected label,title,description, got {len(row)} field(s)")
            docs.append(f"{row[1].strip()} {row[2].strip()}".replace("\\n", " "))
    return docs


# dataset -> candidate local files, in order of preference: (relative path pattern, reader).
LOCAL: dict[str, list[tuple[str, Callable[[Path], list[str]]]]] = {
    "wikitext2": [("wikitext-2-raw/wiki.{s}.raw", _read_wikitext), ("wikitext-2/wiki.{s}.tokens", _read_wikitext)],
    "wikitext103": [("wikitext-103-raw/wiki.{s}.raw", _read_wikitext),
                    ("wikitext-103/wiki.{s}.tokens", _read_wikitext)],
    "ptb": [("ptb/ptb.{s}.txt", _read_ptb)],
    "lambada": [("lambada/lambada_{s}.jsonl", _read_jsonl("text"))],
    "lm1b": [("lm1b/{split}.txt", _read_lines)],
    "ag_news": [("ag_news/{split}.csv", _read_ag_news)],
    "pubmed": [("pubmed/{split}.jsonl", _read_jsonl("article")), ("pubmed/{split}.txt", _read_lines)],
    "arxiv": [("arxiv/{split}.jsonl", _read_jsonl("article")), ("arxiv/{split}.txt", _read_lines)],
}


def _found(data_dir: Path, dataset: str) -> list[str]:
    folders = {p.split("/")[0] for p, _ in LOCAL[dataset]}
    hits = []
    for folder in sorted(folders):
        d = data_dir / folder
        if d.is_dir():
            hits += [f"{folder}/{f.name}" for f in sorted(d.iterdir()) if f.is_file()]
    return hits


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of waiting on the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(dataset: str, split: str) -> tuple[list[str], str]:
    errors = []
    online = hub_reachable()
    import datasets as hf
    for src in HUB[dataset]:
        if split not in src.splits:
            errors.append(f"{src.path}{'/' + src.name if src.name else ''} has no split {split!r} "
                          f"(splits: {', '.join(src.splits)})")
            continue
        if not online:
            # Offline: only the local hub cache can answer; the offline flag makes the client skip the network.
            hf.config.HF_HUB_OFFLINE = True
        try:
            ds = hf.load_dataset(src.path, src.name, split=split)
        except Exception as e:  # the hub client raises many types; each is reported to the user below
            errors.append(f"{src.path}{'/' + src.name if src.name else ''}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")
            continue
        return list(ds[src.field]), f"hub:{src.path}{'/' + src.name if src.name else ''}:{split}"
    state = "" if online else " (huggingface.co is unreachable: offline, only the local hub cache was tried)"
    raise CorpusError(f"hub{state}: " + "; ".join(errors))


@dataclass
class Corpus:
    name: str
    split: str
    source: str  # file path or hub id
    docs: list[str] = field(repr=False)  # detokenized documents


def load_corpus(dataset: str, split: Optional[str] = None, data_dir: Optional[str] = None,
                hub: bool = True) -> Corpus:
    """Detokenized documents of one dataset split: the local file when present, else the hub."""
    if dataset not in LOCAL:
        raise CorpusError(f"unknown dataset {dataset!r}; choices: {', '.join(DATASETS)}")
    split = split or DEFAULT_SPLIT[dataset]
    tried, hub_error = [], None
    if data_dir is not None:
        root = Path(data_dir)
        for pattern, reader in LOCAL[dataset]:
            rel = pattern.format(s=_FILE_SPLIT.get(split, split), split=split)
            tried.append(rel)
            if (root / rel).is_file():
                docs = reader(root / rel)
                return Corpus(dataset, split, str(root / rel), [detokenize(dataset, d) for d in docs])
    if hub:
        try:
            docs, source = _load_hub(dataset, split)
            return Corpus(dataset, split, source, [detokenize(dataset, d) for d in docs])
        except CorpusError as e:
            hub_error = str(e)
    msg = f"{dataset}: no data for split {split!r}."
    if data_dir is not None:
        found = _found(Path(data_dir), dataset)
        msg += (f" Looked in {data_dir} for {', '.join(tried)}; found "
                + (", ".join(found) if found else "no files of this dataset") + ".")
    else:
        msg += " No --data-dir given."
    if hub_error:
        msg += f" Hub: {hub_error}"
    elif not hub:
        msg += " Hub access is off (--offline)."
    raise CorpusError(msg)


# ---------------------------------------------------------------------------------------------------------------
# Protocols, tokenization and wrapping


@dataclass(frozen=True)
class Protocol:
    """How documents become scored blocks (science.md section 4). Both protocols cut [BOS] + (L - 2) + [EOS]
    blocks and insert no text between documents; they differ in the separator and the scored positions.

    rows_per_wrap: the reference wraps with `datasets.map(batched=True)`, whose batches hold 1000 rows: each
    batch of 1000 documents is concatenated and cut on its own, and its remainder dropped. 0 wraps the whole
    stream at once.
    wrap_shards: the reference's `num_proc` (default: the CPUs it may use; its zero-shot scripts give each task
    one CPU, so 1): with P > 1, `datasets` first splits the rows into P contiguous shards, each then batched
    by 1000 rows, which moves the block count (PTB validation: 77 blocks with 1 process, 78 with 2)."""
    name: str
    doc_eos: bool  # an EOS after every document (the separator counts in the stream)
    score_bos: bool  # BOS masked and scored like any position; False: never masked, not scored
    rows_per_wrap: int = 1000
    reference: str = ""
    wrap_shards: int = 1

    def describe(self) -> str:
        sep = "EOS after every document" if self.doc_eos else "documents concatenated, nothing between them"
        bos = "all positions masked and scored" if self.score_bos else "BOS never masked nor scored"
        rows = f"wrapped per {self.rows_per_wrap} rows" if self.rows_per_wrap else "wrapped as one stream"
        if self.wrap_shards > 1:
            rows += f" within {self.wrap_shards} contiguous shards"
        return f"{self.name}: {sep}; [BOS] + L-2 + [EOS] blocks; {bos}; {rows}"


PROTOCOLS = {
    "mdlm": Protocol("mdlm", doc_eos=True, score_bos=True, reference="kuleshov-group/mdlm dataloader.py"),
    "bd3lms": Protocol("bd3lms", doc_eos=False, score_bos=False,
                       reference="kuleshov-group/bd3lms scripts/zs_ppl (data.insert_valid_eos=False, "
                                 "algo.ignore_bos=True)"),
}


def get_protocol(name: str, rows_per_wrap: Optional[int] = None, wrap_shards: Optional[int] = None) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choices: {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[name]
    if rows_per_wrap is not None and rows_per_wrap < 0:
        raise ValueError(f"rows_per_wrap must be >= 0 (0: the whole stream at once), got {rows_per_wrap}")
    if wrap_shards is not None and wrap_shards < 1:
        raise ValueError(f"wrap_shards must be >= 1 (the reference's num_proc), got {wrap_shards}")
    return dataclasses.replace(p, rows_per_wrap=p.rows_per_wrap if rows_per_wrap is None else rows_per_wrap,
                               wrap_shards=p.wrap_shards if wrap_shards is None else wrap_shards)


@dataclass
class Blocks:
    """Wrapped evaluation blocks and the counts that identify them."""
    tokens: list[list[int]]  # n_blocks rows of seq_len ids
    content_per_block: int  # text (and separator) tokens per block: seq_len minus the specials
    n_text_tokens: int  # tokens of the documents themselves, separators not included
    covered_bytes: int  # UTF-8 bytes of the detokenized text inside the blocks
    total_bytes: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    n_rows: int = 0  # documents (hub rows), empty ones included
    n_stream_tokens: int = 0  # the concatenated stream, separators included, before cutting into blocks
    score_bos: bool = True

    @property
    def n_blocks(self) -> int:
        return len(self.tokens)

    def maskable(self) -> Optional[list[list[bool]]]:
        """Per-position masks of the maskable, scored positions; None when every position is."""
        if self.score_bos or self.bos_id is None:
            return None
        row = [False] + [True] * (len(self.tokens[0]) - 1) if self.tokens else []
        return [row for _ in self.tokens]

    @property
    def n_scored(self) -> int:
        """Scored positions of a diffusion evaluation (an AR one predicts seq_len - 1 of each block)."""
        per = len(self.tokens[0]) - (0 if self.score_bos or self.bos_id is None else 1) if self.tokens else 0
        return per * self.n_blocks

    def counts(self) -> dict:
        return {"rows": self.n_rows, "stream_tokens": self.n_stream_tokens, "text_tokens": self.n_text_tokens,
                "blocks": self.n_blocks, "scored_tokens": self.n_scored}


def special_ids(tokenizer) -> tuple[Optional[int], Optional[int]]:
    """(BOS, EOS) for wrapping. GPT-2 style: one end-of-text token serves as both when only EOS exists (the
    reference's GPT-2 tokenizer does the same). A tokenizer with neither (the synthetic language) gets plain
    blocks."""
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    if bos is None:
        bos = eos
    if eos is None:
        eos = bos
    return bos, eos


def _row_groups(n_rows: int, rows_per_wrap: int, shards: int = 1) -> list[range]:
    """Rows wrapped together: `shards` contiguous shards (datasets' rule: the first n % P shards get one row
    more; never more shards than rows), each cut into groups of rows_per_wrap (0: the whole shard)."""
    shards = max(1, min(shards, n_rows))
    div, mod = divmod(n_rows, shards)
    groups = []
    for k in range(shards):
        lo = div * k + min(k, mod)
        hi = lo + div + (1 if k < mod else 0)
        step = rows_per_wrap if rows_per_wrap > 0 else max(hi - lo, 1)
        groups += [range(s, min(s + step, hi)) for s in range(lo, hi, step)]
    return groups


def wrap(docs_ids: list[list[int]], seq_len: int, *, bos_id: Optional[int], eos_id: Optional[int],
         doc_eos: bool = False, rows_per_wrap: int = 0, wrap_shards: int = 1) -> tuple[list[list[int]], int]:
    """Concatenate documents' ids (an EOS after each if doc_eos) and cut them into [BOS] + (seq_len - 2) ids +
    [EOS] blocks; each group of `rows_per_wrap` documents (0: all of them) is cut on its own and its remainder
    shorter than a block dropped (groups lie within `wrap_shards` contiguous shards, see Protocol). Without
    special ids a block is seq_len plain ids.
    Returns (blocks, content ids per block)."""
    specials = (bos_id is not None) + (eos_id is not None)
    content = seq_len - specials
    if content < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text between the special tokens")
    if doc_eos and eos_id is None:
        raise ValueError("doc_eos needs an EOS id; this tokenizer has none")
    pre = [bos_id] if bos_id is not None else []
    post = [eos_id] if eos_id is not None else []
    blocks: list[list[int]] = []
    for group in _row_groups(len(docs_ids), rows_per_wrap, wrap_shards):
        stream: list[int] = []
        for i in group:
            stream.extend(docs_ids[i])
            if doc_eos:
                stream.append(eos_id)
        blocks += [pre + stream[i:i + content] + post for i in range(0, len(stream) - content + 1, content)]
    return blocks, content


def encode_docs(docs: list[str], tokenizer) -> list[list[int]]:
    return tokenizer.encode_batch(docs) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(d) for d in docs]


def tokenize_and_wrap(docs: list[str], tokenizer, seq_len: int, *, protocol: Optional[Protocol] = None,
                      specials: bool = True, doc_eos: Optional[bool] = None, rows_per_wrap: Optional[int] = None,
                      max_blocks: Optional[int] = None) -> Blocks:
    """Tokenize each document with the checkpoint's tokenizer (no special tokens), wrap it into blocks as the
    protocol says, and count the UTF-8 bytes of the text the kept blocks cover (for bits per byte).
    Without a protocol: no separator, one stream, every position scored (doc_eos / rows_per_wrap override)."""
    doc_eos = protocol.doc_eos if doc_eos is None and protocol is not None else bool(doc_eos)
    if rows_per_wrap is None:
        rows_per_wrap = protocol.rows_per_wrap if protocol is not None else 0
    score_bos = protocol.score_bos if protocol is not None else True
    shards = protocol.wrap_shards if protocol is not None else 1
    ids = encode_docs(docs, tokenizer)
    bos, eos = special_ids(tokenizer) if specials else (None, None)
    blocks, content = wrap(ids, seq_len, bos_id=bos, eos_id=eos, doc_eos=doc_eos, rows_per_wrap=rows_per_wrap,
                           wrap_shards=shards)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    sep = 1 if doc_eos else 0
    covered_bytes, left_blocks = 0, len(blocks)
    for group in _row_groups(len(ids), rows_per_wrap, shards):
        if left_blocks <= 0:
            break
        n_group = sum(len(ids[i]) + sep for i in group) // content
        take = min(n_group, left_blocks)
        left_blocks -= take
        left = take * content
        for i in group:
            n = len(ids[i]) + sep
            if left >= n:
                covered_bytes += len(docs[i].encode("utf-8"))
                left -= n
            else:
                # The block boundary cuts this document: count the bytes its first `left` tokens decode to.
                covered_bytes += len(tokenizer.decode(ids[i][:left]).encode("utf-8")) if left > 0 else 0
                break
    n_text = sum(len(i) for i in ids)
    return Blocks(blocks, content, n_text, covered_bytes, sum(len(d.encode("utf-8")) for d in docs), bos, eos,
                  n_rows=len(docs), n_stream_tokens=n_text + sep * len(docs),
                  score_bos=score_bos or not specials)
