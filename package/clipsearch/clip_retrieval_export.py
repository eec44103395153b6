"""The collection in clip-retrieval's layout (img_emb/img_emb_N.npy + metadata/metadata_N.parquet), for autofaiss and clip-retrieval's back end."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

EMBEDDING_DIR = "img_emb"
METADATA_DIR = "metadata"
# clip-retrieval's inference writer names the image column so; its back end returns it as the result.
PATH_COLUMN = "image_path"
ROWS_PER_FILE = 1_000_000


def export_clip_retrieval(
    paths: list[str], embeddings, out_dir: str | os.PathLike, rows_per_file: int = ROWS_PER_FILE
) -> list[Path]:
    """Write rows [count, dim] (unit length, any float array) as numbered fp16 .npy files with one parquet of paths each.

    File numbers are zero-padded to the same width, as clip-retrieval pads them: autofaiss reads
    the files in lexicographic order, so row i of the export is row i of the collection.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(paths) != embeddings.shape[0]:
        raise ValueError(f"{len(paths)} paths but {embeddings.shape[0]} embeddings")
    out_dir = Path(out_dir)
    temporary = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    (temporary / EMBEDDING_DIR).mkdir(parents=True)
    (temporary / METADATA_DIR).mkdir()
    starts = range(0, len(paths), rows_per_file)
    width = len(str(max(0, len(starts) - 1)))
    for number, start in enumerate(starts):
        suffix = str(number).zfill(width)
        rows = np.asarray(embeddings[start : start + rows_per_file], dtype=np.float16)
        np.save(temporary / EMBEDDING_DIR / f"img_emb_{suffix}.npy", rows)
        table = pa.table({PATH_COLUMN: pa.array(paths[start : start + rows_per_file], type=pa.string())})
        pq.write_table(table, temporary / METADATA_DIR / f"metadata_{suffix}.parquet")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(temporary, out_dir)
    return sorted((out_dir / EMBEDDING_DIR).iterdir())
