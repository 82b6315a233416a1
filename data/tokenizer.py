"""Tokenizers behind one small interface: encode, decode, vocab_size and the special ids.

A run directory keeps its tokenizer (tokenizer.json + tokenizer_meta.json) so evaluation always tokenizes
with the checkpoint's own tokenizer. Data preparation builds one here (a byte-level BPE trained on the corpus,
or a tokenizer.json / local folder / hub name with the mask and EOS tokens added) and encodes documents with
`DocumentEncoder`, which is several times faster than `tokenizers` alone for byte-level BPEs (see there).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .errors import DataError, check_hub, resolve_path

META_FILE = "tokenizer_meta.json"
MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Names under which existing tokenizers carry their specials (GPT-2, Llama/Mistral, BERT-style, ...).
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
MASK_CANDIDATES = ("<|mask|>", "<|mdm_mask|>", "[MASK]", "<mask>")
# The pre-tokenization regex of GPT-2's byte-level BPE (what `pre_tokenizers.ByteLevel(use_regex=True)` applies).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split for pure-ASCII text, where letters, digits and (Unicode) white space are exactly these classes:
# the standard library's `re` runs it about 3x faster than `regex` runs the \p{...} pattern, and most
# training text is ASCII.
GPT2_SPLIT_ASCII = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""


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


def save_run_tokenizer(tokenizer, run_dir: Path) -> None:
    """Save the data's tokenizer into a run directory, refusing to mix: a run directory that already holds a
    different tokenizer (a resumed run whose data was re-prepared with another one) is an error, since its
    checkpoints' embeddings mean other ids."""
    if not hasattr(tokenizer, "save"):
        return
    run_dir = Path(run_dir)
    if (run_dir / "tokenizer.json").is_file() and (run_dir / META_FILE).is_file():
        old = TextTokenizer.load(run_dir)
        if old.fingerprint != tokenizer.fingerprint:
            raise DataError(f"{run_dir} was trained with tokenizer {old.fingerprint} but the data's tokenizer is "
                            f"{tokenizer.fingerprint}: its checkpoints would read the ids wrongly. Train under a new "
                            f"train.name, or prepare the data with --tokenizer {run_dir / 'tokenizer.json'}")
        return
    tokenizer.save(run_dir)


# ----------------------------------------------------------------------------- building tokenizers

def _tokenizer_error(msg: str):
    return DataError(msg)


def train_bpe(texts: Iterable[str], vocab_size: int, specials: tuple[str, ...] = (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN),
              show_progress: bool = False):
    """A byte-level BPE (GPT-2 style: any text encodes, no unknown token) of `vocab_size` ids including the
    specials, which take ids 0, 1, ... in order. A small corpus may not support that many merges: the result
    is then smaller (its size is recorded, and the model takes its vocabulary from it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise _tokenizer_error(f"a byte-level BPE needs vocab_size >= {floor} (256 bytes + {len(specials)} "
                               f"special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer_spec(spec: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json path, a folder holding one, or a hub name (fails fast
    with a clear message when the hub is unreachable)."""
    from tokenizers import Tokenizer
    rp = resolve_path(spec)
    if rp.is_file():
        try:
            return Tokenizer.from_file(str(rp))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise _tokenizer_error(f"{rp} is not a readable tokenizer.json: {e}") from None
    if rp.is_dir():
        if (rp / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(rp / "tokenizer.json"))
        if (rp / "vocab.json").is_file() and (rp / "merges.txt").is_file():
            return load_gpt2_folder(rp)
        raise _tokenizer_error(f"tokenizer folder {rp} has neither tokenizer.json nor the GPT-2 pair vocab.json + "
                               f"merges.txt (convert other slow tokenizers with transformers first)")
    looks_like_path = spec.endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path:  # hub names are "name" or "org/name"
        raise _tokenizer_error(f"tokenizer file {spec} does not exist")
    flag = check_hub(f"tokenizer {spec!r} from the hub")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as e:
        hint = f" ({flag} is set, so only the local HF cache was searched)" if flag else ""
        raise _tokenizer_error(f"cannot load tokenizer {spec!r} from the hub{hint}: {e}") from None


def load_gpt2_folder(folder: Path):
    """A byte-level BPE from the usual GPT-2 files (vocab.json + merges.txt, OpenAI's encoder.json and
    vocab.bpe), built as GPT-2's fast tokenizer is: GPT-2's regex split, no prefix space, byte-level decoding,
    and the vocabulary's <|...|> entries (GPT-2: <|endoftext|>) as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    folder = Path(folder)
    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise _tokenizer_error(f"{folder}: vocab.json / merges.txt are not a readable GPT-2 BPE: {e}") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in vocab if re.fullmatch(r"<\|[^|\s]+\|>", t)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def with_specials(tok, mask_token: str = MASK_TOKEN, eos_token: str = "") -> TextTokenizer:
    """Wrap a loaded tokenizer, adding what masked diffusion needs: a mask token (added unless present) and an
    EOS token (the named one, else the first usual name the vocabulary has, else <|endoftext|> is added). BOS
    and PAD ids are recorded when the vocabulary has them. Truncation and padding settings are cleared: packing
    needs the full documents."""
    from tokenizers import AddedToken
    tok.no_truncation()
    tok.no_padding()
    vocab = tok.get_vocab(with_added_tokens=True)

    def ensure(content: str) -> int:
        if content not in vocab:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            vocab.update(tok.get_vocab(with_added_tokens=True))
        return vocab[content]

    if eos_token:
        eos = ensure(eos_token)
    else:
        eos = next((vocab[c] for c in EOS_CANDIDATES if c in vocab), None)
        if eos is None:
            eos = ensure(EOS_TOKEN)
    mask = ensure(mask_token or MASK_TOKEN)
    if mask == eos:
        raise _tokenizer_error(f"the mask token {mask_token!r} is also the EOS token: choose another mask token")
    bos = next((vocab[c] for c in BOS_CANDIDATES if c in vocab), None)
    pad = next((vocab[c] for c in PAD_CANDIDATES if c in vocab), None)
    return TextTokenizer(tok, mask_id=mask, eos_id=eos, bos_id=bos, pad_id=pad)


def build_tokenizer(spec: str, vocab_size: int, texts: Optional[Iterable[str]] = None, mask_token: str = MASK_TOKEN,
                    eos_token: str = "", show_progress: bool = False) -> TextTokenizer:
    """spec "bpe": train a byte-level BPE of vocab_size on `texts`; else load (file, folder or hub name)."""
    if spec == "bpe":
        eos = eos_token or EOS_TOKEN
        tok = train_bpe(texts if texts is not None else [], vocab_size,
                        specials=(eos, mask_token or MASK_TOKEN, PAD_TOKEN), show_progress=show_progress)
        return with_specials(tok, mask_token, eos)
    return with_specials(load_tokenizer_spec(spec), mask_token, eos_token)


# ----------------------------------------------------------------------------- fast document encoding

def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (what ByteLevel emits):
    printable Latin-1 bytes map to themselves, the others to code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_BYTE_CHARS = _byte_chars()


def _word_cache_applies(tok) -> bool:
    """True when encoding = regex split + an independent, deterministic encoding of each piece: no normalizer,
    a GPT-2 byte-level pre-tokenizer, no BPE dropout, and no non-special added tokens (those are matched in the
    raw text before splitting). Then a piece -> ids cache is exact."""
    pre = tok.pre_tokenizer
    return (tok.normalizer is None and type(pre).__name__ == "ByteLevel" and bool(pre.use_regex)
            and not pre.add_prefix_space and not getattr(tok.model, "dropout", None)
            and all(t.special for t in tok.get_added_tokens_decoder().values()))


class DocumentEncoder:
    """Encodes training documents: ids of each document followed by EOS, as one flat array plus lengths.

    Text that spells a special token (say "<|mask|>" inside a web page) is encoded as ordinary text: a corpus
    must never inject mask or EOS ids. For byte-level BPEs the encoder splits text with GPT-2's regex itself
    and caches the ids of every distinct piece, calling `tokenizers` only for pieces it has not seen: natural
    text repeats its words (Zipf), so after a warm-up almost every piece is a dict lookup. The result is
    identical to `tokenizers`' own encoding (tests check it on real text), at several times the speed."""

    def __init__(self, tokenizer_json: str, eos_id: Optional[int], cache_size: int = 1 << 20, fast: bool = True):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.encode_special_tokens = True
        self.eos_id = eos_id
        self.cache: dict[str, list[int]] = {}
        self.cache_size = cache_size
        self.split = None
        if fast and _word_cache_applies(self.tok):
            try:
                import regex
                self._split_unicode = regex.compile(GPT2_SPLIT).findall
                self._split_ascii = re.compile(GPT2_SPLIT_ASCII, re.ASCII).findall
                self.split = self._split_gpt2
            except ImportError:  # the `regex` module (for \p{L}) is optional: fall back to tokenizers alone
                self.split = None

    @property
    def fast(self) -> bool:
        return self.split is not None

    def _split_gpt2(self, text: str) -> list[str]:
        return self._split_ascii(text) if text.isascii() else self._split_unicode(text)

    def _pieces(self, texts: list[str]) -> list[list[str]]:
        pieces = [self.split(t) for t in texts]
        if len(self.cache) > self.cache_size:
            self.cache.clear()
        new = set(itertools.chain.from_iterable(pieces)).difference(self.cache.keys())
        if new:
            # A new piece goes straight to the model, in the byte-to-character alphabet the ByteLevel
            # pre-tokenizer would have produced: the same ids as the full pipeline, at a third of its cost.
            tokenize, table = self.tok.model.tokenize, _BYTE_CHARS
            for piece in new:
                self.cache[piece] = [t.id for t in tokenize(piece.encode().decode("latin-1").translate(table))]
        return pieces

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without EOS."""
        if self.split is None:
            return self.tok.encode(text, add_special_tokens=False).ids
        (pieces,) = self._pieces([text])
        return list(itertools.chain.from_iterable(map(self.cache.__getitem__, pieces)))

    def encode_docs(self, texts: list[str], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids, lengths): each document's ids then EOS (when the tokenizer has one)."""
        eos = [] if self.eos_id is None else [self.eos_id]
        out: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        if self.split is None:
            encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)
            for i, e in enumerate(encs):
                ids = e.ids
                out += ids
                out += eos
                lengths[i] = len(ids) + len(eos)
        else:
            get = self.cache.__getitem__
            for i, pieces in enumerate(self._pieces(texts)):
                n = len(out)
                out.extend(itertools.chain.from_iterable(map(get, pieces)))
                out += eos
                lengths[i] = len(out) - n
        return np.array(out, dtype=dtype), lengths
