"""A collection's per-row fields as columns (pyarrow), each row's fields for its results, and filters over them as row sets."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import numpy as np
import torch

from clipsearch.fields import (
    DATE,
    FILE_FIELDS,
    GLOB_OPERATORS,
    NUMBER,
    PATH_FIELD,
    TEXT,
    Condition,
    columns_of,
    comparable_value,
    glob_pattern,
    merged_kind,
    parse_conditions,
    stat_fields,
    unknown_field,
)

# Row sets of recent filters kept per table: a server's users repeat theirs page after page. One
# is a byte per row (1 MB at 1M rows) plus what its search paths derived from it.
CACHED_FILTERS = 8


class RowSet:
    """The rows of a collection that pass a filter, and the forms each search path needs, each made once."""

    def __init__(self, mask: np.ndarray):
        self.mask = np.ascontiguousarray(mask, dtype=bool)

    def __len__(self) -> int:
        return self.count

    @cached_property
    def count(self) -> int:
        return int(self.mask.sum())

    @property
    def total(self) -> int:
        return int(self.mask.shape[0])

    @property
    def fraction(self) -> float:
        return self.count / self.total if self.total else 0.0

    @cached_property
    def rows(self) -> torch.Tensor:
        """The passing rows, ascending (int64)."""
        return torch.from_numpy(np.flatnonzero(self.mask))

    @cached_property
    def bias(self) -> torch.Tensor:
        """0 for a passing row, -inf for the others: added to scores, the others can never rank."""
        bias = torch.full((self.total,), float("-inf"))
        bias[self.rows] = 0.0
        return bias

    @cached_property
    def bitmap(self) -> np.ndarray:
        """One bit per row, row i at bit i % 8 of byte i // 8: faiss's IDSelectorBitmap layout."""
        return np.packbits(self.mask, bitorder="little")


def _pyarrow():
    import pyarrow
    import pyarrow.compute

    return pyarrow, pyarrow.compute


def shard_fields(shard: Mapping) -> dict:
    """A shard's stored fields {'kinds', 'columns'}; shards written before fields were stored give
    their files' size and mtime from the rows' `stat`, where they have it."""
    stored = shard.get("meta")
    if isinstance(stored, Mapping) and isinstance(stored.get("columns"), Mapping):
        return {"kinds": dict(stored.get("kinds") or {}), "columns": dict(stored["columns"])}
    stats = shard.get("stat")
    if not stats:
        return {"kinds": {}, "columns": {}}
    return columns_of([stat_fields(stat) for stat in stats], FILE_FIELDS)


class MetadataTable:
    """Every row's fields, one pyarrow column per field, in the collection's row order.

    `path` is a field too (the row's path, the only field every row has). A row's missing value is
    null: it passes no condition on that field, `!=` included, as in SQL.
    """

    def __init__(self, paths: Sequence[str], kinds: Mapping[str, str], columns: Mapping[str, object]):
        self.paths = paths
        self.kinds = {PATH_FIELD: TEXT, **{name: kind for name, kind in kinds.items() if name != PATH_FIELD}}
        self.columns = {name: column for name, column in columns.items() if name != PATH_FIELD}
        self._selected: OrderedDict[tuple, RowSet] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_shards(cls, paths: Sequence[str], shards: Sequence[Mapping], locations: Iterable[tuple[int, int]]) -> MetadataTable:
        """The fields of rows `locations` ((shard number, row in shard), in collection order) of `shards`."""
        return cls(paths, *shard_columns(shards, locations))

    @property
    def fields(self) -> dict[str, str]:
        """Each field's kind: number, date or text."""
        return dict(self.kinds)

    @cached_property
    def _path_column(self):
        paths = self.paths.binary if isinstance(self.paths, PathColumn) else path_bytes(self.paths)
        return text_of(paths)

    def column(self, name: str):
        return self._path_column if name == PATH_FIELD else self.columns[name]

    def row(self, row: int) -> dict:
        """The fields of one row that it has (path aside), as JSON values."""
        values = {}
        for name, column in self.columns.items():
            value = column[row].as_py()
            if value is not None:
                values[name] = value
        return values

    def to_arrow(self, rows: Sequence[int] | None = None):
        """The fields (path aside) as a pyarrow Table, of `rows` or of every row, for exports."""
        pa, pc = _pyarrow()
        columns = self.columns if rows is None else {
            name: pc.take(column, pa.array(rows, pa.int64())) for name, column in self.columns.items()
        }
        return pa.table(dict(columns)) if columns else pa.table({})

    def select(self, conditions: Iterable[str | Condition]) -> RowSet | None:
        """The rows that pass every condition (None when there are none to apply); FilterError for a bad one."""
        conditions = parse_conditions(conditions)
        if not conditions:
            return None
        key = tuple(sorted(set(conditions), key=str))
        with self._lock:
            if key in self._selected:
                self._selected.move_to_end(key)
                return self._selected[key]
        mask = np.ones(len(self), dtype=bool)
        for condition in key:
            mask &= self._passes(condition)
        selected = RowSet(mask)
        with self._lock:
            self._selected[key] = selected
            while len(self._selected) > CACHED_FILTERS:
                self._selected.popitem(last=False)
        return selected

    def _passes(self, condition: Condition) -> np.ndarray:
        pa, pc = _pyarrow()
        if condition.field not in self.kinds:
            raise unknown_field(condition, self.kinds)
        kind = self.kinds[condition.field]
        value = comparable_value(condition, kind)
        column = self.column(condition.field)
        if condition.op in GLOB_OPERATORS:
            matched = pc.match_substring_regex(column, glob_pattern(value))
            result = matched if condition.op == "~" else pc.invert(matched)
        else:
            if kind == DATE:
                # Stored dates are cut to the precision of the value: taken=2023-06 is all of June.
                column = pc.utf8_slice_codeunits(column, 0, len(value))
            compare = {"=": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal,
                       ">": pc.greater, ">=": pc.greater_equal}[condition.op]
            result = compare(column, pa.scalar(value, pa.float64() if kind == NUMBER else pa.string()))
        return pc.fill_null(result, False).to_numpy(zero_copy_only=False)


def shard_columns(shards: Sequence[Mapping], locations: Iterable[tuple[int, int]]) -> tuple[dict[str, str], dict[str, object]]:
    """(kinds, columns) of the fields of rows `locations` ((shard number, row in shard), in collection
    order) of `shards`: one pyarrow array a field, null where a row's shard lacks it."""
    pa, pc = _pyarrow()
    parts = [shard_fields(shard) for shard in shards]
    lengths = [len(shard["path"]) for shard in shards]
    starts = np.cumsum([0, *lengths])
    locations = np.asarray(list(locations), dtype=np.int64).reshape(-1, 2)
    take = pa.array(starts[locations[:, 0]] + locations[:, 1]) if len(locations) else pa.array([], pa.int64())
    names: dict[str, list[str]] = {}
    live = set(locations[:, 0].tolist())  # a shard whose rows were all replaced or removed has no say
    for number, part in enumerate(parts):
        if number not in live:
            continue
        for name in part["columns"]:
            names.setdefault(name, []).append(part["kinds"].get(name) or FILE_FIELDS.get(name, TEXT))
    kinds, columns = {}, {}
    for name, part_kinds in names.items():
        kind = merged_kind(part_kinds)
        chunks = [_column_array(pa, part["columns"].get(name) if number in live else None, length, kind)
                  for number, (part, length) in enumerate(zip(parts, lengths))]
        if kind == NUMBER:  # whole numbers stay integers (sizes, pixels); any fraction makes the field float
            arrow_type = pa.float64() if any(pa.types.is_floating(chunk.type) for chunk in chunks) else pa.int64()
            chunks = [chunk.cast(arrow_type) for chunk in chunks]
        kinds[name] = kind
        columns[name] = pc.take(pa.chunked_array(chunks, type=chunks[0].type), take).combine_chunks()
    return kinds, columns


def _column_array(pa, values: Sequence | None, length: int, kind: str):
    """One shard's values of a field as an array of the field's type; a shard without the field gives nulls."""
    if values is None:
        return pa.nulls(length, pa.int64() if kind == NUMBER else pa.string())
    if kind == NUMBER:
        array = pa.array(values)
        return array.cast(pa.int64()) if pa.types.is_null(array.type) else array
    return pa.array([None if value is None else str(value) for value in values], type=pa.string())


def empty_table(paths: Sequence[str]) -> MetadataTable:
    """A table of paths alone, for a collection built from bare embeddings."""
    return MetadataTable(paths, {}, {})


def path_bytes(paths: Iterable[str]):
    """Paths as an Arrow binary array, each its UTF-8 bytes: surrogate-escaped names (bytes no UTF-8
    decodes, which Linux allows in file names) keep their exact bytes."""
    pa, _ = _pyarrow()
    return pa.array([path.encode("utf-8", "surrogateescape") for path in paths], type=pa.large_binary())


def text_of(binary):
    """A binary (chunked) array of paths as text, for filters on `path`; bytes no UTF-8 decodes show as U+FFFD."""
    pa, _ = _pyarrow()
    try:
        return binary.cast(pa.large_string())  # validates the UTF-8 and keeps the buffers
    except pa.ArrowInvalid:
        values = binary.to_pylist()
        return pa.array([None if value is None else value.decode("utf-8", "replace") for value in values], pa.large_string())


class PathColumn(Sequence):
    """A collection's paths over an Arrow binary column, such as the memory-mapped one of a consolidated
    store: a path becomes a Python string only when asked for, so holding 1B paths costs no memory
    of the process's own (a list of 20M short paths as Python strings took 1.64 GB)."""

    def __init__(self, binary):
        pa, _ = _pyarrow()
        self.binary = binary if isinstance(binary, pa.ChunkedArray) else pa.chunked_array([binary], pa.large_binary())
        # Where each chunk starts, for a row's chunk by binary search (a store has one chunk per 32,768 rows).
        self._starts = np.cumsum([0, *(len(chunk) for chunk in self.binary.chunks)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [value.decode("utf-8", "surrogateescape") for value in self._slice(item)]
        row = int(item) + len(self) if int(item) < 0 else int(item)
        if not 0 <= row < len(self):
            raise IndexError(f"row {item} of {len(self)}")
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.binary.chunk(chunk)[row - int(self._starts[chunk])].as_py().decode("utf-8", "surrogateescape")

    def _slice(self, item: slice) -> list[bytes]:
        start, stop, step = item.indices(len(self))
        if step != 1:
            return [self.binary[row].as_py() for row in range(start, stop, step)]
        return self.binary.slice(start, max(0, stop - start)).to_pylist()

    def __iter__(self):
        for chunk in self.binary.chunks:
            yield from (value.decode("utf-8", "surrogateescape") for value in chunk.to_pylist())

    def index(self, path: str, start: int = 0, stop: int | None = None) -> int:
        """The first row holding `path` (a scan in Arrow, about as fast as reading the column); ValueError if none."""
        _, pc = _pyarrow()
        stop = len(self) if stop is None else stop
        found = pc.index(self.binary.slice(start, max(0, stop - start)), path.encode("utf-8", "surrogateescape")).as_py()
        if found < 0:
            raise ValueError(f"{path!r} is not in the collection")
        return start + found

    def __contains__(self, path) -> bool:
        try:
            self.index(str(path))
        except ValueError:
            return False
        return True
