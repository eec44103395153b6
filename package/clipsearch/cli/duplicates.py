"""Find near-duplicate images in an embedding folder: groups above a cosine threshold, a contact sheet per group, and a JSON report."""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from pathlib import Path

from clipsearch.cli.common import (
    DEFAULT_EMB_PATH,
    DEFAULT_OUTPUTS_DIR,
    CommandParser,
    UserError,
    positive_int,
    run_command,
)
from clipsearch.fields import CONDITION_HELP

EPILOG = """\
Examples:
  ./clipsearch duplicates --emb_path dataset/photos/emb
  ./clipsearch duplicates --emb_path dataset/photos/emb --threshold 0.9 --where "path~*/2023/*" --json
  bash 3_inference_search.sh --emb_path dataset/photos/emb --fold_duplicates outputs/duplicates/duplicates.json

Two images are near-duplicates when the cosine of their embeddings is at least --threshold; a group
joins every image linked to another by such a pair. Up to 50,000 rows every pair is compared
(exact); above that, a faiss index's range search proposes the pairs (--index_path, else the
folder's index.faiss, else a temporary IVF index built for the run) and each is scored exactly.
The first image of each group is the one to keep: the most pixels, then the largest file, then the oldest.
Writes <out_dir>/duplicates.json (every group: ids, paths, cosines) and <out_dir>/group-NNNN.png,
a contact sheet for each of the first --max_sheets groups.
Filters (--where): """ + CONDITION_HELP + "\n"
REPORT_FILE = "duplicates.json"
SHEET_PATTERN = re.compile(r"^group-\d{4,}\.png$")
# Groups listed on the terminal; the report holds them all.
SHOWN_GROUPS = 30


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="./clipsearch duplicates", description=__doc__, epilog=EPILOG)
    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default=DEFAULT_EMB_PATH, help="folder of embedding shards")
    data.add_argument("--index_path", default=None,
                      help="faiss index of the folder (./clipsearch index) for large collections (default: "
                           "<emb_path>/index.faiss when it holds these rows); load only indexes you built or trust")
    data.add_argument("--where", action="append", default=[], metavar="CONDITION",
                      help="compare only rows where FIELD OP VALUE holds; repeatable (see below)")
    method = parser.add_argument_group("method")
    method.add_argument("--threshold", default="0.95", help="the cosine at or above which two images are duplicates, in (0, 1]")
    method.add_argument("--exact", action="store_true", help="compare every pair however large the collection (N^2 work)")
    method.add_argument("--nprobe", type=positive_int, default=None,
                        help="IVF lists each row's range search probes (default 4: near-duplicates lie in the same or a "
                             "neighbouring list)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary")
    output.add_argument("--out_dir", default=os.path.join(DEFAULT_OUTPUTS_DIR, "duplicates"),
                        help="folder for duplicates.json and the contact sheets")
    output.add_argument("--max_sheets", type=int, default=50, help="contact sheets for this many groups, largest first (0: none)")
    output.add_argument("--thumb_size", type=positive_int, default=160, help="thumbnail size in the sheets, pixels")
    output.add_argument("--columns", type=positive_int, default=6, help="thumbnails per sheet row")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """Flags and paths, before torch loads: each problem is one line."""
    from clipsearch.fields import parse_conditions

    try:
        args.threshold = float(args.threshold)
    except ValueError:
        raise UserError(f"--threshold {args.threshold!r}: expected a cosine in (0, 1]") from None
    if not (math.isfinite(args.threshold) and 0 < args.threshold <= 1):
        raise UserError(f"--threshold {args.threshold:g}: expected a cosine in (0, 1]")
    if args.max_sheets < 0:
        raise UserError(f"--max_sheets {args.max_sheets}: expected 0 or more")
    if not os.path.isdir(args.emb_path):
        raise UserError(f"--emb_path {args.emb_path}: no such folder (make it with 2_inference_encode.sh)")
    if args.index_path is not None and not os.path.exists(args.index_path):
        raise UserError(f"--index_path {args.index_path}: no such file (build it with ./clipsearch index)")
    args.where = list(parse_conditions(args.where))


def choose_index(args: argparse.Namespace, collection):
    """The index a large collection's pairs come from: --index_path, the folder's own when it holds these
    rows, else one built for this run."""
    from clipsearch.index import build_index, load_index, resolve_index_path
    from clipsearch.near_duplicates import DUPLICATE_NPROBE

    fingerprint = collection.order_fingerprint
    candidates = [args.index_path] if args.index_path else []
    own = resolve_index_path(args.emb_path)
    if not candidates and own.is_file():
        candidates.append(str(own))
    for path in candidates:
        index = load_index(path)
        if index.order_fingerprint == fingerprint:
            return index
        if args.index_path:
            raise UserError(f"--index_path {args.index_path} was built on other rows than {args.emb_path} holds; "
                            f"rebuild it with ./clipsearch index --emb_path {args.emb_path}")
    print(f"building a temporary IVF index over {len(collection.paths):,} rows for this run (./clipsearch index "
          "builds one to keep)", file=sys.stderr)
    return build_index(collection.embeddings, fingerprint, kind="ivf_sq8", recall_queries=0,
                       nprobe=args.nprobe or DUPLICATE_NPROBE)


def keep_first(fields):
    """Sorts a group with the copy to keep first: the most pixels, then the largest file, then the oldest
    (a copy is newer than its original), then the first row."""
    def order(rows: list[int]) -> list[int]:
        def key(row: int):
            values = fields.row(row)
            pixels = (values.get("width") or 0) * (values.get("height") or 0)
            return (-pixels, -(values.get("size") or 0), values.get("mtime") or "~", row)

        return sorted(rows, key=key)

    return order


def write_sheets(report, paths: list[str], fields, args: argparse.Namespace, out_dir: Path) -> dict[int, str]:
    """A contact sheet per group, for the first --max_sheets groups; {group number: file}."""
    from clipsearch.durable import atomic_write
    from clipsearch.grid import make_grid
    from clipsearch.images import display_path

    sheets = {}
    for number, group in enumerate(report.groups[: args.max_sheets], start=1):
        labels = []
        for place, row in enumerate(group.rows):
            values = fields.row(row)
            size = f" {values['width']}x{values['height']}" if values.get("width") and values.get("height") else ""
            labels.append(f"{'keep' if place == 0 else 'copy'}{size} {display_path(Path(paths[row]).name)}")
        title = f"group {number}: {len(group.rows)} images, cosine {group.min_cosine:.3f}-{group.max_cosine:.3f}"
        sheet = make_grid([paths[row] for row in group.rows], labels, title=title, thumb_size=args.thumb_size,
                          columns=args.columns)
        encoded = io.BytesIO()
        sheet.save(encoded, format="PNG")
        sheets[number] = str(atomic_write(out_dir / f"group-{number:04d}.png", encoded.getbuffer()))
    return sheets


def remove_earlier_sheets(out_dir: Path, keep: set[str]) -> None:
    """Delete the sheets an earlier run listed in its report and this run did not write again: only files
    this command made, named as it names them."""
    try:
        earlier = json.loads((out_dir / REPORT_FILE).read_text())
        listed = [group.get("sheet") for group in earlier.get("groups", [])]
    except (OSError, ValueError, AttributeError):
        return
    for sheet in listed:
        if isinstance(sheet, str) and sheet not in keep and SHEET_PATTERN.match(Path(sheet).name) \
                and Path(sheet).parent.resolve() == out_dir.resolve():
            Path(sheet).unlink(missing_ok=True)


def summary(record: dict) -> str:
    lines = [
        f"{record['group_count']} groups of near-duplicates ({record['images_in_groups']} images) at cosine >= "
        f"{record['threshold']:g} among {record['rows']:,} rows ({record['method']}, {record['seconds']:.1f} s)"
    ]
    for group in record["groups"][:SHOWN_GROUPS]:
        sheet = f"  sheet: {group['sheet']}" if group.get("sheet") else ""
        lines.append(f"group {group['group']}: {group['size']} images, cosine {group['min_cosine']:.3f}-"
                     f"{group['max_cosine']:.3f}{sheet}")
        lines += [f"  {'keep' if place == 0 else '    '}  {path}" for place, path in enumerate(group["paths"])]
    if record["group_count"] > SHOWN_GROUPS:
        lines.append(f"... {record['group_count'] - SHOWN_GROUPS} more groups in the report")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(args)
    from clipsearch.durable import atomic_write
    from clipsearch.near_duplicates import DUPLICATE_NPROBE, EXACT_MAX_ROWS, find_duplicates, report_json
    from clipsearch.store import StoreError, load_collection

    try:
        collection = load_collection(args.emb_path)
    except (StoreError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    allowed = collection.fields.select(args.where)
    rows = None if allowed is None else allowed.rows.numpy()
    count = len(collection.paths) if rows is None else len(rows)
    index = None
    if not args.exact and count > EXACT_MAX_ROWS:
        index = choose_index(args, collection)
    report = find_duplicates(collection.embeddings, args.threshold, rows, index, exact=args.exact or None,
                             nprobe=args.nprobe or DUPLICATE_NPROBE, keep_order=keep_first(collection.fields))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheets = write_sheets(report, collection.paths, collection.fields, args, out_dir)
    remove_earlier_sheets(out_dir, set(sheets.values()))
    extra = {"emb_path": os.path.abspath(args.emb_path), "where": [str(condition) for condition in args.where]}
    record = report_json(report, collection.paths, collection.order_fingerprint, extra, sheets)
    report_path = atomic_write(out_dir / REPORT_FILE, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(summary(record))
        print(f"report: {report_path}")
    return record


if __name__ == "__main__":
    run_command(main)
