"""Combined queries: text, image and collection-row terms, each with a signed weight, and how they are written.

Pure Python, so the command line checks its terms before torch loads. The engine embeds each term,
normalises it, takes the weighted sum and normalises again (SearchEngine.embed_terms).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from clipsearch.errors import UserError

TEXT, IMAGE, ROW, EMBEDDING = "text", "image", "row", "embedding"
# Terms of one query the HTTP API takes; the command line takes any number.
MAX_TERMS = 8
# "2:golden retriever", "-0.5:grass", "1e-1:x": what precedes the first colon reads as a weight when
# it starts like a number; "photo: a dog" and "http://..." are text as written.
WEIGHT_PREFIX = re.compile(r"^\s*(?P<weight>[+-]?[0-9.][^:\s]*)\s*:(?P<rest>.*)$", re.S)
COMBINE_HELP = (
    "each term is embedded and normalised, the terms are summed with their weights (subtracted terms "
    "negated), and the sum is normalised again"
)


class TermError(UserError, ValueError):
    """A term that cannot be part of a query: a weight that is not a number, an image that does not decode."""


@dataclass(frozen=True)
class Term:
    """One part of a query: `kind` text (a str), image (a PIL image), row (a collection row id) or
    embedding (a vector), and its weight (negative subtracts it)."""

    kind: str
    value: Any
    weight: float = 1.0
    label: str = ""  # how the term is shown: the text, the image's name, the row's path

    def describe(self) -> str:
        sign = "-" if self.weight < 0 else "+"
        magnitude = abs(self.weight)
        weight = "" if magnitude == 1 else f"{magnitude:g}:"
        return f"{sign} {weight}{self.label or self.kind}"


def check_weight(weight: object, where: str) -> float:
    """A weight as a finite, non-zero float; a TermError names `where` it came from."""
    try:
        value = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TermError(f"{where}: weight {weight!r} is not a number") from None
    if not math.isfinite(value) or value == 0:
        raise TermError(f"{where}: weight {weight!r} must be a finite number other than 0")
    return value


def parse_weighted(text: str, where: str = "term") -> tuple[float, str]:
    """(weight, term) of a written term: "2:golden retriever" -> (2.0, "golden retriever"); no prefix, weight 1."""
    match = WEIGHT_PREFIX.match(text)
    if match is None:
        return 1.0, text
    rest = match["rest"].strip()
    if not rest:
        raise TermError(f"{where} {text!r}: nothing after the weight")
    return check_weight(match["weight"], f"{where} {text!r}"), rest


def describe_query(terms: list[Term]) -> str:
    """The terms as one line: "a dog + beach.jpg - grass"."""
    if not terms:
        return ""
    first, *others = terms
    head = first.describe()
    head = head[2:] if head.startswith("+ ") else head
    return " ".join([head, *(term.describe() for term in others)])
