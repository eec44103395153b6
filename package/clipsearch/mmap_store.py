"""One consolidated fp16 matrix beside the shards, memory-mapped, so exact search and the index never read the collection into memory first.

Its rows' paths and fields are one Arrow file beside it, memory-mapped too: a search process over
the store holds neither as Python objects and never reads the shards.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipsearch.durable import (
    FolderLock,
    atomic_folder,
    remove_stale_locks,
    remove_stale_temporaries,
    write_durably,
)
from clipsearch.fields import PATH_FIELD
from clipsearch.metadata import MetadataTable, PathColumn, path_bytes, shard_columns
from clipsearch.store import (
    Catalog,
    EncodingMismatchError,
    folder_inputs,
    list_shards,
    order_fingerprint,
    read_catalog,
    read_json,
)

STORE_DIR = "consolidated"
MATRIX_FILE = "embeddings.f16"
ROWS_FILE = "rows.arrow"  # Arrow IPC file: PATH_FIELD (each path's exact bytes) and every field, in row order
KINDS_KEY = b"clipsearch.kinds"  # the Arrow schema's metadata: each field's kind (number, date, text)
INFO_FILE = "store.json"
# Rows normalised and written at a time: 64 MB of fp32 at 512-d, whatever the collection's size.
WRITE_ROWS = 32_768


@dataclass
class ConsolidatedStore:
    """A collection's live rows as one read-only, memory-mapped [count, dim] fp16 matrix, and their paths
    and fields, memory-mapped from the rows file."""

    folder: Path
    paths: PathColumn | None  # None when opened for its matrix alone (open_store(..., matrix_only=True))
    embeddings: torch.Tensor  # unit-length rows, fp16, backed by the file: pages load on first touch
    info: dict
    fields: MetadataTable | None
    _scattered: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def order_fingerprint(self) -> str:
        return self.info["order_fingerprint"]

    def rows(self, row_ids: np.ndarray) -> np.ndarray:
        """fp16 rows for `row_ids` (any shape), read from the file; only their pages are touched."""
        return self._scattered_rows()[row_ids]

    def _scattered_rows(self) -> np.ndarray:
        """The matrix through a second mapping advised MADV_RANDOM, for reads of scattered rows.

        An index re-ranks a few hundred scattered rows a query. Under the default advice each page
        fault also reads ahead around it: on a 20M-row store larger than the free page cache, 60
        queries from a cold cache read 25.3 GB from disk and took 394 ms each on average, against
        2.7 GB and 84 ms with this advice (BENCHMARKS.md, "Built in parts"). The scans of exact
        search keep the read-ahead of `embeddings`.
        """
        if self._scattered is None:
            count, dim = self.embeddings.shape
            if count == 0 or not hasattr(mmap, "MADV_RANDOM"):  # an empty file cannot be mapped; no madvise off Linux/BSD
                return self.embeddings.numpy()
            with open(self.folder / MATRIX_FILE, "rb") as file:
                mapping = mmap.mmap(file.fileno(), count * dim * 2, access=mmap.ACCESS_READ)
            mapping.madvise(mmap.MADV_RANDOM)
            self._scattered = np.frombuffer(mapping, dtype=np.float16).reshape(count, dim)
        return self._scattered


def source_fingerprint(emb_path: str | os.PathLike) -> str:
    """Which inputs the folder holds (store.folder_inputs), so a store built from other inputs is never served."""
    digest = hashlib.sha256()
    for name, size, mtime_ns, _ in folder_inputs(emb_path):
        digest.update(f"{name}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _live_rows(catalog: Catalog) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(paths, embeddings) chunks of the catalog's live rows (updates applied, deletions dropped), in row order.

    The shards stay memory-mapped and rows are gathered WRITE_ROWS at a time, so a collection larger
    than memory consolidates in the memory of one chunk (plus the catalog).
    """
    locations = list(catalog.rows.values())
    for start in range(0, len(locations), WRITE_ROWS):
        block = locations[start : start + WRITE_ROWS]
        shard_numbers = torch.tensor([number for number, _ in block])
        rows = torch.tensor([row for _, row in block])
        chunk = None
        for number in shard_numbers.unique().tolist():
            embeddings = catalog.loaded[number]["emb"]
            if chunk is None:
                chunk = torch.empty(len(block), embeddings.shape[1])
            elif embeddings.shape[1] != chunk.shape[1]:
                raise EncodingMismatchError(f"shard {catalog.shards[number]} has {embeddings.shape[1]}-d embeddings after "
                                            f"{chunk.shape[1]}-d ones; one folder must hold one model's embeddings")
            chosen = shard_numbers == number
            chunk[chosen] = embeddings[rows[chosen]].float()
        yield [str(catalog.loaded[number]["path"][row]) for number, row in block], chunk


def write_store(
    folder: str | os.PathLike,
    chunks: Iterable[tuple[list[str], torch.Tensor]],
    source: str,
    expected_bytes: int | None = None,
    fields: tuple[dict[str, str], dict] = ({}, {}),
) -> ConsolidatedStore:
    """Write (paths, embeddings) chunks as a store in `folder`, normalised, without holding them all.

    `fields` is (kinds, columns) of every row's fields in row order (metadata.shard_columns). Built
    in a new folder that then replaces `folder` whole (durable.atomic_folder), so a kill leaves the
    old store or none, never a part. The caller holds the store's lock. `expected_bytes` (the
    matrix's size, when known) goes into the message of a full disk.
    """
    import pyarrow as pa

    folder = Path(folder)
    kinds, columns = fields
    # A field of the shards named `path` (a table's column) gives way to the row's path, as in MetadataTable.
    columns = {name: column for name, column in columns.items() if name != PATH_FIELD}
    schema = pa.schema([(PATH_FIELD, pa.large_binary()), *((name, column.type) for name, column in columns.items())],
                       metadata={KINDS_KEY: json.dumps(kinds)})
    dims: list[int] = []

    def write_rows(rows_stream) -> None:
        # The matrix and the rows file are written side by side, chunk by chunk: neither is held whole.
        with pa.ipc.new_file(rows_stream, schema) as rows_file:
            write_durably(building / MATRIX_FILE, lambda matrix: write_chunks(matrix, rows_file), size_hint=expected_bytes)

    def write_chunks(matrix_stream, rows_file) -> None:
        written = 0
        for chunk_paths, embeddings in chunks:
            if len(chunk_paths) != embeddings.shape[0]:
                raise ValueError(f"{len(chunk_paths)} paths but {embeddings.shape[0]} embeddings")
            if dims and embeddings.shape[1] != dims[0]:
                raise ValueError(f"embeddings of {embeddings.shape[1]} dimensions after {dims[0]}; one model per folder")
            dims[:] = [int(embeddings.shape[1])]
            for start in range(0, embeddings.shape[0], WRITE_ROWS):
                rows = F.normalize(torch.as_tensor(embeddings[start : start + WRITE_ROWS]).float(), dim=-1)
                matrix_stream.write(rows.half().numpy().tobytes())
            field_slices = [column.slice(written, len(chunk_paths)) for column in columns.values()]
            rows_file.write_batch(pa.record_batch([path_bytes(chunk_paths), *field_slices], schema=schema))
            written += len(chunk_paths)

    with atomic_folder(folder) as building:
        write_durably(building / ROWS_FILE, write_rows)
        if not dims:
            raise ValueError(f"no embeddings to consolidate into {folder}")
        paths = _read_rows(building)[0]
        info = {
            "count": len(paths),
            "dim": dims[0],
            "dtype": "float16",
            "source_fingerprint": source,
            "order_fingerprint": order_fingerprint(paths, dims[0]),  # a second pass, over the mapped file
        }
        write_durably(building / INFO_FILE, json.dumps(info, indent=2) + "\n")  # last: a store without it is no store
    return _open(folder)


def _read_rows(folder: Path) -> tuple[PathColumn, dict[str, str], dict]:
    """The rows file's paths, field kinds and field columns, memory-mapped: nothing is read until used."""
    import pyarrow as pa

    with pa.memory_map(str(folder / ROWS_FILE), "r") as source:  # the table's buffers keep the mapping alive
        table = pa.ipc.open_file(source).read_all()
    kinds = json.loads((table.schema.metadata or {}).get(KINDS_KEY, b"{}"))
    columns = {name: table.column(name) for name in table.column_names if name != PATH_FIELD}
    return PathColumn(table.column(PATH_FIELD)), kinds, columns


def _open(folder: Path, matrix_only: bool = False) -> ConsolidatedStore:
    info = json.loads((folder / INFO_FILE).read_text())
    count, dim = int(info["count"]), int(info["dim"])
    # shared=False maps the file copy-on-write: nothing is read until a row is touched, and
    # nothing a caller does to the tensor can reach the file.
    embeddings = torch.from_file(str(folder / MATRIX_FILE), shared=False, size=count * dim, dtype=torch.float16)
    if matrix_only:
        return ConsolidatedStore(folder, None, embeddings.view(count, dim), info, None)
    paths, kinds, columns = _read_rows(folder)
    if len(paths) != count:
        raise ValueError(f"{folder}: {len(paths)} paths for {count} rows; delete the folder to rebuild it")
    return ConsolidatedStore(folder, paths, embeddings.view(count, dim), info, MetadataTable(paths, kinds, columns))


def store_folder(emb_path: str | os.PathLike) -> Path:
    return Path(emb_path) / STORE_DIR


def open_store(emb_path: str | os.PathLike, matrix_only: bool = False) -> ConsolidatedStore | None:
    """The folder's consolidated store if it exists and covers exactly the folder's current inputs.

    `matrix_only` opens the matrix without the paths and fields, all that an index's re-rank reads:
    a store of the layout before the rows file (its paths in paths.json) then still serves, so an
    index built on it keeps its recall; otherwise such a store counts as missing and is rebuilt.
    """
    folder = store_folder(emb_path)
    info = read_json(folder / INFO_FILE)
    if info is None or info.get("source_fingerprint") != source_fingerprint(emb_path):
        return None
    if not matrix_only and not (folder / ROWS_FILE).is_file():
        return None
    return _open(folder, matrix_only)


def consolidate(emb_path: str | os.PathLike) -> ConsolidatedStore:
    """Open the folder's store, building (or rebuilding) it first when the shards changed.

    One process builds at a time (the store's lock); another that needs it waits, then opens what
    the first built.
    """
    emb_path = Path(emb_path)
    if not list_shards(emb_path):
        raise FileNotFoundError(f"no embedding shards (*.ckpt) in {emb_path}; encode images first with 2_inference_encode.sh")
    # A build killed earlier may have left its folders and lock, even when the store it made is complete.
    remove_stale_temporaries(emb_path, STORE_DIR)
    remove_stale_locks(emb_path, STORE_DIR)
    store = open_store(emb_path)
    if store is not None:
        return store
    with FolderLock(emb_path, STORE_DIR, "building the consolidated store", wait=True):
        store = open_store(emb_path)
        if store is not None:  # built by the process this one waited for
            return store
        source = source_fingerprint(emb_path)  # before the catalog: a shard landing meanwhile makes the store stale, never hides
        catalog = read_catalog(emb_path)
        fields = shard_columns(catalog.loaded, catalog.rows.values())
        return write_store(store_folder(emb_path), _live_rows(catalog), source, fields=fields)
