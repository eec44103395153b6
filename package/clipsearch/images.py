"""The one image decoder of every path (encoder, CLI, upload, thumbnails, grids), and file names safe to show."""
from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipsearch.tars import split_row_name

logger = logging.getLogger(__name__)

# Pillow's own default. Pillow's DecompressionBombWarning (raised above its global
# Image.MAX_IMAGE_PIXELS) is treated as a skip too, so lowering this constant tightens the
# limit but raising it above Pillow's setting has no effect.
MAX_IMAGE_PIXELS = 89_478_485

# First bytes of the formats we accept: a file that starts like an image but does not decode is
# "corrupt", anything else that Pillow cannot identify is "not an image".
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")

DECOMPRESSION_BOMB = "decompression bomb"
# The one rule for cut files, for the encoder and uploads alike: an image is used only when its file
# holds every pixel its header declares. Pillow refuses most cut files itself; a PNG whose compressed
# stream ends cleanly before the last row it does not, so its pixel data is counted (_png_is_complete).
TRUNCATED_IMAGE = "truncated image"
# Samples per pixel of each PNG colour type (greyscale, RGB, palette, grey+alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_BLOCK = 1 << 20


class ImageReport(Protocol):
    """Where a decode records why it skipped a file, and which conversions it made (clipsearch.data.DataReport)."""

    def add(self, reason: str, path: str | os.PathLike | None = None, count: int = 1) -> None: ...

    def add_conversion(self, mode: str, path: str | os.PathLike | None = None) -> None: ...


class SkipReasons:
    """A report that keeps the skip reasons (and logs them unless `log` is False), for callers with no DataReport."""

    def __init__(self, log: bool = True):
        self.reasons: list[str] = []
        self.log = log

    def add(self, reason: str, path: str | os.PathLike | None = None, count: int = 1) -> None:
        self.reasons.append(reason)
        if self.log:
            logger.warning("skipped, %s%s", reason, f": {display_path(path)}" if path is not None else "")

    def add_conversion(self, mode: str, path: str | os.PathLike | None = None) -> None:
        pass

    @property
    def reason(self) -> str | None:
        return self.reasons[0] if self.reasons else None


def display_path(path: str | os.PathLike | bytes) -> str:
    """A path as printable text: bytes that are not UTF-8 (kept by os.fsdecode as surrogates) become \\xNN.

    Such names are legal on Linux, but JSON, a UTF-8 terminal or a web page cannot carry the raw
    surrogates; the escaped form reads like the name and never fails to encode.
    """
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


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


def _png_raw_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of decompressed pixel data a PNG of this header holds: each row is a filter byte and its samples."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for first_column, first_row, column_step, row_step in passes:
        columns = -(-(width - first_column) // column_step) if width > first_column else 0
        rows = -(-(height - first_row) // row_step) if height > first_row else 0
        if columns and rows:
            total += rows * (1 + -(-(columns * bits_per_pixel) // 8))
    return total


def _png_is_complete(file: BinaryIO) -> bool:
    """Whether a PNG's compressed pixel data holds all the rows its header declares.

    Inflates the IDAT chunks again, in blocks, counting bytes without keeping them: about the
    cost of the inflate Pillow did, paid for PNGs only.
    """
    file.seek(8)
    expected, produced = None, 0
    inflater = zlib.decompressobj()
    while True:
        head = file.read(8)
        if len(head) < 8:
            return False
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IHDR":
            header = file.read(length)
            if len(header) < 13:
                return False
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
            expected = _png_raw_bytes(width, height, depth * _PNG_CHANNELS.get(colour, 4), interlace == 1)
            file.seek(4, os.SEEK_CUR)
        elif kind == b"IDAT" and expected is not None:
            data = file.read(length)
            try:
                produced += len(inflater.decompress(data, _INFLATE_BLOCK))
                while inflater.unconsumed_tail and produced < expected:
                    produced += len(inflater.decompress(inflater.unconsumed_tail, _INFLATE_BLOCK))
            except zlib.error:
                return False
            if produced >= expected:
                return True
            file.seek(4, os.SEEK_CUR)
        elif kind == b"IEND":
            return False
        else:
            file.seek(length + 4, os.SEEK_CUR)


def _turn_upright(image: Image.Image) -> None:
    """Apply the EXIF orientation of phone photos in place, before any conversion can drop the tag."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a bad EXIF block is not worth a skip: keep the image as stored
        pass


def decode_image(
    file: BinaryIO,
    name: str | os.PathLike,
    report: ImageReport,
    *,
    formats: Sequence[str] | None = None,
    max_pixels: int | None = None,
    draft_size: int | None = None,
) -> Image.Image | None:
    """Fully decode an open binary file into upright RGB, or return None and record why under `name`.

    Every path that turns a file into pixels comes here, so an image looks the same to the encoder,
    the CLI's `--image`, a web upload and a thumbnail: alpha on white, 16-bit scaled to 8, EXIF
    orientation applied. `formats` limits the decoders Pillow may try (uploads); `max_pixels`
    tightens the bomb limit; `draft_size` lets a JPEG decode at a reduced scale still at least that
    large (thumbnails only: the encoder and searches by image decode every pixel).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else min(max_pixels, MAX_IMAGE_PIXELS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file, formats=formats)
            width, height = image.size
            if width * height > limit:
                report.add(DECOMPRESSION_BOMB, name)
                return None
            if draft_size is not None:
                image.draft(None, (draft_size, draft_size))
            # Image.open only reads the header; load() decodes everything, which is where a
            # truncated file shows itself. Animated images stay on their first frame.
            image.load()
            if image.format == "PNG" and not _png_is_complete(file):
                report.add(TRUNCATED_IMAGE, name)
                return None
            _turn_upright(image)
            animated = getattr(image, "is_animated", False)
            source_mode = image.mode
            try:
                rgb = image if source_mode == "RGB" else _to_rgb(image)
            except ValueError:  # Pillow has no direct route to RGB from a few modes, e.g. LAB
                report.add(f"unsupported mode {source_mode}", name)
                return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        report.add(DECOMPRESSION_BOMB, name)
        return None
    except UnidentifiedImageError:
        file.seek(0)
        report.add("corrupt image" if _looks_like_image(file.read(16)) else "not an image", name)
        return None
    except PermissionError:
        report.add("unreadable file", name)
        return None
    except Exception as error:  # any decoder failure means only this one file is unusable
        report.add(TRUNCATED_IMAGE if "truncated" in str(error) else "corrupt image", name)
        return None

    if source_mode != "RGB":
        report.add_conversion(source_mode, name)
    if animated:
        report.add_conversion("animation to first frame", name)
    return rgb


def load_image(path: str | os.PathLike, report: ImageReport | None = None, **decode_options) -> Image.Image | None:
    """Decode an image file fully into RGB, or return None and record why in `report`.

    Never raises for a bad file: missing, empty, unreadable, corrupt or truncated files, files
    that are not images, and decompression bombs are all reported and skipped. `decode_options`
    go to `decode_image`.
    """
    report = report if report is not None else SkipReasons()
    if split_row_name(str(path)) is not None and not os.path.isfile(path):
        return _load_tar_member(str(path), report, **decode_options)
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
            return decode_image(file, path, report, **decode_options)
    except OSError:
        report.add("unreadable file", path)
        return None


def _load_tar_member(name: str, report: ImageReport, **decode_options) -> Image.Image | None:
    """`load_image` of a row named `<tar>#<key>`: the sample's image member, read from its tar."""
    from clipsearch.tars import read_member_image

    data = read_member_image(name)
    if not data:
        report.add("missing file" if data is None else "empty file", name)
        return None
    return decode_image(io.BytesIO(data), name, report, **decode_options)


# EXIF tags that date a photo, most telling first: when it was taken, digitised, last written.
_EXIF_IFD = 0x8769
_DATE_TAGS = ((_EXIF_IFD, 0x9003), (_EXIF_IFD, 0x9004), (None, 0x0132))


def capture_date(path: str | os.PathLike) -> str | None:
    """When a photo was taken, from its EXIF (DateTimeOriginal, else DateTimeDigitized, else DateTime), as
    ISO 8601 local camera time ("2023-06-01T10:30:00"); None when the file has no readable date.

    Reads only the file's header; a broken or absent EXIF block is no date, never an error.
    """
    from clipsearch.fields import parse_date

    try:
        with Image.open(path) as image:
            exif = image.getexif()
            for ifd, tag in _DATE_TAGS:
                value = (exif.get_ifd(ifd) if ifd is not None else exif).get(tag)
                if isinstance(value, bytes):
                    value = value.decode("ascii", errors="replace")
                date = parse_date(value.strip("\x00 ")) if isinstance(value, str) else None
                if date is not None:
                    return date
    except Exception:  # noqa: BLE001 - any unreadable header means "no date"
        return None
    return None
