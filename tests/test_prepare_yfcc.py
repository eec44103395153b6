"""Tests for the YFCC100M subset preparation: text cleaning, URL lists, and tables from img2dataset files."""
import bz2
import csv
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.data import read_table

SCRIPT = Path(__file__).resolve().parents[1] / "dataset" / "yfcc100m" / "prepare.py"


@pytest.fixture(scope="module")
def yfcc():
    spec = importlib.util.spec_from_file_location("yfcc100m_prepare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metadata_line(line_number, photo_id, title, description, marker="0"):
    """One line of the 25-column Multimedia Commons `yfcc100m_dataset` file."""
    fields = [str(line_number), str(photo_id), f"{photo_id:032x}", "12345@N00", "someone",
              "2012-02-16 09:56:37.0", "1331840483", "Canon+PowerShot", title, description,
              "tag1,tag2", "", "", "", "", f"http://www.flickr.com/photos/12345@N00/{photo_id}/",
              f"http://farm8.staticflickr.com/7205/{photo_id}_df77.jpg", "Attribution License",
              "http://creativecommons.org/licenses/by/2.0/", "7205", "8", "df77", "692d", "jpg", marker]
    assert len(fields) == 25
    return "\t".join(fields)


def test_clean_text_decodes_and_strips_markup(yfcc):
    assert yfcc.clean_text("A+red+car") == "A red car"
    assert yfcc.clean_text("Fish+%26amp%3B+chips%3Cbr+%2F%3E%3Cb%3Etoday%3C%2Fb%3E") == "Fish & chips today"
    assert yfcc.clean_text("see+%3Ca+href%3D%22http%3A%2F%2Fx.org%22%3Ehere%3C%2Fa%3E+http%3A%2F%2Fy.org") == "see here"
    assert yfcc.clean_text("I+%26lt%3B3+it") == "I <3 it"
    assert yfcc.clean_text("+%0A%09+") == ""


def test_make_caption_choices(yfcc):
    assert yfcc.make_caption("A red car", "Parked outside") == "A red car. Parked outside"
    assert yfcc.make_caption("Wow!", "Parked outside") == "Wow! Parked outside"
    assert yfcc.make_caption("IMG_0520", "My vacation") == "My vacation"
    assert yfcc.make_caption("Sunset", "Sunset over the bay") == "Sunset over the bay"
    assert yfcc.make_caption("A red car", "Parked outside", "title") == "A red car"
    assert yfcc.make_caption("A red car", "", "description") == ""


def test_split_is_a_stable_hash(yfcc):
    splits = [yfcc.split_of(str(photo_id), 0.3) for photo_id in range(2000)]
    assert 0.25 < splits.count("dev") / len(splits) < 0.35
    assert splits == [yfcc.split_of(str(photo_id), 0.3) for photo_id in range(2000)]
    assert yfcc.split_of("6985418911", 0.0) == "train"


@pytest.fixture
def subset_and_metadata(tmp_path):
    metadata = [
        metadata_line(1, 101, "A+red+car", "Parked+%3Cb%3Eoutside%3C%2Fb%3E+the+shop+%26amp%3B+cafe"),
        metadata_line(2, 102, "IMG_0520", "My+vacation"),
        metadata_line(3, 103, "", "%3Ca+href%3D%22http%3A%2F%2Fx.com%22%3E%3C%2Fa%3E"),
        metadata_line(4, 104, "Not+in+the+subset", ""),
        metadata_line(5, 105, "A+video", "", marker="1"),
    ] + [metadata_line(5 + n, 200 + n, f"Photo+number+{n}", 'She+said+%22hello%22') for n in range(1, 21)]
    metadata_path = tmp_path / "yfcc100m_dataset.bz2"
    metadata_path.write_bytes(bz2.compress(("\n".join(metadata) + "\n").encode()))
    # OpenAI's file: line number, photo id, photo hash; no header. 999 is in no metadata line.
    subset_ids = [(1, 101), (2, 102), (3, 103), (5, 105), (0, 999)] + [(5 + n, 200 + n) for n in range(1, 21)]
    subset_path = tmp_path / "yfcc100m_subset_data.tsv"
    subset_path.write_text("".join(f"{line}\t{pid}\t{pid:032x}\n" for line, pid in subset_ids))
    return subset_path, metadata_path


def read_url_list(path):
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file, delimiter="\t"))


def test_url_lists_join_filter_and_split(yfcc, subset_and_metadata, tmp_path):
    subset_path, metadata_path = subset_and_metadata
    counts = yfcc.main(["urls", "--subset", str(subset_path), "--metadata", str(metadata_path),
                        "--out", str(tmp_path / "urls"), "--dev_fraction", "0.3"])
    rows = read_url_list(tmp_path / "urls" / "train_urls.tsv") + read_url_list(tmp_path / "urls" / "dev_urls.tsv")
    by_id = {row["photoid"]: row for row in rows}
    assert set(by_id) == {"101", "102"} | {str(200 + n) for n in range(1, 21)}
    assert by_id["101"]["caption"] == "A red car. Parked outside the shop & cafe"
    assert by_id["101"]["url"] == "http://farm8.staticflickr.com/7205/101_df77.jpg"
    assert by_id["102"]["caption"] == "My vacation"
    assert by_id["201"]["caption"] == 'Photo number 1. She said "hello"'
    for split in ("train", "dev"):
        for row in read_url_list(tmp_path / "urls" / f"{split}_urls.tsv"):
            assert yfcc.split_of(row["photoid"], 0.3) == split
    assert counts["dev"] > 0 and counts["train"] > 0
    assert counts["empty caption"] == 1 and counts["videos"] == 1
    assert counts["subset ids not in metadata"] == 1


def test_tables_from_img2dataset_files_output(yfcc, tmp_path):
    downloaded = tmp_path / "images"
    shard = downloaded / "00000"
    shard.mkdir(parents=True)
    photo_ids = [str(300 + n) for n in range(12)]
    for index, photo_id in enumerate(photo_ids):
        key = f"{index:09d}"
        Image.new("RGB", (8, 8), (index * 20, 50, 90)).save(shard / f"{key}.jpg")
        if index != 5:
            (shard / f"{key}.txt").write_text(f"caption\tof {photo_id}\n", encoding="utf-8")
        (shard / f"{key}.json").write_text(json.dumps({"key": key, "status": "success", "photoid": photo_id}))
    (downloaded / "00000_stats.json").write_text("{}")

    out = tmp_path / "data"
    counts = yfcc.main(["tables", "--downloaded", str(downloaded), "--out", str(out), "--dev_fraction", "0.4"])
    tables = {split: read_table(out, split) for split in ("train", "dev")}
    assert counts["no caption"] == 1
    assert sum(len(table) for table in tables.values()) == 11
    for split, table in tables.items():
        for image, caption in zip(table["image"], table["caption"]):
            assert Path(image).is_file()
            photo_id = caption.removeprefix("caption of ")
            assert yfcc.split_of(photo_id, 0.4) == split
    assert len(tables["dev"]) > 0 and len(tables["train"]) > 0


def test_missing_inputs_are_rejected(yfcc, tmp_path):
    with pytest.raises(SystemExit):
        yfcc.parse_args(["urls", "--subset", str(tmp_path / "none.tsv"), "--metadata", str(tmp_path / "m")])
