"""Reader stage: which images to encode, this rank's share of them, and batches of decoded tensors."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from clipsearch.data import (
    CONVERSION_PREFIX,
    IMAGE_EXTENSIONS,
    DataReport,
    load_image,
    read_table,
)
from clipsearch.datasets import stack_for_transfer
from clipsearch.fields import scalar, time_text
from clipsearch.images import SkipReasons, capture_date, decode_image
from clipsearch.store import bytes_digest, caption_row_name, file_digest
from clipsearch.tables import (  # noqa: F401
    AUTO_SPLITS,
    CAPTION_COLUMN,
    FOLDER_SPLIT,
    IMAGE_COLUMN,
    encoding_splits,
    tables_present,
)
from clipsearch.tars import TarFetchError, TarProblem, row_name, sample_fields, tar_samples

logger = logging.getLogger(__name__)


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


def table_fields(
    dataset_path: str | os.PathLike, split: str = "auto", image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> dict[str, dict]:
    """Each image's fields from the tables a run reads: its caption and every other column ({} for a folder scan).

    An image on several rows (one per caption, as in Flickr8k) gets every distinct value of a
    column, one per line, in table order; a missing cell is no value.
    """
    values_of: dict[str, dict[str, list]] = {}
    for split_name in encoding_splits(dataset_path, split):
        table = read_table(dataset_path, split_name, image_column, caption_column, require_caption=False,
                           other_columns=True)
        columns = [column for column in table.columns if column != "image"]
        for row in table.itertuples(index=False, name=None):
            image, *cells = row
            fields = values_of.setdefault(os.path.normpath(str(image)), {})
            for column, cell in zip(columns, cells):
                value = scalar(cell)
                if value is not None and value not in fields.setdefault(column, []):
                    fields[column].append(value)
    return {
        image: {column: cells[0] if len(cells) == 1 else "\n".join(str(cell) for cell in cells)
                for column, cells in fields.items() if cells}
        for image, fields in values_of.items()
    }


@dataclass(frozen=True)
class CaptionRow:
    caption: str
    fields: dict  # the caption, its image's path, and the table row's other columns


def caption_rows(
    dataset_path: str | os.PathLike, split: str = "auto", image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> dict[str, CaptionRow]:
    """Every distinct (image, caption) pair of the tables a run reads, by row name (store.caption_row_name).

    A caption repeated for the same image is one row; rows without a caption are dropped (and logged).
    """
    rows: dict[str, CaptionRow] = {}
    for split_name in encoding_splits(dataset_path, split):
        table = read_table(dataset_path, split_name, image_column, caption_column, other_columns=True)
        columns = list(table.columns)
        for cells in table.itertuples(index=False, name=None):
            row = dict(zip(columns, cells))
            image, caption = os.path.normpath(str(row.pop("image"))), str(row.pop("caption"))
            key = caption_row_name(image, caption)
            if key not in rows:
                others = {column: value for column, value in ((column, scalar(cell)) for column, cell in row.items())
                          if value is not None}
                rows[key] = CaptionRow(caption, {**others, "caption": caption, "image": image})
    return rows


@dataclass
class CaptionBatch:
    """Tokenised captions and their row names: what the text mapper and the writer take."""

    inputs: torch.Tensor  # [n, context_length] tokens
    image_paths: list[str]  # the rows' names (store.caption_row_name), as image batches name their files
    skipped: list[tuple[str, str]] = field(default_factory=list)
    digests: list[str | None] = field(default_factory=list)
    facts: list[dict] = field(default_factory=list)


def caption_batches(keys: Sequence[str], captions: dict[str, CaptionRow], tokenizer: Callable,
                    batches: list[list[int]]) -> Iterator[CaptionBatch]:
    """Batches of tokenised captions in the order of `batches` (indices into `keys`); tokenising is cheap
    next to the text tower, so it runs in this process."""
    for batch in batches:
        names = [keys[position] for position in batch]
        yield CaptionBatch(tokenizer([captions[name].caption for name in names]), names, [], [None] * len(names),
                           [{} for _ in names])


def fields_digest(fields: dict) -> str:
    """A short digest of an image's table fields: part of its change test, so an edited caption is re-read."""
    text = json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def partition(image_paths: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's contiguous slice: every path lands on exactly one rank, with no padding."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    count = len(image_paths)
    return list(image_paths[rank * count // world_size : (rank + 1) * count // world_size])


@dataclass
class ImageBatch:
    images: torch.Tensor  # [n, 3, H, W], uint8 pixels or float; shape [0] when every image of the batch was skipped
    image_paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    digests: list[str] = field(default_factory=list)  # of each image file's bytes, for duplicates
    facts: list[dict] = field(default_factory=list)  # what decoding learnt of each image: pixels, capture date

    @property
    def inputs(self) -> torch.Tensor:
        """What the model stage takes, named alike for image and caption batches."""
        return self.images

    def pin_memory(self) -> ImageBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return dataclasses.replace(self, images=self.images.pin_memory())


class ImagePathDataset(Dataset):
    """Decodes and transforms one image per path; a bad file yields its skip reason instead."""

    def __init__(self, image_paths: Sequence[str], image_transform: Callable):
        self.image_paths = list(image_paths)
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, str | None, str | None, dict | None]:
        image_path = self.image_paths[index]
        report = DataReport()
        image = load_image(image_path, report)
        if image is None:
            reasons = [reason for reason in report.as_dict() if not reason.startswith(CONVERSION_PREFIX)]
            return None, image_path, reasons[0] if reasons else "unreadable image", None, None
        # Upright size, as the image is shown; the date comes from the header, read again from the page cache.
        facts = {"width": image.width, "height": image.height, "taken": capture_date(image_path)}
        try:
            # The file was just read to decode it, so hashing it again reads from the page cache.
            return self.image_transform(image), image_path, None, file_digest(image_path), facts
        except Exception as error:  # a transform failure is one bad image, not a failed run
            return None, image_path, f"transform failed ({type(error).__name__})", None, None


def collate_images(items: list[tuple[torch.Tensor | None, str, str | None, str | None, dict | None]]) -> ImageBatch:
    kept = [(tensor, path, digest, facts) for tensor, path, reason, digest, facts in items if reason is None]
    skipped = [(path, reason) for _, path, reason, _, _ in items if reason is not None]
    images = stack_for_transfer([tensor for tensor, _, _, _ in kept])
    return ImageBatch(
        images=images,
        image_paths=[path for _, path, _, _ in kept],
        skipped=skipped,
        digests=[digest for _, _, digest, _ in kept],
        facts=[facts for _, _, _, facts in kept],
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


# ---------------------------------------------------------------------------------------------
# Webdataset tars: a tar is one shard, read whole by one loader worker
# ---------------------------------------------------------------------------------------------


@dataclass
class TarBatch(ImageBatch):
    """Up to a batch of one tar's samples; `facts` holds each row's fields (decoded size, caption, .json).

    The last batch of a tar has `ends_shard` (it may hold no image); a tar that could not be read
    after its tries ends with `failure`, and whatever its earlier batches held is dropped.
    """

    step: int = 0
    tar: str = ""
    ends_shard: bool = False
    failure: str | None = None


def _decoded_sample(sample, tar: str, image_transform: Callable) -> tuple[torch.Tensor | None, str, tuple | str]:
    """(tensor, row name, (fields, digest of the image's bytes)) of a good sample, or (None, row name, skip reason)."""
    name = row_name(tar, sample.key)
    data = sample.image
    if data is None:
        return None, name, f"no image in sample (members: {', '.join(sorted(sample.members)) or 'none'})"
    report = SkipReasons()
    image = decode_image(io.BytesIO(data), name, report) if data else None
    if image is None:
        return None, name, report.reason or "empty image member"
    fields, problem = sample_fields(sample, tar)
    if problem:
        logger.warning("%s: %s", name, problem)
    facts = {"size": len(data), "width": image.width, "height": image.height,
             "taken": capture_date(io.BytesIO(data)), **fields}
    if sample.mtime:
        facts.setdefault("mtime", time_text(sample.mtime * 10**9))
    try:
        return image_transform(image), name, (facts, bytes_digest(data))
    except Exception as error:  # a transform failure is one bad image, not a failed run
        return None, name, f"transform failed ({type(error).__name__})"


class TarBatches(IterableDataset):
    """Batches of the tars assigned to this rank, `(step, tar)` each; with loader workers each worker
    reads whole tars (tar i goes to worker i mod workers), so a tar's batches come from one process."""

    def __init__(self, assigned: Sequence[tuple[int, str]], image_transform: Callable, batch_size: int):
        self.assigned = list(assigned)
        self.image_transform = image_transform
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[TarBatch]:
        worker = get_worker_info()
        share = self.assigned if worker is None else self.assigned[worker.id :: worker.num_workers]
        for step, tar in share:
            yield from self.tar_batches(step, tar)

    def tar_batches(self, step: int, tar: str) -> Iterator[TarBatch]:
        kept: list[tuple[torch.Tensor, str, tuple[dict, str]]] = []
        skipped: list[tuple[str, str]] = []
        try:
            for item in tar_samples(tar):
                if isinstance(item, TarProblem):
                    skipped.append((tar if item.key is None else row_name(tar, item.key), item.reason))
                    continue
                tensor, name, outcome = _decoded_sample(item, tar, self.image_transform)
                if tensor is None:
                    skipped.append((name, outcome))
                    continue
                kept.append((tensor, name, outcome))
                if len(kept) == self.batch_size:
                    yield self._batch(step, tar, kept, skipped)
                    kept, skipped = [], []
        except TarFetchError as error:
            yield TarBatch(torch.empty(0), [], step=step, tar=tar, ends_shard=True, failure=str(error))
            return
        yield self._batch(step, tar, kept, skipped, ends_shard=True)

    @staticmethod
    def _batch(step: int, tar: str, kept: list, skipped: list, ends_shard: bool = False) -> TarBatch:
        return TarBatch(
            images=stack_for_transfer([tensor for tensor, _, _ in kept]),
            image_paths=[name for _, name, _ in kept], skipped=list(skipped),
            digests=[digest for _, _, (_, digest) in kept], facts=[fields for _, _, (fields, _) in kept],
            step=step, tar=tar, ends_shard=ends_shard,
        )


def make_tar_loader(assigned: Sequence[tuple[int, str]], image_transform: Callable, batch_size: int,
                    num_workers: int, pin_memory: bool = False) -> Iterator[TarBatch]:
    """Batches of the tars in `assigned`; workers (at most one per tar) decode ahead while the model runs."""
    workers = min(num_workers, len(assigned))
    return DataLoader(
        TarBatches(assigned, image_transform, batch_size),
        batch_size=None,  # the dataset yields whole batches
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
