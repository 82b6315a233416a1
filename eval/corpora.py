"""Evaluation corpora of the zero-shot perplexity protocol: documents from local files or the Hugging Face hub,
detokenized, tokenized with the checkpoint's tokenizer, and wrapped into fixed-length blocks.

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


def _lines_as_rows(text: str) -> list[str]:
    """WikiText files -> the hub's rows: one row per non-blank line, each ending in a newline (the hub's
    wikitext rows keep their '\\n'; blank rows tokenize to nothing). CRLF files read the same."""
    return [line + "\n" for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


def _read_wikitext(path: Path) -> list[str]:
    return _lines_as_rows(path.read_text(encoding="utf-8"))


def _read_ptb(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
            if line.strip()]


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


def _finish(dataset: str, docs: list[str]) -> list[str]:
    """Per-document form before detokenizing: documents are concatenated with no EOS between them, so a
    sentence-per-row dataset gets the newline its file had, or the last word of one document would fuse with
    the first of the next. (LAMBADA's detokenizer prepends its own newline; WikiText rows keep theirs.)"""
    if dataset in ("ptb", "lm1b", "ag_news", "pubmed", "arxiv"):
        return [d if d.endswith("\n") else d + "\n" for d in docs]
    return docs


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
                return Corpus(dataset, split, str(root / rel), [detokenize(dataset, d) for d in _finish(dataset, docs)])
    if hub:
        try:
            docs, source = _load_hub(dataset, split)
            return Corpus(dataset, split, source, [detokenize(dataset, d) for d in _finish(dataset, docs)])
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
# Tokenization and wrapping


@dataclass
class Blocks:
    """Wrapped evaluation blocks and what they cover."""
    tokens: list[list[int]]  # n_blocks rows of seq_len ids
    content_per_block: int  # text tokens per block (seq_len minus the specials)
    n_text_tokens: int  # tokens of the whole concatenated corpus
    covered_bytes: int  # UTF-8 bytes of the detokenized text inside the blocks
    total_bytes: int
    bos_id: Optional[int]
    eos_id: Optional[int]

    @property
    def n_blocks(self) -> int:
        return len(self.tokens)


def special_ids(tokenizer) -> tuple[Optional[int], Optional[int]]:
    """(BOS, EOS) for wrapping. GPT-2 style: one end-of-text token serves as both when only EOS exists.
    A tokenizer with neither (the synthetic language) gets plain blocks."""
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    if bos is None:
        bos = eos
    if eos is None:
        eos = bos
    return bos, eos


def wrap(docs_ids: list[list[int]], seq_len: int, *, bos_id: Optional[int], eos_id: Optional[int],
         doc_eos: bool = False) -> tuple[list[list[int]], int]:
    """Concatenate documents' ids (an EOS after each only if doc_eos, MDLM's original code did) and cut them
    into [BOS] + (seq_len - 2) ids + [EOS] blocks; a remainder shorter than a block is dropped. Without
    special ids a block is seq_len plain ids. Returns (blocks, content ids per block)."""
    specials = (bos_id is not None) + (eos_id is not None)
    content = seq_len - specials
    if content < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text between the special tokens")
    if doc_eos and eos_id is None:
        raise ValueError("doc_eos needs an EOS id; this tokenizer has none")
    stream: list[int] = []
    for ids in docs_ids:
        stream.extend(ids)
        if doc_eos:
            stream.append(eos_id)
    pre = [bos_id] if bos_id is not None else []
    post = [eos_id] if eos_id is not None else []
    return [pre + stream[i:i + content] + post for i in range(0, len(stream) - content + 1, content)], content


def tokenize_and_wrap(docs: list[str], tokenizer, seq_len: int, *, specials: bool = True, doc_eos: bool = False,
                      max_blocks: Optional[int] = None) -> Blocks:
    """Tokenize each document with the checkpoint's tokenizer, wrap into blocks, and count the UTF-8 bytes of the
    text the kept blocks cover (for bits per byte)."""
    ids = tokenizer.encode_batch(docs) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(d) for d in docs]
    bos, eos = special_ids(tokenizer) if specials else (None, None)
    blocks, content = wrap(ids, seq_len, bos_id=bos, eos_id=eos, doc_eos=doc_eos)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    covered_ids = len(blocks) * content
    covered_bytes, left = 0, covered_ids
    for doc, d_ids in zip(docs, ids):
        n = len(d_ids) + (1 if doc_eos else 0)
        if left >= n:
            covered_bytes += len(doc.encode("utf-8"))
            left -= n
        else:
            # The block boundary cuts this document: count the bytes its first `left` tokens decode to.
            covered_bytes += len(tokenizer.decode(d_ids[:left]).encode("utf-8")) if left > 0 else 0
            break
    return Blocks(blocks, content, sum(len(i) for i in ids), covered_bytes,
                  sum(len(d.encode("utf-8")) for d in docs), bos, eos)
