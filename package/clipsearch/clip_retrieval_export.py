"""The collection in clip-retrieval's layout (img_emb/img_emb_N.npy + metadata/metadata_N.parquet), for autofaiss and clip-retrieval's back end."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from clipsearch.durable import FolderLock, atomic_folder, write_durably
from clipsearch.errors import UserError

EMBEDDING_DIR = "img_emb"
METADATA_DIR = "metadata"
# clip-retrieval's inference writer names the image column so; its back end returns it as the result.
PATH_COLUMN = "image_path"
ROWS_PER_FILE = 1_000_000
# Written last into every export: a folder holding it (and nothing else but the export's files)
# is one this command made, and only such a folder is ever replaced.
MARKER_FILE = "clipsearch-export.json"
EXPORT_FILES = {
    EMBEDDING_DIR: re.compile(r"^img_emb_\d+\.npy$"),
    METADATA_DIR: re.compile(r"^metadata_\d+\.parquet$"),
}


class ExportRefusedError(UserError, ValueError):
    """--out names a folder the export must not replace."""


def foreign_entry(out_dir: Path) -> str | None:
    """The first thing in `out_dir` that an export did not write, or None when it is all an export's."""
    if not (out_dir / MARKER_FILE).is_file():
        return "no " + MARKER_FILE
    for entry in sorted(out_dir.iterdir()):
        if entry.name == MARKER_FILE:
            continue
        pattern = EXPORT_FILES.get(entry.name)
        if pattern is None or not entry.is_dir() or entry.is_symlink():
            return entry.name
        for inner in sorted(entry.iterdir()):
            if not pattern.match(inner.name) or not inner.is_file() or inner.is_symlink():
                return f"{entry.name}/{inner.name}"
    return None


def check_replaceable(out_dir: str | os.PathLike) -> None:
    """Refuse an `out_dir` that exists and is not a complete earlier export: it would be deleted."""
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ExportRefusedError(f"--out {out_dir} exists and is not a folder; give a new folder")
    if not any(out_dir.iterdir()):
        return
    foreign = foreign_entry(out_dir)
    if foreign is not None:
        raise ExportRefusedError(
            f"--out {out_dir} holds files this export did not write ({foreign}); it replaces only an earlier "
            "export of its own. Give a new or empty folder"
        )


def export_clip_retrieval(
    paths: list[str], embeddings, out_dir: str | os.PathLike, rows_per_file: int = ROWS_PER_FILE, fields=None
) -> list[Path]:
    """Write rows [count, dim] (unit length, any float array) as numbered fp16 .npy files with one parquet of paths
    each, and of the rows' fields (`fields`, a metadata.MetadataTable in the same row order: caption, url, ...).

    File numbers are zero-padded to the same width, as clip-retrieval pads them: autofaiss reads
    the files in lexicographic order, so row i of the export is row i of the collection. The
    export is built in a new folder beside `out_dir` and renamed into place; an existing `out_dir`
    is replaced only when it is an earlier export (its marker file, nothing else), under a lock.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(paths) != embeddings.shape[0]:
        raise ValueError(f"{len(paths)} paths but {embeddings.shape[0]} embeddings")
    if fields is not None and len(fields) != len(paths):
        raise ValueError(f"{len(paths)} paths but fields for {len(fields)} rows")
    field_table = fields.to_arrow() if fields is not None else None
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir.parent, out_dir.name, "an export"):
        check_replaceable(out_dir)  # again under the lock: the folder may have changed since the command's check
        with atomic_folder(out_dir) as building:
            (building / EMBEDDING_DIR).mkdir()
            (building / METADATA_DIR).mkdir()
            starts = range(0, len(paths), rows_per_file)
            width = len(str(max(0, len(starts) - 1)))
            for number, start in enumerate(starts):
                suffix = str(number).zfill(width)
                rows = np.asarray(embeddings[start : start + rows_per_file], dtype=np.float16)
                write_durably(building / EMBEDDING_DIR / f"img_emb_{suffix}.npy", lambda stream, rows=rows: np.save(stream, rows),
                              size_hint=rows.nbytes + 128)
                columns = {PATH_COLUMN: pa.array(paths[start : start + rows_per_file], type=pa.string())}
                if field_table is not None:  # clip-retrieval's back end returns these beside the path
                    part = field_table.slice(start, rows_per_file)
                    columns.update((name, part[name]) for name in part.column_names if name != PATH_COLUMN)
                table = pa.table(columns)
                write_durably(building / METADATA_DIR / f"metadata_{suffix}.parquet",
                              lambda stream, table=table: pq.write_table(table, stream))
            marker = {"format": "clip-retrieval", "rows": len(paths), "dim": int(embeddings.shape[1]),
                      "files": len(starts)}
            write_durably(building / MARKER_FILE, json.dumps(marker, indent=2) + "\n")
    return sorted((out_dir / EMBEDDING_DIR).iterdir())
