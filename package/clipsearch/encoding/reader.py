"""Reader stage: which images to encode, this rank's share of them, and batches of decoded tensors."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from clipsearch.data import (
    CONVERSION_PREFIX,
    IMAGE_EXTENSIONS,
    DataReport,
    load_image,
    read_table,
)
from clipsearch.store import file_digest
from clipsearch.tables import AUTO_SPLITS, FOLDER_SPLIT, IMAGE_COLUMN, encoding_splits, tables_present  # noqa: F401


def scan_image_folder(folder: str | os.PathLike) -> list[str]:
    """Absolute paths of every image file under `folder`, recursively, sorted."""
    folder = os.path.abspath(folder)
    image_paths = []
    for directory, _, file_names in os.walk(folder):
        for file_name in file_names:
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                image_paths.append(os.path.join(directory, file_name))
    return sorted(image_paths)


def collect_image_paths(dataset_path: str | os.PathLike, split: str = "auto", image_column: str = IMAGE_COLUMN) -> list[str]:
    """The sorted, de-duplicated absolute image paths a run encodes (the tables `encoding_splits`
    names, or a folder scan when it names none).

    Paths listed in a table but missing on disk are kept: the reader reports them as skipped.
    """
    if not Path(dataset_path).is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset_path}")
    splits = encoding_splits(dataset_path, split)
    if not splits:
        return scan_image_folder(dataset_path)
    unique_paths: set[str] = set()
    for split_name in splits:
        # Encoding needs only the image column.
        table = read_table(dataset_path, split_name, image_column, require_caption=False)
        unique_paths.update(os.path.normpath(str(path)) for path in table["image"])
    return sorted(unique_paths)


def partition(image_paths: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's contiguous slice: every path lands on exactly one rank, with no padding."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    count = len(image_paths)
    return list(image_paths[rank * count // world_size : (rank + 1) * count // world_size])


@dataclass
class ImageBatch:
    images: torch.Tensor  # [n, 3, H, W]; shape [0] when every image of the batch was skipped
    image_paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    digests: list[str] = field(default_factory=list)  # of each image file's bytes, for duplicates

    def pin_memory(self) -> ImageBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return ImageBatch(self.images.pin_memory(), self.image_paths, self.skipped, self.digests)


class ImagePathDataset(Dataset):
    """Decodes and transforms one image per path; a bad file yields its skip reason instead."""

    def __init__(self, image_paths: Sequence[str], image_transform: Callable):
        self.image_paths = list(image_paths)
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, str | None, str | None]:
        image_path = self.image_paths[index]
        report = DataReport()
        image = load_image(image_path, report)
        if image is None:
            reasons = [reason for reason in report.as_dict() if not reason.startswith(CONVERSION_PREFIX)]
            return None, image_path, reasons[0] if reasons else "unreadable image", None
        try:
            # The file was just read to decode it, so hashing it again reads from the page cache.
            return self.image_transform(image), image_path, None, file_digest(image_path)
        except Exception as error:  # a transform failure is one bad image, not a failed run
            return None, image_path, f"transform failed ({type(error).__name__})", None


def collate_images(items: list[tuple[torch.Tensor | None, str, str | None, str | None]]) -> ImageBatch:
    kept = [(tensor, path, digest) for tensor, path, reason, digest in items if reason is None]
    skipped = [(path, reason) for _, path, reason, _ in items if reason is not None]
    images = torch.stack([tensor for tensor, _, _ in kept]) if kept else torch.empty(0)
    return ImageBatch(
        images=images,
        image_paths=[path for _, path, _ in kept],
        skipped=skipped,
        digests=[digest for _, _, digest in kept],
    )


def shard_batches(shards: Sequence[tuple[int, int, int]], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Index batches that never cross a shard boundary, and the shard step of each batch.

    `shards` lists (step, start, length) of each shard to encode within the rank's paths.
    """
    batches, steps = [], []
    for step, start, length in shards:
        for offset in range(0, length, batch_size):
            batches.append(list(range(start + offset, start + min(offset + batch_size, length))))
            steps.append(step)
    return batches, steps


def make_loader(
    image_paths: Sequence[str],
    image_transform: Callable,
    batches: list[list[int]],
    num_workers: int,
    pin_memory: bool = False,
) -> Iterator[ImageBatch]:
    """Batches in the order of `batches`; workers decode ahead while the model runs."""
    return DataLoader(
        ImagePathDataset(image_paths, image_transform),
        batch_sampler=batches,
        collate_fn=collate_images,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Several batches in flight per worker keep the model fed when decode times vary.
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
