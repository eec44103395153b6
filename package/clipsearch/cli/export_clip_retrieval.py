"""Export an embedding folder to clip-retrieval's layout: `python -m clipsearch.cli.export_clip_retrieval --emb_path <folder> --out <dir>`."""
from __future__ import annotations

import argparse
from pathlib import Path

from clipsearch.cli.common import DEFAULT_EMB_PATH, CommandParser, UserError, positive_int, run_command
from clipsearch.cli.index import check_emb_path, consolidated_store

EPILOG = """\
Writes <out>/img_emb/img_emb_N.npy (fp16, unit-length rows) and <out>/metadata/metadata_N.parquet
(column image_path), row for row in the collection's order. Then, for example:
  autofaiss build_index --embeddings <out>/img_emb --index_path knn.index --index_infos_path infos.json
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="python -m clipsearch.cli.export_clip_retrieval", description=__doc__, epilog=EPILOG)
    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default=DEFAULT_EMB_PATH, help="folder of embedding shards to export")
    data.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    data.add_argument("--rows_per_file", type=positive_int, default=1_000_000, help="rows in each .npy/.parquet pair")
    args = parser.parse_args(argv)
    check_emb_path(args.emb_path)
    if Path(args.out).resolve() == Path(args.emb_path).resolve():
        raise UserError("--out must be another folder than --emb_path: the export replaces it")
    return args


def main(argv: list[str]):
    args = parse_args(argv)
    from clipsearch.clip_retrieval_export import export_clip_retrieval

    store = consolidated_store(args.emb_path)
    files = export_clip_retrieval(store.paths, store.embeddings.numpy(), args.out, args.rows_per_file)
    print(f"wrote {len(store):,} rows in {len(files)} file(s) to {args.out}")
    return files


if __name__ == "__main__":
    run_command(main)
