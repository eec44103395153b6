"""Training pairs and evaluation groups from a table, and the collate functions that batch them."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from clipsearch.data_report import CONVERSION_PREFIX, DataReport
from clipsearch.images import load_image
from clipsearch.training_order import seeded_randomness

Tokenizer = Callable[[list[str]], torch.Tensor]
ImageTransform = Callable[[Image.Image], torch.Tensor]


class WordDropout:
    """A training tokenizer that first drops each word of a caption with probability `rate`.

    Flickr-sized data shows each caption a handful of times per run, and the text tower learns
    the captions word for word; a few missing words each time are meant to make it read for
    content instead (on Flickr8k, 0.1 ended level: BENCHMARKS.md). At least one word stays. The
    draws come from torch's global generator, which a `ResumableSampler` draw seeds
    (`seeded_randomness`), so a resumed run drops the same words; a webdataset stream draws from
    its worker's generator, as its crops do. Validation, evaluation and search tokenise with the
    plain tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"word dropout rate must be in [0, 1), got {rate}")
        self.tokenizer = tokenizer
        self.rate = rate

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer([self.drop_words(caption) for caption in captions])

    def drop_words(self, caption: str) -> str:
        words = caption.split()
        if len(words) < 2:
            return caption
        kept = torch.rand(len(words)) >= self.rate
        if not kept.any():
            kept[torch.randint(len(words), ())] = True
        return " ".join(word for word, keep in zip(words, kept.tolist()) if keep)


def _load_for_item(path: str, image_transform: ImageTransform) -> tuple[torch.Tensor | None, dict[str, int]]:
    """Load and transform one image with its own report, whose counts travel with the item."""
    item_report = DataReport()
    image = load_image(path, item_report)
    if image is None:
        return None, item_report.as_dict()
    return image_transform(image), item_report.as_dict()


def _skip_marker(path: str, item_counts: dict[str, int]) -> dict:
    reasons = [reason for reason in item_counts if not reason.startswith(CONVERSION_PREFIX)]
    return {"skipped": reasons[0] if reasons else "unknown", "image_path": path}


def captions_by_image(table: pd.DataFrame) -> dict[str, list[str]]:
    """Each image path of a table with its captions, both in table order."""
    grouped: dict[str, list[str]] = {}
    for image_path, caption in zip(table["image"], table["caption"]):
        grouped.setdefault(str(image_path), []).append(str(caption))
    return grouped


class ImageCaptionDataset(Dataset):
    """Training items from a table; a bad image gives a skip marker instead of raising.

    With `captions_per_image` 1, one pair per table row: {"image", "tokens" [L], "caption",
    "image_path", "report"}. Above 1, one item per image, carrying up to that many of its captions,
    drawn anew each time: {"image", "tokens" [k, L], "captions", ...}. One image forward then
    serves k captions (on Flickr a text forward costs about what the trained image stages do), and
    the loss counts every caption of an image as its positive, where pairs drawn by row put two
    captions of one photo in a batch as each other's negatives (on Flickr8k, two captions per
    photo still trailed pairs at equal minutes: BENCHMARKS.md). "report" holds the item's
    conversion counts; a skip marker is {"skipped": reason, "image_path"}.
    """

    def __init__(self, table: pd.DataFrame, image_transform: ImageTransform, tokenizer: Tokenizer,
                 captions_per_image: int = 1):
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
        if captions_per_image == 1:
            self.image_paths = [str(path) for path in table["image"]]
            self.captions = [[str(caption)] for caption in table["caption"]]
        else:
            grouped = captions_by_image(table)
            self.image_paths, self.captions = list(grouped), list(grouped.values())
        self.captions_per_image = captions_per_image
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # A ResumableSampler draws (index, augmentation seed): the crop then depends on the draw alone.
        index, augment_seed = key if isinstance(key, tuple) else (key, None)
        image_path, captions = self.image_paths[index], self.captions[index]
        # The crop, the captions drawn and any word dropout: a function of the draw.
        with seeded_randomness(augment_seed):
            image, item_counts = self._image(image_path, augment_seed)
            if image is None:
                return _skip_marker(image_path, item_counts)
            if self.captions_per_image == 1:
                return {"image": image, "tokens": self.tokenizer(captions)[0], "caption": captions[0],
                        "image_path": image_path, "report": item_counts}
            if len(captions) > self.captions_per_image:
                drawn = torch.randperm(len(captions))[: self.captions_per_image].sort().values.tolist()
                captions = [captions[position] for position in drawn]
            return {"image": image, "tokens": self.tokenizer(captions), "captions": captions,
                    "image_path": image_path, "report": item_counts}

    def _image(self, image_path: str, augment_seed: int | None) -> tuple[torch.Tensor | None, dict[str, int]]:
        return _load_for_item(image_path, self.image_transform)


class CachedImageCaptionDataset(ImageCaptionDataset):
    """Training pairs whose "image" is a cached output of the locked image stages (image_cache.py).

    The draw's augmentation seed picks one of the cached views, so a resumed run reads the views
    the uninterrupted one read.
    """

    def __init__(self, table: pd.DataFrame, cache, tokenizer: Tokenizer, captions_per_image: int = 1):
        super().__init__(table, image_transform=None, tokenizer=tokenizer, captions_per_image=captions_per_image)
        self.cache = cache

    def _image(self, image_path: str, augment_seed: int | None) -> tuple[torch.Tensor | None, dict[str, int]]:
        features, reason = self.cache.read(image_path, view=augment_seed or 0)
        return features, ({} if features is not None else {reason: 1})


class ImageGroupDataset(Dataset):
    """One evaluation item per unique image, carrying all of its captions in table order.

    Items are {"image", "tokens" [captions, L], "captions", "image_path", "image_id", "report"},
    with image_id the index into `image_paths`; bad images give the same skip marker as pairs.
    """

    def __init__(self, table: pd.DataFrame, image_transform: ImageTransform, tokenizer: Tokenizer):
        grouped = captions_by_image(table)
        self.image_paths = list(grouped)
        self.captions = list(grouped.values())
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        image_path, captions = self.image_paths[index], self.captions[index]
        image, item_counts = _load_for_item(image_path, self.image_transform)
        if image is None:
            return _skip_marker(image_path, item_counts)
        return {
            "image": image,
            "tokens": self.tokenizer(captions),
            "captions": captions,
            "image_path": image_path,
            "image_id": index,
            "report": item_counts,
        }


def stack_for_transfer(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack`, straight into shared memory inside a loader worker: a batch stacked in private
    memory is copied again into shared memory as the worker sends it (torch's default collate
    avoids that copy the same way)."""
    if not tensors:
        return torch.empty(0)
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    shared = torch.empty((len(tensors), *first.shape), dtype=first.dtype).share_memory_()
    return torch.stack(tensors, out=shared)


def _batch_counts(items: Iterable[dict]) -> tuple[dict[str, int], dict[str, int], list[dict]]:
    """Split items into kept ones and the skip and conversion counts of the whole batch."""
    batch_report = DataReport()
    kept = []
    for item in items:
        if "skipped" in item:
            batch_report.counts[item["skipped"]] += 1
        else:
            batch_report.merge(item.get("report", {}))
            kept.append(item)
    return batch_report.skipped(), batch_report.conversions(), kept


def collate_pairs(items: list[dict]) -> dict:
    """Stack training items (pairs, or images with several captions), dropping skip markers.

    Returns images [B,3,H,W], tokens [T,L] (T = B for pairs), captions [T], caption_images [T]
    (each caption's image row), image_paths [B], and the batch's `skipped` and `conversions`
    counts as plain dicts. When every item was skipped, images and tokens are empty tensors of
    shape [0]: check `len(batch["image_paths"]) == 0`.
    """
    skipped, conversions, kept = _batch_counts(items)
    if not kept:
        return {
            "images": torch.empty(0),
            "tokens": torch.empty(0, dtype=torch.long),
            "captions": [],
            "caption_images": torch.empty(0, dtype=torch.long),
            "image_paths": [],
            "skipped": skipped,
            "conversions": conversions,
        }
    captions = [item["captions"] if "captions" in item else [item["caption"]] for item in kept]
    tokens = [torch.as_tensor(item["tokens"]) for item in kept]
    return {
        "images": stack_for_transfer([item["image"] for item in kept]),
        "tokens": torch.cat([rows if rows.ndim == 2 else rows[None] for rows in tokens]),
        "captions": [caption for image_captions in captions for caption in image_captions],
        "caption_images": torch.arange(len(kept)).repeat_interleave(torch.tensor([len(c) for c in captions])),
        "image_paths": [item["image_path"] for item in kept],
        "skipped": skipped,
        "conversions": conversions,
    }


def collate_groups(items: list[dict]) -> dict:
    """Stack evaluation groups, dropping skip markers.

    Returns images [B,3,H,W], image_ids [B], tokens [sum of captions, L], caption_image_ids
    (the image_id of each caption row), captions (flat, aligned with tokens), image_paths, and
    `skipped` and `conversions` counts. An all-skipped batch has empty tensors of shape [0].
    """
    skipped, conversions, kept = _batch_counts(items)
    if not kept:
        return {
            "images": torch.empty(0),
            "tokens": torch.empty(0, dtype=torch.long),
            "caption_image_ids": torch.empty(0, dtype=torch.long),
            "image_ids": torch.empty(0, dtype=torch.long),
            "captions": [],
            "image_paths": [],
            "skipped": skipped,
            "conversions": conversions,
        }
    caption_image_ids = [item["image_id"] for item in kept for _ in item["captions"]]
    return {
        "images": stack_for_transfer([item["image"] for item in kept]),
        "tokens": torch.cat([torch.as_tensor(item["tokens"]) for item in kept]),
        "caption_image_ids": torch.tensor(caption_image_ids, dtype=torch.long),
        "image_ids": torch.tensor([item["image_id"] for item in kept], dtype=torch.long),
        "captions": [caption for item in kept for caption in item["captions"]],
        "image_paths": [item["image_path"] for item in kept],
        "skipped": skipped,
        "conversions": conversions,
    }
