"""Training pairs and evaluation groups from a table, and the collate functions that batch them."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

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


class ImageCaptionDataset(Dataset):
    """One training pair per table row; a bad image gives a skip marker instead of raising.

    Items are {"image", "tokens", "caption", "image_path", "report"}, where "report" holds the
    item's conversion counts; a skip marker is {"skipped": reason, "image_path"}.
    """

    def __init__(self, table: pd.DataFrame, image_transform: ImageTransform, tokenizer: Tokenizer):
        self.image_paths = [str(path) for path in table["image"]]
        self.captions = [str(caption) for caption in table["caption"]]
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # A ResumableSampler draws (index, augmentation seed): the crop then depends on the draw alone.
        index, augment_seed = key if isinstance(key, tuple) else (key, None)
        image_path, caption = self.image_paths[index], self.captions[index]
        with seeded_randomness(augment_seed):  # the crop and any word dropout: a function of the draw
            image, item_counts = self._image(image_path, augment_seed)
            if image is None:
                return _skip_marker(image_path, item_counts)
            tokens = self.tokenizer([caption])[0]
        return {
            "image": image,
            "tokens": tokens,
            "caption": caption,
            "image_path": image_path,
            "report": item_counts,
        }

    def _image(self, image_path: str, augment_seed: int | None) -> tuple[torch.Tensor | None, dict[str, int]]:
        return _load_for_item(image_path, self.image_transform)


class CachedImageCaptionDataset(ImageCaptionDataset):
    """Training pairs whose "image" is a cached output of the locked image stages (image_cache.py).

    The draw's augmentation seed picks one of the cached views, so a resumed run reads the views
    the uninterrupted one read.
    """

    def __init__(self, table: pd.DataFrame, cache, tokenizer: Tokenizer):
        super().__init__(table, image_transform=None, tokenizer=tokenizer)
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
        captions_by_image: dict[str, list[str]] = {}
        for image_path, caption in zip(table["image"], table["caption"]):
            captions_by_image.setdefault(str(image_path), []).append(str(caption))
        self.image_paths = list(captions_by_image)
        self.captions_per_image = list(captions_by_image.values())
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        image_path, captions = self.image_paths[index], self.captions_per_image[index]
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
    """Stack training pairs, dropping skip markers.

    Returns images [B,3,H,W], tokens [B,L], captions, image_paths, and the batch's `skipped`
    and `conversions` counts as plain dicts. When every item was skipped, images and tokens are
    empty tensors of shape [0]: check `len(batch["image_paths"]) == 0`.
    """
    skipped, conversions, kept = _batch_counts(items)
    if not kept:
        return {
            "images": torch.empty(0),
            "tokens": torch.empty(0, dtype=torch.long),
            "captions": [],
            "image_paths": [],
            "skipped": skipped,
            "conversions": conversions,
        }
    return {
        "images": torch.stack([item["image"] for item in kept]),
        "tokens": torch.stack([torch.as_tensor(item["tokens"]) for item in kept]),
        "captions": [item["caption"] for item in kept],
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
        "images": torch.stack([item["image"] for item in kept]),
        "tokens": torch.cat([torch.as_tensor(item["tokens"]) for item in kept]),
        "caption_image_ids": torch.tensor(caption_image_ids, dtype=torch.long),
        "image_ids": torch.tensor([item["image_id"] for item in kept], dtype=torch.long),
        "captions": [caption for item in kept for caption in item["captions"]],
        "image_paths": [item["image_path"] for item in kept],
        "skipped": skipped,
        "conversions": conversions,
    }
