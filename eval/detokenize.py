"""Detokenizers of the zero-shot perplexity protocol (science.md section 4), rule for rule as the reference code
(kuleshov-group/mdlm and bd3lms `dataloader.py`) applies them, so the text -- and hence every GPT-2 token --
equals the reference's. They are applied to each document (hub row) on its own.

Some rules look odd (WikiText's `/' [0-9]/` pattern matches almost nothing; PTB's `<unk>` becomes `?` and the
number token `N` becomes `1`); they are kept because the published numbers were computed with them.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

def _apply(text: str, rules) -> str:
    """(pattern, replacement) steps in order: a str pattern is a literal replace, a compiled one a regex sub."""
    for pattern, repl in rules:
        text = pattern.sub(repl, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, repl)
    return text


_WIKITEXT = (
    ("s '", "s'"),
    (re.compile(r"/' [0-9]/"), "/'[0-9]/"),  # the reference's literal replacement text
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    # spaces inside bracket and quote pairs (\s also matches newlines: documents are single rows)
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)


def wikitext(text: str) -> str:
    """WikiText-2/103: number separators, punctuation spacing, bracket/quote pairs, heading markers."""
    return _apply(text, _WIKITEXT)


def ptb(text: str) -> str:
    """Penn Treebank (Mikolov's LM files): contractions, slashes, numbers, and `<unk>` -> `?`."""
    text = _apply(text, ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")))
    for _ in range(10):  # " N N " needs more than one pass: replacements do not overlap
        text = text.replace(" N ", " 1 ")
    return _apply(text, (("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")))


def lambada(text: str) -> str:
    """LAMBADA (OpenAI's file): only the curly double quotes become straight; then a leading newline."""
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    return "\n" + text.strip()


_LM1B = (
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" \'(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "),
    (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"),
    (" ! ", "! "), (re.compile(r" \!$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r"\" ([^\"]+) \""), r'"\1"'),
    (re.compile(r"\' ([^\']+) \'"), r"'\1'"),
    (re.compile(r"\( ([^\(\)]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\N{POUND SIGN} ", "\N{POUND SIGN}"),
)


def lm1b(text: str) -> str:
    """One Billion Word: URLs, contractions, sentence-final and inner punctuation, quotes, brackets, currency."""
    return _apply(text, _LM1B)


def scientific_papers(text: str) -> str:
    """PubMed / arXiv articles: the WikiText rules, then the LM1B rules (as the reference does)."""
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
