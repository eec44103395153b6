"""Dataset tables, robust image loading and the datasets and collate functions built on them."""
from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from clipsearch.training_order import seeded_randomness

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TABLE_EXTENSIONS = (".tsv", ".csv", ".parquet")

# Pillow's own default. Pillow's DecompressionBombWarning (raised above its global
# Image.MAX_IMAGE_PIXELS) is treated as a skip too, so lowering this constant tightens the
# limit but raising it above Pillow's setting has no effect.
MAX_IMAGE_PIXELS = 89_478_485

# Conversions share the counter with skips; this prefix is how the two are told apart.
CONVERSION_PREFIX = "converted "

# First bytes of the formats we accept: a file that starts like an image but does not decode is
# "corrupt", anything else that Pillow cannot identify is "not an image".
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


class DataReport:
    """Counts skipped items by reason and image conversions by source mode.

    Holds only a Counter, so it pickles, and the counts of DataLoader workers come back to the
    main process as plain dicts in each batch, to be folded in with `merge`.
    """

    def __init__(self, counts: Mapping[str, int] | None = None):
        self.counts: Counter[str] = Counter()
        if counts:
            self.merge(counts)

    def add(self, reason: str, path: str | os.PathLike | None = None, count: int = 1) -> None:
        """Record `count` occurrences of `reason`; skips are logged, conversions only at debug level."""
        self.counts[reason] += count
        where = f": {path}" if path is not None else ""
        times = f" ({count} items)" if count != 1 else ""
        if reason.startswith(CONVERSION_PREFIX):
            logger.debug("%s%s%s", reason, times, where)
        else:
            logger.warning("skipped, %s%s%s", reason, times, where)

    def add_conversion(self, mode: str, path: str | os.PathLike | None = None) -> None:
        self.add(f"{CONVERSION_PREFIX}{mode}", path)

    def merge(self, other: DataReport | Mapping[str, int]) -> DataReport:
        """Add another report's counts (without logging again: the other side already did)."""
        counts = other.counts if isinstance(other, DataReport) else other
        for reason, count in counts.items():
            self.counts[reason] += int(count)
        return self

    def as_dict(self) -> dict[str, int]:
        return {reason: count for reason, count in sorted(self.counts.items()) if count}

    def skipped(self) -> dict[str, int]:
        return {r: c for r, c in self.as_dict().items() if not r.startswith(CONVERSION_PREFIX)}

    def conversions(self) -> dict[str, int]:
        return {r: c for r, c in self.as_dict().items() if r.startswith(CONVERSION_PREFIX)}

    def total_skipped(self) -> int:
        return sum(self.skipped().values())

    def summary(self) -> str:
        skipped = self.skipped()
        if skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
            lines = [f"skipped {self.total_skipped()} items: {reasons}"]
        else:
            lines = ["skipped 0 items"]
        conversions = self.conversions()
        if conversions:
            lines.append("image conversions: " + ", ".join(f"{count} {reason}" for reason, count in conversions.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DataReport({self.as_dict()})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DataReport):
            return self.as_dict() == other.as_dict()
        return NotImplemented


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def find_table(dataset_path: str | os.PathLike, split: str) -> Path:
    """The first of `<split>.tsv`, `.csv`, `.parquet` that exists in the dataset folder."""
    candidates = [Path(dataset_path) / f"{split}{extension}" for extension in TABLE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(f"no table for split {split!r}; tried {tried}")


def _as_text(value: object) -> str:
    """A table cell as a stripped string; missing values become the empty string."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="surrogateescape")
    return str(value).strip()


def _has_undecodable_bytes(text: str) -> bool:
    """True when surrogateescape kept bytes that were not UTF-8 (as U+DC80..U+DCFF)."""
    return any("\udc80" <= character <= "\udcff" for character in text)


def read_table(
    dataset_path: str | os.PathLike,
    split: str,
    image_column: str = "image",
    caption_column: str = "caption",
    report: DataReport | None = None,
    require_caption: bool = True,
) -> pd.DataFrame:
    """Read a split's table as columns `image` (absolute path) and `caption` (stripped text).

    Cells are text as written: "NA", "NaN", "null" or "N/A" are captions, not missing values.
    Bytes that are not UTF-8 are kept (surrogateescape), so such a file name still opens on
    Linux. Rows without an image path are dropped; so are rows with an empty or non-UTF-8
    caption and malformed rows (too many fields) unless `require_caption` is False (encoding
    needs only the image: such rows keep it, with caption ""). Every drop is logged and counted
    in `report`; missing image files are left for `load_image` to find.
    """
    table_path = find_table(dataset_path, split)
    malformed_rows: list[list[str]] = []
    if table_path.suffix == ".parquet":
        frame = pd.read_parquet(table_path)
    else:
        def keep_aside(fields: list[str]) -> None:
            malformed_rows.append(fields)
            return None

        # One bad row must not fail the whole read: undecodable bytes are kept as surrogates and
        # rows with extra fields set aside. QUOTE_NONE keeps quotes inside TSV captions verbatim;
        # na_filter=False keeps "NA", "NaN" and "null" as the text they are.
        frame = pd.read_csv(
            table_path,
            sep="\t" if table_path.suffix == ".tsv" else ",",
            quoting=csv.QUOTE_NONE if table_path.suffix == ".tsv" else csv.QUOTE_MINIMAL,
            dtype=object,  # Arrow-backed strings cannot hold the surrogates of non-UTF-8 bytes
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            encoding_errors="surrogateescape",
            on_bad_lines=keep_aside,
            engine="python",
        )

    expected = [image_column, caption_column]
    missing = [column for column in expected if column not in frame.columns]
    if missing:
        found = [str(column) for column in frame.columns]
        raise ValueError(
            f"{table_path}: expected columns {expected} (missing {missing}), found columns {found}"
        )

    images = [_as_text(value) for value in frame[image_column]]
    captions = [_as_text(value) for value in frame[caption_column]]
    drop_reasons: Counter[str] = Counter()
    if require_caption:
        if malformed_rows:
            drop_reasons["malformed row"] = len(malformed_rows)
    else:
        image_field = list(frame.columns).index(image_column)
        for fields in malformed_rows:
            images.append(_as_text(fields[image_field]) if image_field < len(fields) else "")
            captions.append("")
    dataset_dir = os.path.abspath(dataset_path)
    kept_images, kept_captions = [], []
    for image, caption in zip(images, captions):
        if not image:
            drop_reasons["empty image path"] += 1
        elif require_caption and _has_undecodable_bytes(caption):
            drop_reasons["non-utf8 caption"] += 1
        elif require_caption and not caption:
            drop_reasons["empty caption"] += 1
        else:
            kept_images.append(os.path.join(dataset_dir, os.path.expanduser(image)))
            kept_captions.append(caption)

    for reason, count in drop_reasons.items():
        if report is not None:
            report.add(reason, table_path, count=count)
        else:
            logger.warning("skipped, %s (%d rows): %s", reason, count, table_path)
    return pd.DataFrame({"image": kept_images, "caption": kept_captions}, dtype=object)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _looks_like_image(head: bytes) -> bool:
    is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return is_webp or any(head.startswith(signature) for signature in _IMAGE_SIGNATURES)


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float greyscale image into 0..255 instead of clipping."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    elif image.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0
    elif values.size and values.min() >= 0.0 and values.max() <= 255.0:
        scaled = values
    elif image.mode == "I" and values.size and values.min() >= 0.0 and values.max() <= 65535.0:
        # Pillow has opened 16-bit PNG and TIFF files as mode I, so that range is read as 16 bit.
        scaled = values / 257.0
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha onto white: transparent areas are usually paper, not ink."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        return _on_white(image)
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_8bit(image).convert("RGB")
    return image.convert("RGB")


def decode_image(file: BinaryIO, name: str | os.PathLike, report: DataReport) -> Image.Image | None:
    """Fully decode an open binary file into RGB, or return None and record why under `name`.

    Shared by files on disk (`load_image`) and tar members held in memory (webdataset shards).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                report.add("decompression bomb", name)
                return None
            # Image.open only reads the header; load() decodes everything, which is where a
            # truncated file shows itself. Animated images stay on their first frame.
            image.load()
            animated = getattr(image, "is_animated", False)
            source_mode = image.mode
            try:
                rgb = image if source_mode == "RGB" else _to_rgb(image)
            except ValueError:  # Pillow has no direct route to RGB from a few modes, e.g. LAB
                report.add(f"unsupported mode {source_mode}", name)
                return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        report.add("decompression bomb", name)
        return None
    except UnidentifiedImageError:
        file.seek(0)
        report.add("corrupt image" if _looks_like_image(file.read(16)) else "not an image", name)
        return None
    except PermissionError:
        report.add("unreadable file", name)
        return None
    except Exception:  # any decoder failure means only this one file is unusable
        report.add("corrupt image", name)
        return None

    if source_mode != "RGB":
        report.add_conversion(source_mode, name)
    if animated:
        report.add_conversion("animation to first frame", name)
    try:
        # Phone photos store their rotation in EXIF; a bad EXIF block is not worth a skip.
        rgb = ImageOps.exif_transpose(rgb)
    except Exception:
        pass
    return rgb


def load_image(path: str | os.PathLike, report: DataReport | None = None) -> Image.Image | None:
    """Decode an image file fully into RGB, or return None and record why in `report`.

    Never raises for a bad file: missing, empty, unreadable, corrupt or truncated files, files
    that are not images, and decompression bombs are all reported and skipped.
    """
    report = report if report is not None else DataReport()
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        report.add("missing file", path)
        return None
    except OSError:
        report.add("unreadable file", path)
        return None
    if not os.path.isfile(path):
        report.add("missing file", path)
        return None
    if size == 0:
        report.add("empty file", path)
        return None
    try:
        with open(path, "rb") as file:
            return decode_image(file, path, report)
    except OSError:
        report.add("unreadable file", path)
        return None


# ---------------------------------------------------------------------------------------------
# Datasets and batches
# ---------------------------------------------------------------------------------------------

Tokenizer = Callable[[list[str]], torch.Tensor]
ImageTransform = Callable[[Image.Image], torch.Tensor]


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
        with seeded_randomness(augment_seed):
            image, item_counts = _load_for_item(image_path, self.image_transform)
        if image is None:
            return _skip_marker(image_path, item_counts)
        return {
            "image": image,
            "tokens": self.tokenizer([caption])[0],
            "caption": caption,
            "image_path": image_path,
            "report": item_counts,
        }


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
