"""Copy a dataset with every image resized once, so training decodes small files instead of full photos."""
from __future__ import annotations

import argparse
from pathlib import Path

from clipsearch.cli.common import CommandParser, UserError, positive_int, run_command

EPILOG = """\
Writes <out>/<split>.tsv for each of train, dev and test found in --dataset_path, pointing at
resized JPEG copies under <out>/images/. Rerunning skips images already written.
  ./clipsearch resize_dataset --dataset_path dataset/flickr8k/data --out dataset/flickr8k/data256
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(description=__doc__, epilog=EPILOG)
    parser.add_argument("--dataset_path", required=True, help="dataset folder with <split>.tsv tables")
    parser.add_argument("--out", required=True, help="folder for the resized images and their tables")
    parser.add_argument("--size", type=positive_int, default=256, help="shorter side in pixels (images are never upscaled)")
    parser.add_argument("--workers", type=positive_int, default=2, help="resizing processes")
    args = parser.parse_args(argv)
    if not Path(args.dataset_path).is_dir():
        raise UserError(f"--dataset_path {args.dataset_path}: no such folder")
    if Path(args.out).resolve() == Path(args.dataset_path).resolve():
        raise UserError(f"--out {args.out} is the dataset itself; give the resized copy its own folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from clipsearch.resize_dataset import resize_dataset

    try:
        resize_dataset(args.dataset_path, args.out, args.size, args.workers)
    except FileNotFoundError as error:  # no table of any split in the folder
        raise UserError(str(error)) from None


if __name__ == "__main__":
    run_command(main)
