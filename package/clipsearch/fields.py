"""Per-row fields of a collection (caption, url, file facts, any table column): their kinds, their stored values, and filter conditions on them.

Pure Python, so commands parse `--where` before torch loads; evaluating conditions over a whole
collection is `metadata.py`'s job.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from clipsearch.errors import UserError

# A field holds numbers, dates (ISO 8601 text, compared at the precision a filter names) or text.
NUMBER, DATE, TEXT = "number", "date", "text"
KINDS = (NUMBER, DATE, TEXT)
# Every row has its path; the encoder adds these for an image file, beside any table columns.
PATH_FIELD = "path"
FILE_FIELDS = {"size": NUMBER, "mtime": DATE, "taken": DATE, "width": NUMBER, "height": NUMBER}
# Longest operators first, so "<=" is never read as "<" followed by a value "=...".
OPERATORS = ("<=", ">=", "!=", "!~", "=", "<", ">", "~")
GLOB_OPERATORS = ("~", "!~")
CONDITION_PATTERN = re.compile(
    r"^\s*(?P<field>[^<>=!~\s](?:[^<>=!~]*[^<>=!~\s])?)\s*(?P<op><=|>=|!=|!~|=|<|>|~)\s*(?P<value>.*?)\s*$", re.S
)
# YYYY, YYYY-MM, YYYY-MM-DD, then a time to the minute or second (T or a space between), fractions dropped.
DATE_PATTERN = re.compile(r"^(\d{4})(?:[-:](\d{2})(?:[-:](\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?)?)?$")
CONDITION_HELP = (
    "FIELD OP VALUE, OP one of = != < <= > >= ~ (glob, e.g. path~*/2023/*) !~ (not the glob); "
    "dates compare at the precision given (taken=2023-06 is all of June 2023)"
)


class FilterError(UserError, ValueError):
    """A filter that cannot be applied: bad syntax, a field the collection lacks, a value of the wrong kind."""


# ---------------------------------------------------------------------------------------------
# Values as stored
# ---------------------------------------------------------------------------------------------


def parse_date(text: str) -> str | None:
    """`text` as ISO 8601 at the precision it was written ("2023", "2023-06", "2023-06-01T10:30:00"), or None.

    EXIF's "2023:06:01 10:30:00" reads too. Out-of-range parts ("2023-13-01") are not dates.
    """
    match = DATE_PATTERN.match(text.strip())
    if match is None:
        return None
    parts = [part for part in match.groups() if part is not None]
    numbers = [int(part) for part in parts] + [1, 1, 0, 0, 0][len(parts) - 1 :]
    try:
        datetime(*numbers[:6])
    except ValueError:
        return None
    text = parts[0]
    for part, separator in zip(parts[1:], "--T::"):
        text += separator + part
    return text


def _number(value: object) -> int | float | None:
    """An int or float cell as itself, a string that reads as one as its number, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # numpy's float64 too: stored as a plain float, which a safe load reads
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        # Only numbers written as numbers: "007" and "1e400" stay text, so no digit of an id is lost.
        text = value.strip()
        if re.fullmatch(r"[+-]?(?:0|[1-9]\d*)", text):
            return int(text)
        if re.fullmatch(r"[+-]?(?:0|[1-9]\d*)?\.\d+(?:[eE][+-]?\d+)?|[+-]?(?:0|[1-9]\d*)[eE][+-]?\d+", text):
            number = float(text)
            return number if math.isfinite(number) else None
        return None
    if hasattr(value, "item") and not hasattr(value, "isoformat"):  # numpy scalars of a parquet column
        return _number(value.item())
    return None


def missing(value: object) -> bool:
    """None, blank text, NaN, and pandas' missing markers (named, so pandas stays unloaded)."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def scalar(value: object) -> str | int | float | None:
    """A table cell as a value a shard can hold (a safe load reads only plain types): numbers stay
    numbers, times become ISO text, anything else (lists, bytes) its text."""
    if missing(value):
        return None
    if isinstance(value, str):
        return value.strip()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return str(bool(value)).lower()
    number = _number(value)
    return number if number is not None else str(value)


def normalise_column(values: Sequence[object]) -> tuple[str, list]:
    """(kind, values) of one field's column: numbers stay numbers (numeric strings become them), dates become
    ISO text, the rest text; a missing value is None. The kind is the one every present value fits."""
    present = [value for value in values if not missing(value)]
    numbers = [_number(value) for value in present]
    if present and all(number is not None for number in numbers):
        return NUMBER, [None if missing(value) else _number(value) for value in values]
    if present and all(isinstance(value, str) or hasattr(value, "isoformat") for value in present):
        dates = [parse_date(value if isinstance(value, str) else value.isoformat()) for value in present]
        if all(date is not None for date in dates):
            iso = iter(dates)
            return DATE, [None if missing(value) else next(iso) for value in values]
    return TEXT, [None if missing(value) else str(value) for value in values]


def columns_of(rows: Sequence[Mapping[str, object]], known: Mapping[str, str] | None = None) -> dict:
    """Per-row field dicts as a stored column set {'kinds': {name: kind}, 'columns': {name: values}}.

    A row without a field holds None there. `known` fixes the kind of some fields (the file facts),
    the others are inferred from their values.
    """
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    kinds, columns = {}, {}
    for name in names:
        values = [row.get(name) for row in rows]
        if known and name in known:
            kinds[name] = known[name]
            columns[name] = [None if missing(value) else value for value in values]
        else:
            kinds[name], columns[name] = normalise_column(values)
    return {"kinds": kinds, "columns": columns}


def merged_kind(kinds: Iterable[str]) -> str:
    """The kind of a field whose parts (shards) say `kinds`: one kind if they agree, else text."""
    distinct = set(kinds)
    return distinct.pop() if len(distinct) == 1 else TEXT


def time_text(mtime_ns: int) -> str:
    """A file time (ns since the epoch) as local ISO 8601 to the second, as `ls -l` would show it."""
    return datetime.fromtimestamp(mtime_ns / 1e9).isoformat(timespec="seconds")


def stat_fields(stat: Sequence[int] | None) -> dict:
    """A file's size and modification time from its (size, mtime_ns, ...) stat, the rows' change test."""
    return {} if not stat else {"size": int(stat[0]), "mtime": time_text(int(stat[1]))}


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One filter, FIELD OP VALUE, as typed; checked against the collection's fields when applied."""

    field: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value}"


def parse_condition(text: str) -> Condition:
    """A `--where` text as a Condition; a FilterError says what is wrong with it."""
    match = CONDITION_PATTERN.match(text)
    if match is None:
        raise FilterError(f"filter {text!r}: expected {CONDITION_HELP}")
    value = match["value"]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    if value == "":
        raise FilterError(f"filter {text!r} has no value after {match['op']!r}")
    return Condition(match["field"], match["op"], value)


def parse_conditions(texts: Iterable[str | Condition]) -> tuple[Condition, ...]:
    return tuple(text if isinstance(text, Condition) else parse_condition(text) for text in texts)


def _class_end(glob: str, start: int) -> int:
    """Where the character class opened at `start` closes, or -1: a "]" first in the class is a member."""
    first = start + 1 + (glob[start + 1 : start + 2] == "!")
    return glob.find("]", first + 1)


def glob_pattern(glob: str) -> str:
    """A shell glob (`*`, `?`, `[...]`, `[!...]`) as an anchored regular expression that RE2 and Python both read.

    `*` crosses folder separators, so `path~*/2023/*` finds 2023 at any depth.
    """
    pattern, position = [], 0
    while position < len(glob):
        character = glob[position]
        if character == "*":
            pattern.append(".*")
        elif character == "?":
            pattern.append(".")
        elif character == "[" and _class_end(glob, position) > 0:
            end = _class_end(glob, position)
            negate = glob[position + 1] == "!"
            inside = glob[position + 1 + negate : end]
            pattern.append("[" + ("^" if negate else "") + inside.replace("\\", "\\\\") + "]")
            position = end
        else:
            pattern.append(re.escape(character))
        position += 1
    return "(?s)^" + "".join(pattern) + "$"


def comparable_value(condition: Condition, kind: str) -> float | str:
    """The condition's value in the field's terms (a number, an ISO date prefix, or text); FilterError if it has none."""
    if condition.op in GLOB_OPERATORS:
        if kind == NUMBER:
            raise FilterError(f"filter {condition}: {condition.field} holds numbers; {condition.op} matches text and dates")
        return condition.value
    if kind == NUMBER:
        number = _number(condition.value)
        if number is None:
            raise FilterError(f"filter {condition}: {condition.field} holds numbers, and {condition.value!r} is not one")
        return float(number)
    if kind == DATE:
        date = parse_date(condition.value)
        if date is None:
            raise FilterError(
                f"filter {condition}: {condition.field} holds dates, and {condition.value!r} does not parse as one "
                "(YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)"
            )
        return date
    return condition.value


def unknown_field(condition: Condition, fields: Iterable[str]) -> FilterError:
    names = ", ".join(sorted(fields))
    return FilterError(f"filter {condition}: this collection has no field {condition.field!r}; its fields: {names}")
