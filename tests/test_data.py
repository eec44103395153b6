"""Tests for dataset tables, robust image loading, the datasets and their collate functions."""
import io
import logging
import os
import pickle
import struct
import zlib
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from clipsearch import images
from clipsearch.data import DataReport, load_image, read_table
from clipsearch.datasets import (
    ImageCaptionDataset,
    ImageGroupDataset,
    WordDropout,
    collate_groups,
    collate_pairs,
)

TOKEN_LENGTH = 8
image_transform = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """Characters to ids, padded with 0 or cut to TOKEN_LENGTH."""
    tokens = torch.zeros(len(texts), TOKEN_LENGTH, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [ord(char) % 1000 + 1 for char in text[:TOKEN_LENGTH]]
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def save_rgb(path, colour=(200, 30, 30), size=(6, 5)):
    Image.new("RGB", size, colour).save(path)
    return path


def noisy_jpeg_bytes(size=64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_claiming_size(path, width, height):
    """A real 1x1 PNG whose header claims width x height, so only the header is ever read."""
    Image.new("RGB", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    # IHDR data starts after the 8-byte signature, 4-byte length and 4-byte type.
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def make_bad_files(folder):
    """One file per failure kind, mapped to the reason load_image must report."""
    truncated = noisy_jpeg_bytes()
    (folder / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (folder / "notes.jpg").write_text("this is a text file, not a photo\n")
    (folder / "zero.png").write_bytes(b"")
    png_claiming_size(folder / "bomb.png", 30_000, 30_000)
    return {
        folder / "missing.jpg": "missing file",
        folder / "zero.png": "empty file",
        folder / "truncated.jpg": "truncated image",
        folder / "corrupt.jpg": "corrupt image",
        folder / "corrupt.png": "corrupt image",
        folder / "notes.jpg": "not an image",
        folder / "bomb.png": "decompression bomb",
    }


# ---------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------


def test_load_image_reads_rgb(tmp_path):
    image = load_image(save_rgb(tmp_path / "ok.png"))
    assert image.mode == "RGB" and image.size == (6, 5)
    assert image.getpixel((0, 0)) == (200, 30, 30)


def test_load_image_skips_each_kind_of_bad_file(tmp_path, caplog):
    expected = make_bad_files(tmp_path)
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="clipsearch.data"):
        for path, reason in expected.items():
            before = report.counts[reason]
            assert load_image(path, report) is None, path
            assert report.counts[reason] == before + 1, (path, report)
    assert report.as_dict() == dict(Counter(expected.values()))
    assert report.total_skipped() == len(expected)
    # Every skip is logged with the file it concerns.
    for path in expected:
        assert str(path) in caplog.text


def test_truncated_jpeg_is_not_silently_accepted(tmp_path):
    full = noisy_jpeg_bytes()
    (tmp_path / "full.jpg").write_bytes(full)
    (tmp_path / "cut.jpg").write_bytes(full[:-200])
    assert load_image(tmp_path / "full.jpg") is not None
    assert load_image(tmp_path / "cut.jpg") is None


def test_decompression_bomb_between_pillow_warning_and_error(tmp_path):
    # 100 M pixels: above Pillow's warning threshold, below its hard error.
    report = DataReport()
    assert load_image(png_claiming_size(tmp_path / "big.png", 10_000, 10_000), report) is None
    assert report.as_dict() == {"decompression bomb": 1}


def test_decompression_bomb_uses_module_limit(tmp_path, monkeypatch):
    path = save_rgb(tmp_path / "ok.png", size=(20, 20))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)
    report = DataReport()
    assert load_image(path, report) is None
    assert report.as_dict() == {"decompression bomb": 1}
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 400)
    assert load_image(path) is not None


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    if transparent:
        image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "name, build, corner_pixel, centre_pixel",
    [
        ("grey.png", lambda: Image.new("L", (4, 4), 100), (100, 100, 100), (100, 100, 100)),
        ("grey_alpha.png", lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255), (255, 255, 255)),
        ("palette.png", lambda: _palette_image(False), (0, 0, 0), (10, 200, 30)),
        ("palette_transparent.png", lambda: _palette_image(True), (255, 255, 255), (10, 200, 30)),
        ("rgba_clear.png", lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255), (255, 255, 255)),
        ("rgba_solid.png", lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30), (10, 20, 30)),
        ("rgba_half.png", lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127), (127, 127, 127)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (255, 0, 0), (255, 0, 0)),
        ("deep.png", lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255), (255, 255, 255)),
        ("deep_mid.png", lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128), (128, 128, 128)),
        ("int32.tiff", lambda: Image.fromarray(np.full((4, 4), 65535, np.int32)), (255, 255, 255), (255, 255, 255)),
        ("float.tiff", lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128), (128, 128, 128)),
    ],
)
def test_load_image_converts_modes_to_rgb(tmp_path, name, build, corner_pixel, centre_pixel):
    source = build()
    source.save(tmp_path / name)
    report = DataReport()
    image = load_image(tmp_path / name, report)
    assert image is not None and image.mode == "RGB"
    assert np.allclose(image.getpixel((0, 0)), corner_pixel, atol=3), image.getpixel((0, 0))
    assert np.allclose(image.getpixel((2, 2)), centre_pixel, atol=3), image.getpixel((2, 2))
    assert report.total_skipped() == 0
    assert report.conversions() == {f"converted {Image.open(tmp_path / name).mode}": 1}


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257, 25700, 65535]], dtype=np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = load_image(tmp_path / "ramp.png")
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 100, 255]


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    report = DataReport()
    image = load_image(tmp_path / "anim.gif", report)
    assert image.mode == "RGB"
    assert np.allclose(image.getpixel((1, 1)), (255, 0, 0), atol=3)
    assert report.conversions()["converted animation to first frame"] == 1


# ---------------------------------------------------------------------------------------------
# DataReport
# ---------------------------------------------------------------------------------------------


def test_report_merges_pickles_and_summarises():
    report = DataReport()
    report.add("missing file", "a.jpg")
    report.add("missing file", "b.jpg")
    report.add_conversion("CMYK", "c.jpg")
    restored = pickle.loads(pickle.dumps(report))
    assert restored == report
    restored.merge({"corrupt image": 2, "converted L": 1}).merge(DataReport({"missing file": 1}))
    assert restored.as_dict() == {
        "converted CMYK": 1,
        "converted L": 1,
        "corrupt image": 2,
        "missing file": 3,
    }
    assert restored.total_skipped() == 5
    summary = restored.summary()
    assert "skipped 5 items" in summary and "3 missing file" in summary and "1 converted CMYK" in summary
    assert DataReport().summary() == "skipped 0 items"


# ---------------------------------------------------------------------------------------------
# read_table
# ---------------------------------------------------------------------------------------------


def test_read_tsv_resolves_paths_strips_and_keeps_quotes(tmp_path):
    (tmp_path / "train.tsv").write_text(
        "image\tcaption\textra\n"
        'a.jpg\t  a "quoted" dog  \tx\n'
        "/abs/b.jpg\tit's a cat\ty\n",
        encoding="utf-8",
    )
    table = read_table(tmp_path, "train")
    assert list(table.columns) == ["image", "caption"]
    assert table["image"].tolist() == [str(tmp_path / "a.jpg"), "/abs/b.jpg"]
    assert table["caption"].tolist() == ['a "quoted" dog', "it's a cat"]


HOSTILE_ROWS = [
    b"image\tcaption",
    b"a.jpg\tgood one",
    b"b.jpg\t",
    b"c.jpg\t   ",
    b"d.jpg\tNaN",
    b"e.jpg",
    b"f.jpg\tcaf\xe9 latin-1",
    b"g.jpg\tbroken \xff\xfe bytes",
    b"h.jpg\tgood two",
    b"i.jpg\tone\ttoo many fields",
    b"j.jpg\tNA",
    b"k.jpg\tnull",
    b"l.jpg\tN/A",
    b"caf\xe9.jpg\tlatin-1 file name",
    b"\tno image",
]


def test_read_tsv_drops_bad_captions_and_counts_them(tmp_path, caplog):
    (tmp_path / "dev.tsv").write_bytes(b"\n".join(HOSTILE_ROWS) + b"\n")
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="clipsearch.data"):
        table = read_table(tmp_path, "dev", report=report)
    # "NaN", "NA", "null" and "N/A" are words someone wrote, not missing values.
    assert table["caption"].tolist() == ["good one", "NaN", "good two", "NA", "null", "N/A", "latin-1 file name"]
    assert report.as_dict() == {"empty caption": 3, "non-utf8 caption": 2, "malformed row": 1, "empty image path": 1}
    assert "non-utf8 caption" in caplog.text and "dev.tsv" in caplog.text
    # A file name that is not UTF-8 keeps its bytes, so it still opens.
    assert table["image"].iloc[-1] == os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg")


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_na_strings_stay_captions_in_tsv_and_csv(tmp_path, suffix):
    separator = "\t" if suffix == ".tsv" else ","
    words = ["NA", "NaN", "null", "N/A", "nan", "None", "#N/A", "-NaN"]
    (tmp_path / f"train{suffix}").write_text(
        f"image{separator}caption\n" + "".join(f"{index}.jpg{separator}{word}\n" for index, word in enumerate(words))
    )
    assert read_table(tmp_path, "train")["caption"].tolist() == words


def test_encoding_lists_every_image_of_a_table_whatever_its_caption(tmp_path):
    """Encoding needs no caption: empty, NA-like, non-UTF-8 captions and malformed rows keep their image."""
    from clipsearch.encoding.reader import collect_image_paths

    (tmp_path / "train.tsv").write_bytes(b"\n".join(HOSTILE_ROWS) + b"\n")
    listed = collect_image_paths(tmp_path, "train")
    names = [os.fsencode(path).rsplit(b"/", 1)[1] for path in listed]
    expected = [f"{letter}.jpg".encode() for letter in "abcdefghijkl"] + [b"caf\xe9.jpg"]
    assert sorted(names) == sorted(expected)


def test_read_table_names_columns_found_and_expected(tmp_path):
    (tmp_path / "train.tsv").write_text("filepath\ttext\na.jpg\thello\n")
    with pytest.raises(ValueError) as error:
        read_table(tmp_path, "train")
    message = str(error.value)
    assert "filepath" in message and "text" in message
    assert "image" in message and "caption" in message
    table = read_table(tmp_path, "train", image_column="filepath", caption_column="text")
    assert table["caption"].tolist() == ["hello"]


def test_missing_table_names_paths_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_table(tmp_path, "test")
    for extension in (".tsv", ".csv", ".parquet"):
        assert str(tmp_path / f"test{extension}") in str(error.value)


def test_read_csv_with_quoted_commas(tmp_path):
    (tmp_path / "train.csv").write_text(
        'image,caption\na.jpg,"a dog, running"\nb.jpg,\nc.jpg,"she said ""hi"""\n', encoding="utf-8"
    )
    report = DataReport()
    table = read_table(tmp_path, "train", report=report)
    assert table["caption"].tolist() == ["a dog, running", 'she said "hi"']
    assert report.as_dict() == {"empty caption": 1}


def test_read_parquet_and_tsv_takes_precedence(tmp_path):
    frame = pd.DataFrame({"image": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "caption": ["x", None, " ", " y "]})
    frame.to_parquet(tmp_path / "train.parquet")
    report = DataReport()
    table = read_table(tmp_path, "train", report=report)
    assert table["caption"].tolist() == ["x", "y"]
    assert table["image"].tolist() == [str(tmp_path / "a.jpg"), str(tmp_path / "d.jpg")]
    assert report.as_dict() == {"empty caption": 2}
    (tmp_path / "train.tsv").write_text("image\tcaption\nz.jpg\tfrom tsv\n")
    assert read_table(tmp_path, "train")["caption"].tolist() == ["from tsv"]


# ---------------------------------------------------------------------------------------------
# Datasets and batches
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path):
    """Five good images (one CMYK) and the bad files, in a table with two captions per image."""
    good = [save_rgb(tmp_path / f"good{index}.png", colour=(index * 40, 0, 0)) for index in range(4)]
    Image.new("CMYK", (6, 5), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    good.append(tmp_path / "cmyk.jpg")
    bad = make_bad_files(tmp_path)
    paths = good[:2] + list(bad) + good[2:]
    lines = ["image\tcaption"]
    for path in paths:
        lines += [f"{path.name}\tfirst caption of {path.stem}", f"{path.name}\tsecond caption of {path.stem}"]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path, good, bad


def test_group_dataset_groups_captions_by_image(tmp_path):
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.png")
    (tmp_path / "dev.tsv").write_text("image\tcaption\nb.png\tb1\na.png\ta1\nb.png\tb2\na.png\ta2\nb.png\tb3\n")
    dataset = ImageGroupDataset(read_table(tmp_path, "dev"), image_transform, fake_tokenizer)
    assert dataset.image_paths == [str(tmp_path / "b.png"), str(tmp_path / "a.png")]
    assert dataset.captions == [["b1", "b2", "b3"], ["a1", "a2"]]
    item = dataset[0]
    assert item["tokens"].shape == (3, TOKEN_LENGTH) and item["tokens"].dtype == torch.long
    assert item["image"].shape == (3, 8, 8)
    assert item["image_id"] == 0 and item["captions"] == ["b1", "b2", "b3"]


def test_pair_dataset_item_and_skip_marker(mixed_folder):
    folder, _, _ = mixed_folder
    dataset = ImageCaptionDataset(read_table(folder, "train"), image_transform, fake_tokenizer)
    item = dataset[0]
    assert item["image"].shape == (3, 8, 8)
    assert torch.equal(item["tokens"], fake_tokenizer(["first caption of good0"])[0])
    assert item["caption"] == "first caption of good0"
    assert dataset[4]["skipped"] == "missing file"


def test_several_captions_per_image_are_drawn_by_the_draw_and_collated_with_their_image(tmp_path):
    for name in ("a", "b", "c"):
        save_rgb(tmp_path / f"{name}.png")
    rows = [("a.png", f"a{i}") for i in range(5)] + [("b.png", "b0")] + [("c.png", f"c{i}") for i in range(3)]
    (tmp_path / "train.tsv").write_text("image\tcaption\n" + "".join(f"{image}\t{caption}\n" for image, caption in rows))
    table = read_table(tmp_path, "train")
    dataset = ImageCaptionDataset(table, image_transform, fake_tokenizer, captions_per_image=3)
    assert len(dataset) == 3  # one item per image, not per row
    item = dataset[0, 1234]
    assert item["tokens"].shape == (3, TOKEN_LENGTH) and len(set(item["captions"])) == 3
    assert set(item["captions"]) <= {f"a{i}" for i in range(5)}
    assert torch.equal(item["tokens"], fake_tokenizer(item["captions"]))
    torch.rand(100)  # the captions are a function of the draw, as the crop is: a resumed run reads the same
    assert dataset[0, 1234]["captions"] == item["captions"]
    assert len({tuple(dataset[0, seed]["captions"]) for seed in range(30)}) > 5  # over draws, all of them
    assert dataset[1, 7]["captions"] == ["b0"]  # fewer than asked for: all it has
    batch = collate_pairs([dataset[index, 7] for index in range(3)])
    assert batch["images"].shape[0] == 3 and batch["tokens"].shape == (7, TOKEN_LENGTH)
    assert batch["caption_images"].tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert batch["captions"][3] == "b0"
    pairs = collate_pairs([ImageCaptionDataset(table, image_transform, fake_tokenizer)[index] for index in range(3)])
    assert pairs["caption_images"].tolist() == [0, 1, 2] and pairs["tokens"].shape == (3, TOKEN_LENGTH)
    with pytest.raises(ValueError, match="at least 1"):
        ImageCaptionDataset(table, image_transform, fake_tokenizer, captions_per_image=0)


def test_word_dropout_drops_words_keeps_one_and_repeats_for_the_same_draw(mixed_folder):
    caption = "a black dog runs through the tall green grass"
    words = caption.split()
    dropout = WordDropout(fake_tokenizer, 0.5)
    torch.manual_seed(0)
    dropped = [dropout.drop_words(caption).split() for _ in range(200)]
    assert all(kept and all(word in words for word in kept) for kept in dropped)
    assert 0.4 < sum(map(len, dropped)) / (200 * len(words)) < 0.6
    assert {dropout.drop_words("dog") for _ in range(10)} == {"dog"}  # one word: nothing to drop
    assert all(WordDropout(fake_tokenizer, 0.99).drop_words(caption) in words for _ in range(20))
    assert WordDropout(fake_tokenizer, 0.0).drop_words(caption) == caption
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WordDropout(fake_tokenizer, 1.0)
    # In a training set, the words dropped are a function of the draw (index, augmentation seed),
    # whatever the global generator did before: a resumed run reads the captions it read before.
    def word_ids(texts: list[str]) -> torch.Tensor:
        tokens = torch.zeros(len(texts), len(words), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens[row, : len(text.split())] = torch.tensor([words.index(word) + 1 for word in text.split()])
        return tokens

    folder, _, _ = mixed_folder
    table = read_table(folder, "train")
    table["caption"] = caption
    dataset = ImageCaptionDataset(table, image_transform, WordDropout(word_ids, 0.5))
    first = dataset[0, 1234]["tokens"]
    torch.rand(100)
    assert torch.equal(dataset[0, 1234]["tokens"], first)
    draws = {tuple(dataset[0, seed]["tokens"].tolist()) for seed in range(20)}
    assert len(draws) > 15 and not torch.equal(first, word_ids([caption])[0])


def test_collate_pairs_drops_bad_items_through_dataloader(mixed_folder):
    folder, good, bad = mixed_folder
    dataset = ImageCaptionDataset(read_table(folder, "train"), image_transform, fake_tokenizer)
    loader = DataLoader(dataset, batch_size=4, num_workers=0, collate_fn=collate_pairs)
    report, kept_paths = DataReport(), []
    for batch in loader:
        count = len(batch["image_paths"])
        if count:
            assert batch["images"].shape == (count, 3, 8, 8)
            assert batch["tokens"].shape == (count, TOKEN_LENGTH)
            assert len(batch["captions"]) == count
        report.merge(batch["skipped"]).merge(batch["conversions"])
        kept_paths += batch["image_paths"]
    assert kept_paths == [str(path) for path in good for _ in range(2)]
    assert report.skipped() == {reason: 2 * count for reason, count in Counter(bad.values()).items()}
    assert report.conversions() == {"converted CMYK": 2}


def test_collate_groups_through_dataloader_with_two_workers(mixed_folder):
    folder, good, bad = mixed_folder
    dataset = ImageGroupDataset(read_table(folder, "train"), image_transform, fake_tokenizer)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_groups)
    report, image_ids, caption_image_ids, captions = DataReport(), [], [], []
    for batch in loader:
        count = len(batch["image_paths"])
        assert batch["tokens"].shape[0] == len(batch["captions"]) == len(batch["caption_image_ids"])
        if count:
            assert batch["images"].shape == (count, 3, 8, 8)
            assert batch["tokens"].shape[1] == TOKEN_LENGTH
        report.merge(batch["skipped"])
        image_ids += batch["image_ids"].tolist()
        caption_image_ids += batch["caption_image_ids"].tolist()
        captions += batch["captions"]
    good_ids = [dataset.image_paths.index(str(path)) for path in good]
    assert image_ids == good_ids
    assert caption_image_ids == [image_id for image_id in good_ids for _ in range(2)]
    for image_id, caption in zip(caption_image_ids, captions):
        assert caption in dataset.captions[image_id]
    assert report.as_dict() == dict(Counter(bad.values()))


def test_all_skipped_batch_still_collates(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "train.tsv").write_text("image\tcaption\nzero.png\tx\nmissing.png\ty\n")
    table = read_table(tmp_path, "train")
    pairs = collate_pairs([ImageCaptionDataset(table, image_transform, fake_tokenizer)[i] for i in range(2)])
    assert pairs["image_paths"] == [] and pairs["images"].numel() == 0
    assert pairs["skipped"] == {"empty file": 1, "missing file": 1}
    groups = collate_groups([ImageGroupDataset(table, image_transform, fake_tokenizer)[i] for i in range(2)])
    assert groups["image_paths"] == [] and groups["caption_image_ids"].numel() == 0
    assert groups["skipped"] == {"empty file": 1, "missing file": 1}
