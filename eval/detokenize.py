"""Detokenizers of the zero-shot perplexity protocol (docs/science.md, section 4).

Benchmarks such as WikiText and PTB ship pre-tokenized text ("it 's", "3 @.@ 5", "( a )"); a model trained on
natural text is evaluated on the text a human would write, so each dataset's tokenization is undone before the
checkpoint's own tokenizer sees it. One function per dataset family, applied per document.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

_CONTENT = r"[^\S\n]*"  # spaces/tabs but not newlines: brackets and quotes never span lines


def _strip_inside(text: str, left: str, right: str) -> str:
    """'( a b )' -> '(a b)' for one bracket/quote pair, within a line."""
    l, r = re.escape(left), re.escape(right)
    inner = f"[^{l}{r}\\n]*?" if left != right else f"[^{l}\\n]*?"
    return re.sub(f"{l}{_CONTENT}({inner}){_CONTENT}{r}", lambda m: f"{left}{m.group(1)}{right}", text)


def wikitext(text: str) -> str:
    """WikiText (tokenized or raw): undo ' @-@ ' style separators, spaces before punctuation and inside
    brackets and quotes, split possessives, and '= = heading = =' markers."""
    # Number and word separators: "3 @.@ 5" -> "3.5", "1 @,@ 000" -> "1,000", "well @-@ known" -> "well-known".
    for sep in "-,.":
        text = text.replace(f" @{sep}@ ", sep)
    # Possessive and plural-possessive apostrophes.
    text = text.replace(" 's", "'s").replace("s ' ", "s' ")
    # Punctuation that attaches to the previous word.
    for p in ",.:;!?":
        text = text.replace(f" {p} ", f"{p} ")
    text = re.sub(r" ([,.:;!?])(?=\n|$)", r"\1", text)
    # Brackets and quotes hug their content.
    for left, right in ("()", "[]", "{}", '""'):
        text = _strip_inside(text, left, right)
    # Section headings: "= = = Title = = =" -> "=== Title ===" (longest first).
    for n in (4, 3, 2):
        text = text.replace(" ".join("=" * n), "=" * n)
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    # Spaces around line breaks carry nothing.
    text = re.sub(r"[^\S\n]+\n", "\n", text)
    return re.sub(r"\n[^\S\n]+", "\n", text)


def ptb(text: str) -> str:
    """Penn Treebank (Mikolov's LM version): rejoin clitics and escaped slashes. '<unk>' and the number token
    'N' are kept as text: they are what the data holds."""
    text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
    text = text.replace(" \n ", "\n").replace("\\/", "/")
    return text


def lambada(text: str) -> str:
    """LAMBADA (OpenAI's file): curly quotes to straight ones; a leading newline separates the passages."""
    for curly, straight in (("\u201c", '"'), ("\u201d", '"'), ("\u2018", "'"), ("\u2019", "'")):
        text = text.replace(curly, straight)
    return "\n" + text.strip()


def lm1b(text: str) -> str:
    """One Billion Word: undo the spacing around punctuation, quotes, brackets, URLs and currency signs."""
    text = re.sub(r"(https?) : / / ", r"\1://", text)
    text = re.sub(r" '(\w)", r"'\1", text)  # "it 's" -> "it's", "' 90s" stays apart
    text = re.sub(r" ([.,:;!?])(?= |$)", r"\1", text)
    text = text.replace(" / ", "/")
    for left, right in ("()", "[]", '""', "''"):
        text = _strip_inside(text, left, right)
    for sign in "$\N{POUND SIGN}\N{EURO SIGN}":
        text = text.replace(f"{sign} ", sign)
    return text


def scientific_papers(text: str) -> str:
    """PubMed / arXiv articles (scientific_papers): WikiText-style then LM1B-style cleanup (MDLM's choice)."""
    return lm1b(wikitext(text))


DETOKENIZERS: dict[str, Optional[Callable[[str], str]]] = {
    "wikitext2": wikitext,
    "wikitext103": wikitext,
    "ptb": ptb,
    "lambada": lambada,
    "lm1b": lm1b,
    "ag_news": None,  # already natural text
    "pubmed": scientific_papers,
    "arxiv": scientific_papers,
    "synthetic": None,
}


def detokenize(dataset: str, text: str) -> str:
    fn = DETOKENIZERS.get(dataset)
    return text if fn is None else fn(text)
