"""Training pairs streamed from webdataset tar shards, such as img2dataset's webdataset output."""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.utils import pytorch_worker_info

from clipsearch.data import DataReport, decode_image
from clipsearch.datasets import ImageTransform, Tokenizer
from clipsearch.tables import SHARD_SUFFIX
from clipsearch.tars import CAPTION_MEMBER, IMAGE_MEMBERS

logger = logging.getLogger(__name__)


def expand_shards(urls_or_pattern: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths from a brace pattern (`shards/{00000..00009}.tar`), a folder, a file or a list."""
    if not isinstance(urls_or_pattern, str | os.PathLike):
        return [shard for item in urls_or_pattern for shard in expand_shards(item)]
    text = str(urls_or_pattern)
    if Path(text).is_dir():
        shards = sorted(str(child) for child in Path(text).iterdir() if child.suffix == SHARD_SUFFIX)
    else:
        shards = list(expand_urls(text))
    if not shards:
        raise ValueError(f"no .tar shards in {text}")
    return shards


def decode_image_bytes(data: bytes, name: str, report: DataReport) -> Image.Image | None:
    """`clipsearch.data.load_image` for a tar member already in memory: same checks and skip reasons."""
    if not data:
        report.add("empty file", name)
        return None
    return decode_image(io.BytesIO(data), name, report)


class SamplesToItems:
    """Pipeline stage turning raw webdataset samples into `ImageCaptionDataset` items or skip markers.

    A stage over the whole stream rather than `.map`, because webdataset's map puts `__key__`
    back into every result; a class rather than a closure so it pickles into spawned workers.
    """

    def __init__(self, image_transform: ImageTransform, tokenizer: Tokenizer):
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            yield self.to_item(sample)

    def to_item(self, sample: dict) -> dict:
        image_path = f"{sample.get('__url__', '')}/{sample.get('__key__', '')}"
        report = DataReport()
        image_bytes = next((sample[member] for member in IMAGE_MEMBERS if member in sample), None)
        if image_bytes is None:
            return self._skip(report, "no image in sample", image_path)
        if CAPTION_MEMBER not in sample:
            return self._skip(report, "no caption in sample", image_path)
        try:
            caption = sample[CAPTION_MEMBER].decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._skip(report, "non-utf8 caption", image_path)
        if not caption:
            return self._skip(report, "empty caption", image_path)
        image = decode_image_bytes(image_bytes, image_path, report)
        if image is None:
            return {"skipped": next(iter(report.skipped())), "image_path": image_path}
        return {
            "image": self.image_transform(image),
            "tokens": self.tokenizer([caption])[0],
            "caption": caption,
            "image_path": image_path,
            "report": report.as_dict(),
        }

    @staticmethod
    def _skip(report: DataReport, reason: str, image_path: str) -> dict:
        report.add(reason, image_path)  # logs it where it happens, as load_image does
        return {"skipped": reason, "image_path": image_path}


class ShardReadErrors:
    """webdataset error handler: log and count an unreadable shard or member, then carry on."""

    def __init__(self, report: DataReport):
        self.report = report

    def __call__(self, error: Exception) -> bool:
        self.report.add("unreadable shard data", f"{type(error).__name__}: {error}")
        return True


def split_shards(shard_stream: Iterable[dict]) -> Iterator[dict]:
    """This process's share of the shards: rank-major over DDP ranks, then DataLoader workers."""
    shards = list(shard_stream)
    rank, world_size, worker, num_workers = pytorch_worker_info()
    readers = world_size * num_workers
    share = shards[rank * num_workers + worker :: readers]
    if not share:
        raise ValueError(
            f"{len(shards)} shards cannot feed {world_size} ranks x {num_workers} DataLoader workers: "
            "use fewer workers or split the data into more shards"
        )
    yield from share


def make_webdataset(
    urls_or_pattern: str | os.PathLike | Iterable[str | os.PathLike],
    image_transform: ImageTransform,
    tokenizer: Tokenizer,
    shuffle_buffer: int = 1000,
    report: DataReport | None = None,
    epoch_samples: int | None = None,
) -> IterableDataset:
    """A stream of `ImageCaptionDataset` items (or skip markers) from webdataset shards.

    Each sample is the tar members sharing a key: an image (`jpg`, `jpeg`, `png` or `webp`) and
    its caption (`txt`); anything else (img2dataset's `json`) is ignored. `image_path` is
    `<shard>/<key>`. `shuffle_buffer` 0 reads shards and samples in order. `report` counts
    shard-level read errors (truncated or unreadable tars); per-sample skips travel with the items
    to `collate_pairs`, as with the map-style dataset. With DataLoader workers the report lives in
    each worker, so the main process only sees their log lines.

    For the trainer, when `--dataset_path` passes `is_webdataset_path`:

        pixels, pixel_normalize = split_normalize(bundle.train_transform)  # the module normalises batches
        train_set = make_webdataset(path, pixels, bundle.tokenizer, epoch_samples=n)
        DataLoader(train_set, batch_size=b, num_workers=w, collate_fn=collate_pairs)  # no sampler

    Shards are divided between DDP ranks and DataLoader workers (rank-major) and each process
    shuffles only its own, so a pass sees every sample once; fewer shards than ranks x workers is
    a clear error. A stream has no length, so give every rank the same number of steps: with
    `epoch_samples` each worker repeats its shards as needed and yields exactly that many samples
    per epoch (skip markers included); otherwise a rank whose shards hold fewer samples ends its
    epoch first and DDP waits forever. Shards hold no dev split: validation still needs a
    table-based split (a `dev.tsv` beside the shards, or a `--val_path` dataset folder).
    """
    shards = expand_shards(urls_or_pattern)
    handler = ShardReadErrors(report if report is not None else DataReport())
    dataset = wds.WebDataset(
        shards,
        handler=handler,
        shardshuffle=len(shards) if shuffle_buffer > 0 else False,
        nodesplitter=split_shards,
        workersplitter=None,
        empty_check=False,
    )
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer)
    dataset = dataset.compose(SamplesToItems(image_transform, tokenizer))
    if epoch_samples is not None:
        dataset = dataset.with_epoch(epoch_samples)
    return dataset
