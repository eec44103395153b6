"""Export an embedding folder to clip-retrieval's layout: `python -m clipsearch.cli.export_clip_retrieval --emb_path <folder> --out <dir>`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from clipsearch.cli.common import (
    DEFAULT_EMB_PATH,
    CommandParser,
    UserError,
    positive_int,
    recorded_dataset,
    run_command,
)
from clipsearch.cli.index import check_emb_path, consolidated_store

EPILOG = """\
Writes <out>/img_emb/img_emb_N.npy (fp16, unit-length rows) and <out>/metadata/metadata_N.parquet
(column image_path, then the rows' fields: caption, url and the tables' other columns, size, mtime,
taken, width, height), row for row in the collection's order, and <out>/clipsearch-export.json last.
--out must be a new or empty folder, or an earlier export of this command, which is replaced whole
(a folder holding anything else is refused, as is one inside or around the embedding or image
folder). Then, for example:
  autofaiss build_index --embeddings <out>/img_emb --index_path knn.index --index_infos_path infos.json
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="python -m clipsearch.cli.export_clip_retrieval", description=__doc__, epilog=EPILOG)
    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default=DEFAULT_EMB_PATH, help="folder of embedding shards to export")
    data.add_argument("--out", required=True,
                      help="folder to write: new, empty, or an earlier export of this command (replaced whole)")
    data.add_argument("--rows_per_file", type=positive_int, default=1_000_000, help="rows in each .npy/.parquet pair")
    args = parser.parse_args(argv)
    check_emb_path(args.emb_path)
    check_out(args.out, args.emb_path)
    return args


def overlaps(one: Path, other: Path) -> bool:
    return one == other or one.is_relative_to(other) or other.is_relative_to(one)


def check_out(out: str, emb_path: str) -> None:
    """Refuse an --out whose replacement could take anything but an earlier export with it."""
    from clipsearch.clip_retrieval_export import check_replaceable

    out_path = Path(out).resolve()
    folders = {"--emb_path": emb_path}
    dataset = recorded_dataset(emb_path)
    if dataset is not None:
        folders["the image folder the embeddings were encoded from"] = dataset
    for name, folder in folders.items():
        if overlaps(out_path, Path(folder).resolve()):
            raise UserError(f"--out {out} overlaps {name} ({folder}); give a folder outside it")
    check_replaceable(out)


def check_images_outside(out: str, image_paths: list[str]) -> None:
    """Refuse an --out that holds collection images, or lies in a folder that does."""
    out_path = Path(out).resolve()
    spellings = {str(out_path), os.path.abspath(out)}
    image_folders = {os.path.dirname(os.path.abspath(path)) for path in image_paths}
    for spelling in spellings:
        ancestors = {spelling, *map(str, Path(spelling).parents)}
        inside = next((path for path in image_paths if os.path.abspath(path).startswith(spelling + os.sep)), None)
        if inside is not None or ancestors & image_folders:
            example = inside or sorted(ancestors & image_folders)[0]
            raise UserError(f"--out {out} overlaps the images it would export ({example}); give a folder outside them")


def main(argv: list[str]):
    args = parse_args(argv)
    from clipsearch.clip_retrieval_export import export_clip_retrieval

    store = consolidated_store(args.emb_path)
    check_images_outside(args.out, store.paths)
    files = export_clip_retrieval(store.paths, store.embeddings.numpy(), args.out, args.rows_per_file, store.fields)
    print(f"wrote {len(store):,} rows in {len(files)} file(s) to {args.out}")
    return files


if __name__ == "__main__":
    run_command(main)
