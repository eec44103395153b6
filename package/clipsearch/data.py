"""Robust image loading; tables (`tables.py`) and the report (`data_report.py`) are re-exported here.

Datasets and collate functions live in `datasets.py`.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipsearch.data_report import CONVERSION_PREFIX, DataReport
from clipsearch.tables import TABLE_EXTENSIONS, find_table, read_table

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# Pillow's own default. Pillow's DecompressionBombWarning (raised above its global
# Image.MAX_IMAGE_PIXELS) is treated as a skip too, so lowering this constant tightens the
# limit but raising it above Pillow's setting has no effect.
MAX_IMAGE_PIXELS = 89_478_485


# First bytes of the formats we accept: a file that starts like an image but does not decode is
# "corrupt", anything else that Pillow cannot identify is "not an image".
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


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


__all__ = [
    "CONVERSION_PREFIX", "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "TABLE_EXTENSIONS", "DataReport",
    "decode_image", "find_table", "load_image", "read_table",
]
