"""Two independent rule-based CheXpert labelers for report text.

``lexicon`` (phrase lexicons with NegEx-style trigger scopes) and ``grammar`` (a clause grammar over
chunked noun phrases) give the same output format, see :mod:`index.labelers.common`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from index.labelers import grammar, lexicon
from index.labelers.common import Labels


class Extractor(str, Enum):
    LEXICON = "lexicon"
    GRAMMAR = "grammar"


_FUNCS: dict[Extractor, Callable[[str], Labels]] = {
    Extractor.LEXICON: lexicon.label_report,
    Extractor.GRAMMAR: grammar.label_report,
}


def get_extractor(name: str | Extractor) -> Callable[[str], Labels]:
    """The labelling function of an extractor; ``ValueError`` names the valid choices."""
    try:
        return _FUNCS[Extractor(name)]
    except ValueError:
        raise ValueError(f"unknown extractor {name!r}: use one of {[e.value for e in Extractor]}") from None


def label_report(text: str, extractor: str | Extractor = Extractor.LEXICON) -> Labels:
    return get_extractor(extractor)(text)


__all__ = ["Extractor", "Labels", "get_extractor", "label_report"]
