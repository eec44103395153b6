"""Dataset folders: finding a split's table, reading it as (image, caption) rows, telling shards apart.

Imports nothing heavy at module level (pandas is loaded by `read_table`), so commands can check
a dataset folder before loading torch.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from clipsearch.data_report import DataReport

logger = logging.getLogger(__name__)

TABLE_EXTENSIONS = (".tsv", ".csv", ".parquet")
SHARD_SUFFIX = ".tar"
IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
# The flag that names each column, for messages (every command with a table takes them).
COLUMN_FLAGS = {"image": "--image_column", "caption": "--caption_column"}


class TableColumnsError(UserError, ValueError):
    """A table without the columns asked for: one line naming those it has and the flags to choose."""


def table_columns(table_path: str | os.PathLike) -> list[str]:
    """A table's column names, read from its header alone (no pandas), so commands check them at once."""
    path = Path(table_path)
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return list(pyarrow.parquet.read_schema(path).names)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as file:
        header = next(csv.reader(file, delimiter="\t" if path.suffix == ".tsv" else ","), [])
    return [name.strip() for name in header]


def check_columns(table_path: str | os.PathLike, found: list[str], image_column: str,
                  caption_column: str | None) -> None:
    """Raise TableColumnsError unless `found` holds the image column (and the caption column, if asked)."""
    wanted = {"image": image_column} if caption_column is None else {"image": image_column, "caption": caption_column}
    missing = {role: name for role, name in wanted.items() if name not in found}
    if not missing:
        return
    named = ", ".join(f"{role} column {name!r}" for role, name in missing.items())
    flags = " and ".join(f"{COLUMN_FLAGS[role]} <name>" for role in missing)
    raise TableColumnsError(
        f"{table_path} has no {named}; its columns are {', '.join(found) or '(none)'}: name yours with {flags}"
    )


def is_webdataset_path(path: str | os.PathLike) -> bool:
    """True for a .tar file, a brace pattern or '::' list of them, or a folder holding .tar files."""
    text = str(path)
    if text.endswith(SHARD_SUFFIX):
        return True
    if "::" in text:
        return all(is_webdataset_path(part) for part in text.split("::") if part)
    folder = Path(text)
    return folder.is_dir() and any(child.suffix == SHARD_SUFFIX for child in folder.iterdir())


def find_table(dataset_path: str | os.PathLike, split: str) -> Path:
    """The first of `<split>.tsv`, `.csv`, `.parquet` that exists in the dataset folder."""
    candidates = [Path(dataset_path) / f"{split}{extension}" for extension in TABLE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(f"no table for split {split!r}; tried {tried}")


# Splits encoded when --split is left to "auto" and the dataset folder has tables: every image
# that a user could look for, so search covers the whole collection.
AUTO_SPLITS = ("train", "dev", "test")
FOLDER_SPLIT = "folder"


def tables_present(dataset_path: str | os.PathLike, splits: Sequence[str] = AUTO_SPLITS) -> list[str]:
    present = []
    for split in splits:
        try:
            find_table(dataset_path, split)
        except FileNotFoundError:
            continue
        present.append(split)
    return present


def encoding_splits(dataset_path: str | os.PathLike, split: str) -> list[str]:
    """The tables an encoding of `dataset_path` reads; none means a scan of the folder for images.

    `split` is "auto" (the tables among train/dev/test that exist), "folder" (none, whatever
    tables exist), or comma-separated split names.
    """
    if split == FOLDER_SPLIT:
        return []
    if split == "auto":
        return tables_present(dataset_path)
    return [name.strip() for name in split.split(",") if name.strip()]


def _as_text(value: object) -> str:
    """A table cell as a stripped string; missing values become the empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing markers, named to leave pandas unloaded
        return ""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="surrogateescape")
    return str(value).strip()


def _has_undecodable_bytes(text: str) -> bool:
    """True when surrogateescape kept bytes that were not UTF-8 (as U+DC80..U+DCFF)."""
    return any("\udc80" <= character <= "\udcff" for character in text)


def read_table(
    dataset_path: str | os.PathLike,
    split: str,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    report: DataReport | None = None,
    require_caption: bool = True,
    other_columns: bool = False,
) -> pd.DataFrame:
    """Read a split's table as columns `image` (absolute path) and `caption` (stripped text), and with
    `other_columns` every other column of the table too, as read (a row set aside as malformed has none).

    Cells are text as written: "NA", "NaN", "null" or "N/A" are captions, not missing values.
    Bytes that are not UTF-8 are kept (surrogateescape), so such a file name still opens on
    Linux. Rows without an image path are dropped; so are rows with an empty or non-UTF-8
    caption and malformed rows (too many fields) unless `require_caption` is False (encoding
    needs only the image: such rows keep it, with caption ""). Every drop is logged and counted
    in `report`; missing image files are left for `load_image` to find.
    """
    import pandas as pd

    table_path = find_table(dataset_path, split)
    malformed_rows: list[list[str]] = []
    if table_path.suffix == ".parquet":
        frame = pd.read_parquet(table_path)
    else:
        def keep_aside(fields: list[str]) -> None:
            malformed_rows.append(fields)
            return None

        # One bad row must not fail the whole read: undecodable bytes are kept as surrogates and
        # rows with extra fields set aside. QUOTE_NONE keeps quotes inside TSV captions verbatim;
        # na_filter=False keeps "NA", "NaN" and "null" as the text they are.
        frame = pd.read_csv(
            table_path,
            sep="\t" if table_path.suffix == ".tsv" else ",",
            quoting=csv.QUOTE_NONE if table_path.suffix == ".tsv" else csv.QUOTE_MINIMAL,
            dtype=object,  # Arrow-backed strings cannot hold the surrogates of non-UTF-8 bytes
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            encoding_errors="surrogateescape",
            on_bad_lines=keep_aside,
            engine="python",
        )

    check_columns(table_path, [str(column) for column in frame.columns], image_column,
                  caption_column if require_caption else None)

    images = [_as_text(value) for value in frame[image_column]]
    captions = ([_as_text(value) for value in frame[caption_column]] if caption_column in frame.columns
                else [""] * len(images))
    drop_reasons: Counter[str] = Counter()
    if require_caption:
        if malformed_rows:
            drop_reasons["malformed row"] = len(malformed_rows)
    else:
        image_field = list(frame.columns).index(image_column)
        for fields in malformed_rows:
            images.append(_as_text(fields[image_field]) if image_field < len(fields) else "")
            captions.append("")
    dataset_dir = os.path.abspath(dataset_path)
    kept_images, kept_captions, kept_rows = [], [], []
    for row, (image, caption) in enumerate(zip(images, captions)):
        if not image:
            drop_reasons["empty image path"] += 1
        elif require_caption and _has_undecodable_bytes(caption):
            drop_reasons["non-utf8 caption"] += 1
        elif require_caption and not caption:
            drop_reasons["empty caption"] += 1
        else:
            kept_images.append(os.path.join(dataset_dir, os.path.expanduser(image)))
            kept_captions.append(caption)
            kept_rows.append(row)

    for reason, count in drop_reasons.items():
        if report is not None:
            report.add(reason, table_path, count=count)
        else:
            logger.warning("skipped, %s (%d rows): %s", reason, count, table_path)
    kept = {"image": kept_images, "caption": kept_captions}
    if other_columns:
        for column in frame.columns:
            if column not in (image_column, caption_column):
                values = list(frame[column])
                kept[str(column)] = [values[row] if row < len(values) else None for row in kept_rows]
    return pd.DataFrame(kept, dtype=object)


