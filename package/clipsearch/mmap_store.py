"""One consolidated fp16 matrix beside the shards, memory-mapped, so exact search and the index never read the collection into memory first."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipsearch.store import (
    EncodingMismatchError,
    list_shards,
    order_fingerprint,
    read_catalog,
    read_json,
    write_json,
)

STORE_DIR = "consolidated"
MATRIX_FILE = "embeddings.f16"
PATHS_FILE = "paths.json"
INFO_FILE = "store.json"
# Rows normalised and written at a time: 64 MB of fp32 at 512-d, whatever the collection's size.
WRITE_ROWS = 32_768


@dataclass
class ConsolidatedStore:
    """A collection's live rows as one read-only, memory-mapped [count, dim] fp16 matrix, and its paths."""

    folder: Path
    paths: list[str]
    embeddings: torch.Tensor  # unit-length rows, fp16, backed by the file: pages load on first touch
    info: dict

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def order_fingerprint(self) -> str:
        return self.info["order_fingerprint"]

    def rows(self, row_ids: np.ndarray) -> np.ndarray:
        """fp16 rows for `row_ids` (any shape), read from the file; only their pages are touched."""
        return self.embeddings.numpy()[row_ids]


def source_fingerprint(emb_path: str | os.PathLike) -> str:
    """Which inputs the folder holds: name, size and mtime of every shard and JSON record.

    Adding, replacing or deleting a shard, or a new manifest (which records deleted images), changes
    it, so a store built from other inputs is never served. An index's record (X.json beside
    X.faiss) is an output, not an input.
    """
    emb_path = Path(emb_path)
    digest = hashlib.sha256()
    records = [path for path in sorted(emb_path.glob("*.json")) if not path.with_suffix(".faiss").exists()]
    for path in [*list_shards(emb_path), *records]:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _live_rows(emb_path: Path) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(paths, embeddings) chunks of the collection's live rows (updates applied, deletions dropped), in row order.

    The shards stay memory-mapped and rows are gathered WRITE_ROWS at a time, so a collection larger
    than memory consolidates in the memory of one chunk (plus the catalog of paths).
    """
    catalog = read_catalog(emb_path)
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


def write_store(folder: str | os.PathLike, chunks: Iterable[tuple[list[str], torch.Tensor]], source: str) -> ConsolidatedStore:
    """Write (paths, embeddings) chunks as a store in `folder`, normalised, without holding them all.

    Written into a temporary folder and renamed, so a kill leaves the old store or none.
    """
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    paths: list[str] = []
    dim = None
    with open(temporary / MATRIX_FILE, "wb") as matrix:
        for chunk_paths, embeddings in chunks:
            if len(chunk_paths) != embeddings.shape[0]:
                raise ValueError(f"{len(chunk_paths)} paths but {embeddings.shape[0]} embeddings")
            if dim is None:
                dim = int(embeddings.shape[1])
            elif embeddings.shape[1] != dim:
                raise ValueError(f"embeddings of {embeddings.shape[1]} dimensions after {dim}; one model per folder")
            for start in range(0, embeddings.shape[0], WRITE_ROWS):
                rows = F.normalize(torch.as_tensor(embeddings[start : start + WRITE_ROWS]).float(), dim=-1)
                matrix.write(rows.half().numpy().tobytes())
            paths.extend(chunk_paths)
    if dim is None:
        raise ValueError(f"no embeddings to consolidate into {folder}")
    (temporary / PATHS_FILE).write_text(json.dumps(paths))
    info = {
        "count": len(paths),
        "dim": dim,
        "dtype": "float16",
        "source_fingerprint": source,
        "order_fingerprint": order_fingerprint(paths, dim),
    }
    write_json(temporary / INFO_FILE, info)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)
    return _open(folder)


def _open(folder: Path) -> ConsolidatedStore:
    info = json.loads((folder / INFO_FILE).read_text())
    count, dim = int(info["count"]), int(info["dim"])
    # shared=False maps the file copy-on-write: nothing is read until a row is touched, and
    # nothing a caller does to the tensor can reach the file.
    embeddings = torch.from_file(str(folder / MATRIX_FILE), shared=False, size=count * dim, dtype=torch.float16)
    paths = json.loads((folder / PATHS_FILE).read_text())
    if len(paths) != count:
        raise ValueError(f"{folder}: {len(paths)} paths for {count} rows; delete the folder to rebuild it")
    return ConsolidatedStore(folder, paths, embeddings.view(count, dim), info)


def store_folder(emb_path: str | os.PathLike) -> Path:
    return Path(emb_path) / STORE_DIR


def open_store(emb_path: str | os.PathLike) -> ConsolidatedStore | None:
    """The folder's consolidated store if it exists and covers exactly the folder's current inputs."""
    folder = store_folder(emb_path)
    info = read_json(folder / INFO_FILE)
    if info is None or info.get("source_fingerprint") != source_fingerprint(emb_path):
        return None
    return _open(folder)


def consolidate(emb_path: str | os.PathLike) -> ConsolidatedStore:
    """Open the folder's store, building (or rebuilding) it first when the shards changed."""
    emb_path = Path(emb_path)
    if not list_shards(emb_path):
        raise FileNotFoundError(f"no embedding shards (*.ckpt) in {emb_path}; encode images first with 2_inference_encode.sh")
    return open_store(emb_path) or write_store(store_folder(emb_path), _live_rows(emb_path), source_fingerprint(emb_path))
