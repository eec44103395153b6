"""OpenAI's YFCC100M subset: URL lists for img2dataset, then train/dev tables from what it downloaded."""
from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import html
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_plus

logger = logging.getLogger("yfcc100m.prepare")

# Columns of the YFCC100M metadata file `yfcc100m_dataset` (tab-separated, no header). The
# Multimedia Commons release has 25; OpenAI's subset names its first three (line number, photo
# id, photo hash). The original 2014 release lacks those two extra columns, so has 23.
COLUMNS_25 = {"photoid": 1, "title": 8, "description": 9, "download_url": 16, "marker": 24}
COLUMNS_23 = {"photoid": 0, "title": 6, "description": 7, "download_url": 14, "marker": 22}
CAPTION_SOURCES = ("title_and_description", "title", "description")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_DEV_FRACTION = 0.0005

HTML_TAG = re.compile(r"<[^>]*>")
BARE_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
WHITESPACE = re.compile(r"\s+")
# A camera's default file name says nothing about the picture, e.g. "IMG_0520" or "DSC01234.JPG".
CAMERA_FILE_NAME = re.compile(
    r"^(?:img|dsc|dscn|dscf|dcp|pict|cimg|imgp|sam|gopr|p)?[\s_-]*\d+(?:\.(?:jpe?g|png|tiff?))?$", re.IGNORECASE
)
SENTENCE_END = (".", "!", "?", "…")


def clean_text(raw: str) -> str:
    """Plain text from a YFCC title or description field.

    The metadata stores them URL-encoded with `+` for spaces; descriptions hold HTML markup and
    entities. Bare links left after removing tags are dropped too: they are not captions.
    """
    text = unquote_plus(raw)
    # Tags go before entities are decoded, so an escaped "&lt;3" survives as the text "<3".
    text = HTML_TAG.sub(" ", text)
    text = html.unescape(text)
    text = BARE_URL.sub(" ", text)
    return WHITESPACE.sub(" ", text).strip()


def make_caption(title: str, description: str, source: str = "title_and_description") -> str:
    """The caption from cleaned title and description; empty when the chosen fields are."""
    if CAMERA_FILE_NAME.match(title):
        title = ""
    if source == "title":
        return title
    if source == "description":
        return description
    if not title or title.lower() in description.lower():
        return description
    if not description or description.lower() in title.lower():
        return title
    separator = " " if title.endswith(SENTENCE_END) else ". "
    return f"{title}{separator}{description}"


def split_of(identifier: str, dev_fraction: float = DEFAULT_DEV_FRACTION) -> str:
    """'dev' or 'train' from a hash of the photo id: the same on every machine and every rerun."""
    bucket = int.from_bytes(hashlib.sha256(str(identifier).strip().encode()).digest()[:8], "big")
    return "dev" if bucket < dev_fraction * 2**64 else "train"


def open_text(path: str | os.PathLike):
    """Plain or .bz2 text (the downloads come bz2-compressed), undecodable bytes replaced."""
    if str(path).endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", errors="replace", newline="\n")
    return open(path, encoding="utf-8", errors="replace", newline="\n")


def read_subset_ids(path: str | os.PathLike) -> set[str]:
    """Photo ids of OpenAI's subset: rows of (line number, photo id, photo hash), tab or comma separated."""
    photo_ids = set()
    with open_text(path) as lines:
        for line in lines:
            fields = re.split(r"[\t,]", line.strip())
            # A header row, if some copy has one, has no numeric photo id.
            if len(fields) >= 2 and fields[1].strip().isdigit():
                photo_ids.add(fields[1].strip())
    return photo_ids


def iter_metadata(paths: list[str]) -> Iterator[list[str]]:
    for path in paths:
        with open_text(path) as lines:
            for line in lines:
                yield line.rstrip("\n").split("\t")


def build_url_lists(
    subset_path: str | os.PathLike,
    metadata_paths: list[str],
    out: str | os.PathLike,
    caption_source: str = "title_and_description",
    dev_fraction: float = DEFAULT_DEV_FRACTION,
) -> Counter:
    """Join the subset with the metadata into `train_urls.tsv` and `dev_urls.tsv` (url, caption, photoid)."""
    subset_ids = read_subset_ids(subset_path)
    logger.info("%d photo ids in the subset", len(subset_ids))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    files = {split: open(out / f"{split}_urls.tsv", "w", encoding="utf-8", newline="") for split in ("train", "dev")}
    try:
        # Standard CSV quoting, which img2dataset's reader (pyarrow) undoes, keeps quotes in captions.
        writers = {split: csv.writer(file, delimiter="\t", lineterminator="\n") for split, file in files.items()}
        for writer in writers.values():
            writer.writerow(["url", "caption", "photoid"])
        for fields in iter_metadata(metadata_paths):
            columns = COLUMNS_25 if len(fields) >= 25 else COLUMNS_23 if len(fields) >= 23 else None
            if columns is None:
                counts["malformed metadata lines"] += 1
                continue
            photo_id = fields[columns["photoid"]].strip()
            if photo_id not in subset_ids:
                continue
            counts["in subset"] += 1
            if fields[columns["marker"]].strip() == "1":
                counts["videos"] += 1
                continue
            url = fields[columns["download_url"]].strip()
            caption = make_caption(
                clean_text(fields[columns["title"]]), clean_text(fields[columns["description"]]), caption_source
            )
            if not url or not caption:
                counts["no url" if not url else "empty caption"] += 1
                continue
            split = split_of(photo_id, dev_fraction)
            writers[split].writerow([url, caption, photo_id])
            counts[split] += 1
    finally:
        for file in files.values():
            file.close()
    counts["subset ids not in metadata"] = len(subset_ids) - counts["in subset"]
    return counts


def image_files(folder: Path) -> Iterator[Path]:
    for directory, _, file_names in os.walk(folder):
        for file_name in sorted(file_names):
            if file_name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(directory) / file_name


def build_tables(
    downloaded: list[str], out: str | os.PathLike, dev_fraction: float = DEFAULT_DEV_FRACTION
) -> Counter:
    """train.tsv/dev.tsv from img2dataset `files` output: `<key>.jpg` + `<key>.txt` (+ `<key>.json`).

    The split comes from the photo id that img2dataset saved in `<key>.json` (with
    `--save_additional_columns '["photoid"]'`), hashed as in `build_url_lists`, so it agrees
    with the URL lists; without one, the sample's URL is hashed instead.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    rows = {"train": [], "dev": []}
    for folder in downloaded:
        for image_path in image_files(Path(folder).resolve()):
            caption_path = image_path.with_suffix(".txt")
            caption = ""
            if caption_path.is_file():
                caption = caption_path.read_text(encoding="utf-8", errors="replace")
            meta = {}
            if image_path.with_suffix(".json").is_file():
                try:
                    meta = json.loads(image_path.with_suffix(".json").read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    counts["unreadable json"] += 1
            caption = WHITESPACE.sub(" ", caption or str(meta.get("caption") or "")).strip()
            if not caption:
                counts["no caption"] += 1
                continue
            identifier = str(meta.get("photoid") or meta.get("url") or image_path.stem)
            split = split_of(identifier, dev_fraction)
            # Relative paths keep a dataset that holds its images movable; others stay absolute.
            relative = os.path.relpath(image_path, out)
            rows[split].append((image_path.as_posix() if relative.startswith("..") else relative, caption))
            counts[split] += 1
    for split, split_rows in rows.items():
        with open(out / f"{split}.tsv", "w", encoding="utf-8", newline="\n") as table:
            table.write("image\tcaption\n")
            for image, caption in split_rows:
                table.write(f"{image}\t{caption}\n")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)

    urls = modes.add_parser("urls", help="join the subset list with the metadata into img2dataset URL lists")
    urls.add_argument("--subset", required=True, help="OpenAI's yfcc100m_subset_data.tsv (or .tsv.bz2)")
    urls.add_argument("--metadata", required=True, nargs="+", help="YFCC100M metadata file(s) yfcc100m_dataset (or .bz2)")
    urls.add_argument("--out", default="dataset/yfcc100m/urls", help="folder for train_urls.tsv and dev_urls.tsv")
    urls.add_argument("--caption", default="title_and_description", choices=CAPTION_SOURCES,
                      help="which cleaned fields make the caption")

    tables = modes.add_parser("tables", help="turn img2dataset --output_format files output into train/dev tables")
    tables.add_argument("--downloaded", required=True, nargs="+", help="img2dataset output folder(s)")
    tables.add_argument("--out", default="dataset/yfcc100m/data", help="folder for train.tsv and dev.tsv")

    for mode in (urls, tables):
        mode.add_argument("--dev_fraction", type=float, default=DEFAULT_DEV_FRACTION,
                          help="share of photos hashed into dev; use the same value in both modes")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dev_fraction < 1.0:
        parser.error("--dev_fraction must be in [0, 1)")
    inputs = [args.subset, *args.metadata] if args.mode == "urls" else args.downloaded
    missing = [path for path in inputs if not os.path.exists(path)]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> Counter:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.mode == "urls":
        counts = build_url_lists(args.subset, args.metadata, args.out, args.caption, args.dev_fraction)
        print(
            f"{counts['train']} train and {counts['dev']} dev URLs in {args.out}; left out: "
            f"{counts['empty caption']} empty captions, {counts['videos']} videos, {counts['no url']} without URL, "
            f"{counts['subset ids not in metadata']} subset ids not found in the metadata"
        )
    else:
        counts = build_tables(args.downloaded, args.out, args.dev_fraction)
        print(
            f"{counts['train']} train and {counts['dev']} dev images in {args.out}; "
            f"{counts['no caption']} images without caption left out"
        )
    return counts


if __name__ == "__main__":
    main()
