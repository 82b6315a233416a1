"""Tokenizers behind one small interface: encode, decode, vocab_size and the special ids.

A run directory keeps its tokenizer (tokenizer.json + tokenizer_meta.json) so evaluation always tokenizes
with the checkpoint's own tokenizer."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

META_FILE = "tokenizer_meta.json"


class TextTokenizer:
    """A `tokenizers` tokenizer plus the special ids unmask needs (mask always; eos/bos where present)."""

    def __init__(self, tok, mask_id: int, eos_id: Optional[int] = None, bos_id: Optional[int] = None,
                 pad_id: Optional[int] = None):
        self.tok = tok
        self.mask_id, self.eos_id, self.bos_id, self.pad_id = mask_id, eos_id, bos_id, pad_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        (folder / META_FILE).write_text(json.dumps({
            "mask_id": self.mask_id, "eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id,
            "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "TextTokenizer":
        from tokenizers import Tokenizer
        folder = Path(folder)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        meta = json.loads((folder / META_FILE).read_text())
        return cls(tok, meta["mask_id"], meta.get("eos_id"), meta.get("bos_id"), meta.get("pad_id"))


class SymbolTokenizer:
    """The synthetic language's tokenizer: identity on symbols, written as pseudo-words."""
    eos_id = bos_id = pad_id = None

    def __init__(self, lang):
        self.lang = lang
        self.mask_id = lang.num_symbols
        self.vocab_size = lang.num_symbols + 1
        self._ids = {lang.word(i): i for i in range(self.vocab_size)}

    fingerprint = property(lambda self: f"synthetic-{self.lang.num_symbols}")

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not a word of the synthetic language") from None

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return " ".join(self.lang.word(int(i)) for i in ids)


def load_run_tokenizer(run_dir: Path, cfg):
    """The tokenizer a run trained with: its saved copy, or the synthetic language rebuilt from the config."""
    run_dir = Path(run_dir)
    if (run_dir / "tokenizer.json").is_file():
        return TextTokenizer.load(run_dir)
    if cfg.data.kind == "synthetic":
        from .synthetic import MarkovLanguage
        s = cfg.data.synthetic
        return SymbolTokenizer(MarkovLanguage(s.num_symbols, s.branching, s.concentration, s.seed))
    raise FileNotFoundError(f"{run_dir} has no tokenizer.json; it is needed to tokenize evaluation text")
