"""Turn the official Flickr8k download into train/dev/test tables in the project's dataset format."""
from __future__ import annotations

import argparse
import logging
import re
from collections import Counter
from pathlib import Path

logger = logging.getLogger("flickr8k.prepare")

SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
TOKEN_FILE = "Flickr8k.token.txt"
# The official archive spells its image folder "Flicker8k"; some re-uploads fix the typo.
IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
WHITESPACE = re.compile(r"\s+")


def find_image_folder(source: Path) -> Path:
    for name in IMAGE_FOLDERS:
        if (source / name).is_dir():
            return source / name
    raise FileNotFoundError(f"{source}: no image folder; expected one of {', '.join(IMAGE_FOLDERS)}")


def read_captions(token_path: Path, counts: Counter) -> dict[str, list[str]]:
    """Captions by image file name, in caption-number order as the file lists them."""
    captions: dict[str, list[str]] = {}
    with open(token_path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name_and_number, tab, caption = line.partition("\t")
            image_name = name_and_number.rsplit("#", 1)[0].strip()
            if not tab or not image_name:
                counts["malformed token lines"] += 1
                logger.warning("%s:%d: not '<image>#<n>\\t<caption>', skipped", token_path, line_number)
                continue
            # Tabs or newlines inside a caption would break the TSV the dataset reader expects.
            caption = WHITESPACE.sub(" ", caption).strip()
            if not caption:
                counts["empty captions"] += 1
                continue
            captions.setdefault(image_name, []).append(caption)
    return captions


def read_split_list(path: Path) -> list[str]:
    """Image names of one split, deduplicated in file order."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(name for name in names if name))


def write_table(path: Path, rows: list[tuple[str, str]]) -> None:
    # Plain writes, no quoting: the reader parses TSVs with quoting off so captions keep their quotes.
    with open(path, "w", encoding="utf-8", newline="\n") as table:
        table.write("image\tcaption\n")
        for image, caption in rows:
            table.write(f"{image}\t{caption}\n")


def prepare(source: str | Path, out: str | Path) -> dict:
    """Write `<split>.tsv` for every official split list present; returns the counts it reports."""
    source, out = Path(source).resolve(), Path(out)
    image_folder = find_image_folder(source)
    token_path = source / TOKEN_FILE
    if not token_path.is_file():
        raise FileNotFoundError(f"{token_path} not found; is {source} the unpacked Flickr8k text archive?")
    counts: Counter = Counter()
    captions = read_captions(token_path, counts)

    present_splits = {}
    for split, file_name in SPLIT_FILES.items():
        if (source / file_name).is_file():
            present_splits[split] = read_split_list(source / file_name)
        else:
            logger.info("no %s split: %s is absent, so no %s.tsv is written", split, file_name, split)

    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"source": str(source), "out": str(out.resolve()), "splits": {}}
    split_of_image: dict[str, str] = {}
    for split, image_names in present_splits.items():
        rows, missing_files, without_captions = [], [], []
        for image_name in image_names:
            if image_name in split_of_image:
                logger.warning("%s is in both %s and %s", image_name, split_of_image[image_name], split)
                counts["images in two splits"] += 1
            split_of_image.setdefault(image_name, split)
            image_path = image_folder / image_name
            if not image_path.is_file():
                missing_files.append(image_name)
                continue
            if not captions.get(image_name):
                without_captions.append(image_name)
                continue
            rows.extend((str(image_path), caption) for caption in captions[image_name])
        write_table(out / f"{split}.tsv", rows)
        for name in missing_files:
            logger.warning("%s: listed in %s but not in %s, left out", name, SPLIT_FILES[split], image_folder)
        for name in without_captions:
            logger.warning("%s: listed in %s but has no caption, left out", name, SPLIT_FILES[split])
        summary["splits"][split] = {
            "images": len({image for image, _ in rows}),
            "captions": len(rows),
            "listed": len(image_names),
            "missing_files": len(missing_files),
            "without_captions": len(without_captions),
        }

    # Images captioned but in no present split: the absent test split, or stray token lines.
    unassigned = sorted(name for name in captions if name not in split_of_image)
    if unassigned:
        examples = ", ".join(unassigned[:3])
        logger.info("%d captioned images are in no present split (e.g. %s)", len(unassigned), examples)
    summary["captioned_images_in_no_split"] = len(unassigned)
    summary["empty_captions"] = counts["empty captions"]
    summary["malformed_token_lines"] = counts["malformed token lines"]
    summary["images_in_two_splits"] = counts["images in two splits"]
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True, help="unpacked Flickr8k folder (images folder, token and split files)")
    parser.add_argument("--out", default="dataset/flickr8k/data", help="folder to write train.tsv/dev.tsv/test.tsv into")
    args = parser.parse_args(argv)
    if not Path(args.source).is_dir():
        parser.error(f"--source {args.source} is not a folder")
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    summary = prepare(args.source, args.out)
    for split, split_counts in summary["splits"].items():
        print(
            f"{split}: {split_counts['images']} images, {split_counts['captions']} captions "
            f"({split_counts['missing_files']} listed images missing, "
            f"{split_counts['without_captions']} without captions)"
        )
    print(
        f"{summary['captioned_images_in_no_split']} captioned images in no split, "
        f"{summary['empty_captions']} empty captions dropped; tables in {summary['out']}"
    )
    return summary


if __name__ == "__main__":
    main()
