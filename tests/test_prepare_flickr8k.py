"""Tests for the Flickr8k preparation script on a tiny synthetic copy of the official layout."""
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.data import read_table

SCRIPT = Path(__file__).resolve().parents[1] / "dataset" / "flickr8k" / "prepare.py"


@pytest.fixture(scope="module")
def prepare_module():
    spec = importlib.util.spec_from_file_location("flickr8k_prepare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_flickr8k(tmp_path):
    """Four images on disk, one listed image missing, a stray token image, an empty caption, no test split."""
    source = tmp_path / "flickr8k"
    images = source / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    for index, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
        Image.new("RGB", (12, 10), (40 * index, 90, 200 - 40 * index)).save(images / name)
    token_lines = [
        "a.jpg#0\tA dog runs .",
        "a.jpg#1\tA brown dog\truns on grass .",
        "b.jpg#0\tTwo children play .",
        "b.jpg#1\t   ",
        "c.jpg#0\tA red car .",
        "d.jpg#0\tA boat on a lake .",
        "gone.jpg#0\tThis photo is missing .",
        "stray.jpg.1#0\tAn image in no split .",
    ]
    (source / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n", encoding="utf-8")
    (source / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\ngone.jpg\n", encoding="utf-8")
    (source / "Flickr_8k.devImages.txt").write_text("c.jpg\n", encoding="utf-8")
    return source


def test_writes_official_splits_with_absolute_paths(prepare_module, fake_flickr8k, tmp_path):
    out = tmp_path / "out"
    summary = prepare_module.main(["--source", str(fake_flickr8k), "--out", str(out)])

    assert sorted(path.name for path in out.iterdir()) == ["dev.tsv", "train.tsv"]
    train = read_table(out, "train")
    assert list(train["caption"]) == ["A dog runs .", "A brown dog runs on grass .", "Two children play ."]
    assert all(Path(image).is_absolute() and Path(image).is_file() for image in train["image"])
    assert Path(train["image"][0]) == fake_flickr8k.resolve() / "Flicker8k_Dataset" / "a.jpg"
    dev = read_table(out, "dev")
    assert list(dev["caption"]) == ["A red car ."]

    assert summary["splits"]["train"] == {
        "images": 2, "captions": 3, "listed": 3, "missing_files": 1, "without_captions": 0,
    }
    assert summary["splits"]["dev"]["images"] == 1
    assert "test" not in summary["splits"]
    # d.jpg and the stray token name are captioned but listed in no split.
    assert summary["captioned_images_in_no_split"] == 2
    assert summary["empty_captions"] == 1


def test_test_split_is_written_when_listed(prepare_module, fake_flickr8k, tmp_path):
    (fake_flickr8k / "Flickr_8k.testImages.txt").write_text("d.jpg\n", encoding="utf-8")
    summary = prepare_module.prepare(fake_flickr8k, tmp_path / "out")
    assert list(read_table(tmp_path / "out", "test")["caption"]) == ["A boat on a lake ."]
    assert summary["captioned_images_in_no_split"] == 1


def test_missing_token_file_is_a_clear_error(prepare_module, fake_flickr8k, tmp_path):
    (fake_flickr8k / "Flickr8k.token.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        prepare_module.prepare(fake_flickr8k, tmp_path / "out")
