"""The one image decoder: upright pixels for every mode, upload limits, reduced-scale thumbnails, safe names."""
from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from clipsearch.images import SkipReasons, decode_image, display_path, load_image

ORIENTATION = 0x0112


def left_red_right_blue(size=(80, 40)) -> Image.Image:
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), (0, 0, 255)), (size[0] // 2, 0))
    return image


def with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


@pytest.mark.parametrize("mode, file_format", [("RGB", "JPEG"), ("RGBA", "PNG"), ("L", "PNG")])
def test_exif_orientation_is_applied_before_any_conversion(tmp_path, mode, file_format):
    path = tmp_path / f"turned.{file_format.lower()}"
    left_red_right_blue().convert(mode).save(path, format=file_format, exif=with_orientation(6))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 80)  # "rotate 90 clockwise": landscape becomes portrait
    top, bottom = image.getpixel((20, 5)), image.getpixel((20, 75))
    if mode == "L":
        assert top != bottom
    else:
        assert top[0] > 200 and top[2] < 60  # the red half is now on top
        assert bottom[2] > 200 and bottom[0] < 60


def test_bad_exif_block_keeps_the_image(tmp_path):
    path = tmp_path / "bad_exif.jpg"
    left_red_right_blue().save(path, exif=with_orientation(99))
    assert load_image(path).size == (80, 40)


def test_upload_options_limit_formats_and_pixels(tmp_path):
    tiff = io.BytesIO()
    left_red_right_blue().save(tiff, format="TIFF")
    reasons = SkipReasons(log=False)
    assert decode_image(io.BytesIO(tiff.getvalue()), "upload", reasons, formats=("PNG", "JPEG")) is None
    assert reasons.reason == "not an image"
    assert decode_image(io.BytesIO(tiff.getvalue()), "upload", SkipReasons(log=False)) is not None

    reasons = SkipReasons(log=False)
    png = io.BytesIO()
    left_red_right_blue().save(png, format="PNG")
    assert decode_image(io.BytesIO(png.getvalue()), "upload", reasons, max_pixels=80 * 40 - 1) is None
    assert reasons.reason == "decompression bomb"


def test_draft_size_decodes_a_large_jpeg_at_reduced_scale_still_upright(tmp_path):
    path = tmp_path / "large.jpg"
    left_red_right_blue((2000, 1000)).save(path, exif=with_orientation(6), quality=90)
    full, drafted = load_image(path), load_image(path, draft_size=200)
    assert full.size == (1000, 2000)
    assert drafted.width < full.width and min(drafted.size) >= 200
    assert drafted.size[1] > drafted.size[0]  # still portrait: turned after the reduced decode


def test_modes_decode_to_rgb_without_losing_contrast(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16)[None, :].repeat(8, axis=0) * 1040).astype("<u2")
    Image.fromarray(ramp).save(tmp_path / "sixteen.png")
    image = load_image(tmp_path / "sixteen.png")
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() > 240  # scaled from 16 bits, not clipped to white

    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    transparent.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((5, 5)) == (255, 255, 255)  # on white, not black


def test_missing_file_is_logged_and_counted(tmp_path, caplog):
    reasons = SkipReasons()
    with caplog.at_level(logging.WARNING, logger="clipsearch.images"):
        assert load_image(tmp_path / "gone.png", reasons) is None
    assert reasons.reasons == ["missing file"] and "gone.png" in caplog.text


def test_display_path_escapes_bytes_that_are_not_utf8():
    raw = os.fsdecode(b"/photos/caf\xe9.png")
    assert display_path(raw) == "/photos/caf\\xe9.png"
    assert display_path(b"/photos/caf\xe9.png") == "/photos/caf\\xe9.png"
    assert display_path("/photos/café ☕.png") == "/photos/café ☕.png"
    display_path(raw).encode("utf-8")  # never raises
