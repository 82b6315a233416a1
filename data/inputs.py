"""Reading raw text documents: local files (txt, jsonl, json, parquet, any of them gzipped) or a Hugging Face
dataset. Documents come out in a fixed order, so a preparation can skip the ones it already wrote and resume.

What a document is:
- text files (.txt and anything not structured below): `doc_split` paragraph (blocks separated by blank lines),
  line, file (the whole file), or wikitext (an article: a top-level " = Title = " heading line and everything
  up to the next one);
- records (.jsonl lines, .json list items, .parquet rows, hub dataset rows): one record is one document, except
  doc_split=wikitext, where records are lines (as in the hub's wikitext sets) grouped into articles.
Whitespace-only documents are skipped.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .errors import OFFLINE_HINT, REPO_ROOT, DataError, check_hub, hub_unreachable, resolve_path  # noqa: F401

STRUCTURED = {".jsonl", ".json", ".parquet"}
DOC_SPLITS = ("paragraph", "line", "file", "wikitext")
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass
class InputSpec:
    inputs: list[str] = field(default_factory=list)  # paths, globs or folders
    hf_dataset: str = ""
    hf_config: str = ""
    split: str = "train"
    streaming: bool = True
    text_field: str = "text"
    doc_split: str = "paragraph"
    on_decode_error: str = "strict"  # or "replace" (U+FFFD for invalid bytes)
    max_docs: int = 0  # 0: all
    strip_gutenberg: bool = False  # text files: keep only the lines between `*** START OF` and `*** END OF`
    # (files without both markers are skipped with a warning)


def _kind(path: Path) -> tuple[str, bool]:
    """(format, gzipped): format is jsonl, json, parquet or text."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    return (ext[1:] if ext in STRUCTURED else "text"), gz


def expand_files(patterns: list[str]) -> list[Path]:
    """Every pattern must match: a missing file fails here, before anything is written."""
    out: list[Path] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            matches = sorted(glob.glob(str(Path(pat).expanduser()), recursive=True))
            if not matches and not Path(pat).is_absolute():  # like resolve_path: else from the repository root
                matches = sorted(glob.glob(str(REPO_ROOT / pat), recursive=True))
            matches = [m for m in matches if Path(m).is_file()]
            if not matches:
                raise DataError(f"input pattern {pat!r} matches no file")
            out += [Path(m) for m in matches]
            continue
        p = resolve_path(pat)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            if not found:
                raise DataError(f"input folder {pat} contains no files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input file {pat} does not exist (looked in {Path.cwd()} and the repository root)")
    return out


def files_state(files: list[Path]) -> list[list]:
    """(path, size, mtime) of each input: a staged preparation is only resumed over unchanged inputs."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


class _Decoder:
    def __init__(self, on_error: str):
        if on_error not in ("strict", "replace"):
            raise ValueError(f"on_decode_error must be strict or replace, got {on_error!r}")
        self.on_error = on_error
        self.replaced: dict[str, int] = {}  # where -> invalid sequences replaced (on_error=replace), reported

    def __call__(self, data: bytes, where: str, offset: int, line: Optional[int] = None) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.on_error == "replace":
                text = data.decode("utf-8", errors="replace")
                n = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")  # minus genuine U+FFFD in the input
                self.replaced[where] = self.replaced.get(where, 0) + n
                return text
            at = f" (line {line})" if line is not None else ""
            raise DataError(f"{where}: invalid UTF-8 at byte offset {offset + e.start}{at}: {e.reason} "
                            f"{data[e.start:e.end]!r}. Fix the file, or replace invalid bytes with U+FFFD by "
                            f"passing --on-decode-error replace (data.prepare.on_decode_error=replace)") from None


def _open_binary(path: Path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _lines(path: Path, gz: bool, decode: _Decoder) -> Iterator[str]:
    where = str(path) + (" (decompressed)" if gz else "")
    offset = 0
    with _open_binary(path, gz) as f:
        for n, raw in enumerate(f, 1):
            yield decode(raw, where, offset, n)
            offset += len(raw)


def _group_wikitext(lines: Iterator[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if _WIKI_TITLE.match(line.rstrip("\r\n")) and buf:
            yield "".join(buf)
            buf = []
        buf.append(line)
    if buf:
        yield "".join(buf)


_GUTENBERG_START, _GUTENBERG_END = re.compile(r"^\*\*\* ?START OF"), re.compile(r"^\*\*\* ?END OF")


def strip_gutenberg(text: str) -> Optional[str]:
    """The book without Project Gutenberg's header and licence: the lines strictly between the `*** START OF`
    and `*** END OF` marker lines; None when the text lacks either marker (old 1990s files use a free-form
    "small print" instead, which no fixed rule cuts reliably)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if _GUTENBERG_START.match(ln)), None)
    end = next((i for i in range(len(lines) - 1, -1, -1) if _GUTENBERG_END.match(lines[i])), None)
    if start is None or end is None or end <= start:
        return None
    return "".join(lines[start + 1:end])


def _text_docs(path: Path, gz: bool, spec: InputSpec, decode: _Decoder) -> Iterator[str]:
    if spec.strip_gutenberg:  # cut the whole file first, then split the book as usual
        with _open_binary(path, gz) as f:
            text = strip_gutenberg(decode(f.read(), str(path), 0))
        if text is None:  # skipped, loudly: its licence text must not leak into the training data
            print(f"strip_gutenberg: skipping {path}: no '*** START OF' ... '*** END OF' marker lines",
                  file=sys.stderr)
            return
        if spec.doc_split == "file":
            yield text
            return
        lines: Iterator[str] = iter(text.splitlines(keepends=True))
    elif spec.doc_split == "file":
        with _open_binary(path, gz) as f:
            yield decode(f.read(), str(path), 0)
        return
    else:
        lines = _lines(path, gz, decode)
    if spec.doc_split == "line":
        yield from lines
    elif spec.doc_split == "wikitext":
        yield from _group_wikitext(lines)
    else:  # paragraph
        buf: list[str] = []
        for line in lines:
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf)
                buf = []
        if buf:
            yield "".join(buf)


def _field(record, spec: InputSpec, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with a {spec.text_field!r} field, got {type(record).__name__}")
    if spec.text_field not in record:
        raise DataError(f"{where}: no field {spec.text_field!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                        f"choose the text field with --text-field (data.prepare.text_field)")
    value = record[spec.text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {spec.text_field!r} holds {type(value).__name__}, not text")
    return value


def _records(path: Path, fmt: str, gz: bool, spec: InputSpec, decode: _Decoder) -> Iterator[str]:
    if fmt == "jsonl":
        offset = 0
        with _open_binary(path, gz) as f:
            for n, raw in enumerate(f, 1):
                line = decode(raw, str(path), offset, n)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                yield _field(record, spec, f"{path} line {n}")
    elif fmt == "json":
        with _open_binary(path, gz) as f:
            text = decode(f.read(), str(path), 0)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); for one object "
                            f"per line name the file .jsonl") from None
        if isinstance(data, dict) and spec.text_field in data:
            data = [data]
        elif isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a list of records (or an object holding one list), got an "
                                f"object with keys {', '.join(data)}")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
        for i, record in enumerate(data):
            yield _field(record, spec, f"{path} item {i}")
    elif fmt == "parquet":
        import pyarrow.parquet as pq
        with _open_binary(path, gz) as f:
            pf = pq.ParquetFile(io.BytesIO(f.read()) if gz else path)
            names = pf.schema_arrow.names
            if spec.text_field not in names:
                raise DataError(f"{path}: no column {spec.text_field!r} (columns: {', '.join(names)}); choose the "
                                f"text column with --text-field (data.prepare.text_field)")
            for batch in pf.iter_batches(columns=[spec.text_field], batch_size=4096):
                for value in batch.column(0).to_pylist():
                    yield value or ""
    else:
        raise AssertionError(fmt)


def _hub_rows(spec: InputSpec) -> Iterator[str]:
    flag = check_hub(f"hub dataset {spec.hf_dataset!r}")
    import datasets
    try:
        ds = datasets.load_dataset(spec.hf_dataset, spec.hf_config or None, split=spec.split,
                                   streaming=spec.streaming)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as e:
        hint = f"; {flag} is set, so only the local HF cache was searched" if flag else ""
        raise DataError(f"cannot load hub dataset {spec.hf_dataset!r} ({spec.hf_config or 'default config'}, split "
                        f"{spec.split}): {e}{hint}") from None
    for i, row in enumerate(ds):
        yield _field(row, spec, f"{spec.hf_dataset} row {i}")


def iter_documents(spec: InputSpec, files: Optional[list[Path]] = None) -> Iterator[str]:
    """All non-empty documents, in order (files in the order given, globs sorted)."""
    decode = _Decoder(spec.on_decode_error)
    if spec.doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got {spec.doc_split!r}")

    def raw() -> Iterator[str]:
        if spec.hf_dataset:
            rows = _hub_rows(spec)
            yield from (_group_wikitext(rows) if spec.doc_split == "wikitext" else rows)
            return
        for path in (files if files is not None else expand_files(spec.inputs)):
            fmt, gz = _kind(path)
            if fmt == "text":
                yield from _text_docs(path, gz, spec, decode)
            else:
                recs = _records(path, fmt, gz, spec, decode)
                yield from (_group_wikitext(recs) if spec.doc_split == "wikitext" else recs)

    n = 0
    try:
        for doc in raw():
            if doc.strip():
                yield doc
                n += 1
                if spec.max_docs and n >= spec.max_docs:
                    return
    finally:
        for where, count in decode.replaced.items():  # the replace policy counts what it changed, per file
            print(f"warning: {where}: {count} invalid UTF-8 sequence(s) replaced with U+FFFD "
                  f"(on_decode_error=replace)", file=sys.stderr)


def describe(spec: InputSpec, files: Optional[list[Path]]) -> dict:
    if spec.hf_dataset:
        return {"hub_dataset": spec.hf_dataset, "config": spec.hf_config or None, "split": spec.split,
                "text_field": spec.text_field, "doc_split": spec.doc_split}
    return {"files": [str(f) for f in files or []], "bytes": sum(f.stat().st_size for f in files or []),
            "text_field": spec.text_field, "doc_split": spec.doc_split}
