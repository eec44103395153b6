"""Generate the synthetic sample dataset of coloured shapes, refusing to regenerate one that has embeddings."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from clipsearch.cli.common import DEFAULT_DATASET, CommandParser, UserError, positive_int, run_command

MIN_IMAGE_SIZE = 16
EPILOG = """\
A complete copy with the same settings is kept as it is; other settings regenerate the folder.
A folder whose images have been encoded (an emb/ folder inside it, as 2_inference_encode.sh
writes by default) is never regenerated in place: give the new dataset its own --path.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(description=__doc__, epilog=EPILOG)
    parser.add_argument("--path", "--out", default=DEFAULT_DATASET, help="folder to write the dataset into")
    parser.add_argument("--num_train", type=positive_int, default=4000, help="number of training images")
    parser.add_argument("--num_dev", type=positive_int, default=300, help="number of dev images")
    parser.add_argument("--image_size", type=positive_int, default=96, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0); the same seed gives identical files")
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete copy exists")
    args = parser.parse_args(argv)
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image_size must be at least {MIN_IMAGE_SIZE} pixels, got {args.image_size}")
    return args


def embedding_folders(dataset: Path) -> list[Path]:
    """Folders inside `dataset` holding embeddings of its images: shards, or the encoder's records."""
    if not dataset.is_dir():
        return []
    return sorted(
        folder for folder in dataset.iterdir()
        if folder.is_dir() and folder.name != "images"
        and (any(folder.glob("*.ckpt")) or (folder / "manifest.json").is_file() or (folder / "model.json").is_file())
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from clipsearch.sample_data import ensure_sample_dataset, needs_generation

    settings = (args.num_train, args.num_dev, args.image_size, args.seed)
    root = Path(args.path)
    stale = embedding_folders(root)
    # Regenerating in place would leave those embeddings pointing at different pictures, and search
    # would silently rank the wrong images.
    if stale and needs_generation(root, *settings, force=args.force):
        raise UserError(
            f"{root} holds embeddings of its current images ({', '.join(str(f) for f in stale)}) that would go "
            f"stale if it were regenerated; write the new dataset elsewhere with --path (e.g. --path "
            f"{root}-{args.num_train}), or delete {stale[0]} first"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_sample_dataset(root, *settings, force=args.force))


if __name__ == "__main__":
    run_command(main)
