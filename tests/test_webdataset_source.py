"""Tests for streaming training pairs from webdataset tar shards through a real DataLoader."""
import io
import json
import tarfile

import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from clipsearch.data import DataReport
from clipsearch.datasets import ImageCaptionDataset, collate_pairs
from clipsearch.tables import is_webdataset_path
from clipsearch.webdataset_source import expand_shards, make_webdataset

TOKEN_LENGTH = 6
image_transform = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


def char_tokenizer(texts):
    tokens = torch.zeros(len(texts), TOKEN_LENGTH, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [ord(char) for char in text[:TOKEN_LENGTH]]
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def image_bytes(colour, image_format="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format=image_format)
    return buffer.getvalue()


def add_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards=3, per_shard=3, corrupt_key="000000004"):
    """img2dataset-style shards: `<key>.jpg` (one png), `<key>.txt`, `<key>.json`; one corrupt jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = {}
    for shard in range(num_shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for index in range(per_shard):
                number = shard * per_shard + index
                key = f"{number:09d}"
                extension = "png" if number == 2 else "jpg"
                data = image_bytes((20 * number, 100, 200), "PNG" if extension == "png" else "JPEG")
                if key == corrupt_key:
                    data = data[:40]
                caption = f"photo {number}"
                add_member(archive, f"{key}.{extension}", data)
                add_member(archive, f"{key}.txt", caption.encode())
                add_member(archive, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                samples[f"{folder / f'{shard:05d}.tar'}/{key}"] = (extension, data, caption)
    return samples


def test_recognises_shard_paths(tmp_path):
    write_shards(tmp_path / "shards", num_shards=1)
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "train.tsv").write_text("image\tcaption\n")
    assert is_webdataset_path(tmp_path / "shards")
    assert is_webdataset_path(tmp_path / "shards" / "00000.tar")
    assert is_webdataset_path("data/shards/{00000..00009}.tar")
    assert not is_webdataset_path(tmp_path / "table")
    assert not is_webdataset_path("dataset/sample")
    assert expand_shards("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    with pytest.raises(ValueError, match="no .tar shards"):
        expand_shards(tmp_path / "table")


def test_dataloader_workers_read_every_sample_once_and_count_the_corrupt_one(tmp_path):
    samples = write_shards(tmp_path / "shards")
    dataset = make_webdataset(tmp_path / "shards", image_transform, char_tokenizer, shuffle_buffer=4)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_pairs)
    seen, report = [], DataReport()
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 8, 8) or not batch["image_paths"]
        seen += batch["image_paths"]
        report.merge(batch["skipped"])
        report.merge(batch["conversions"])
    assert len(seen) == len(set(seen)) == 8
    corrupt = f"{tmp_path / 'shards' / '00001.tar'}/000000004"
    assert set(seen) == set(samples) - {corrupt}
    assert report.skipped() == {"corrupt image": 1}


def test_items_match_the_map_style_dataset(tmp_path):
    samples = write_shards(tmp_path / "shards", num_shards=1)
    streamed = list(make_webdataset(tmp_path / "shards", image_transform, char_tokenizer, shuffle_buffer=0))
    files = []
    for index, (extension, data, _) in enumerate(samples.values()):
        files.append(tmp_path / f"{index}.{extension}")
        files[-1].write_bytes(data)
    table = pd.DataFrame({"image": [str(path) for path in files], "caption": [s[2] for s in samples.values()]})
    mapped = [ImageCaptionDataset(table, image_transform, char_tokenizer)[index] for index in range(len(table))]
    for from_stream, from_table, image_path in zip(streamed, mapped, samples):
        assert from_stream.keys() == from_table.keys()
        assert from_stream["image_path"] == image_path
        assert torch.equal(from_stream["image"], from_table["image"])
        assert torch.equal(from_stream["tokens"], from_table["tokens"])
        assert from_stream["caption"] == from_table["caption"]
        assert from_stream["report"] == from_table["report"]


def test_shards_are_split_across_ranks(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", corrupt_key=None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    paths = [item["image_path"] for item in make_webdataset(tmp_path / "shards", image_transform, char_tokenizer, 0)]
    assert {path.split(".tar/")[0][-5:] for path in paths} == {"00001"}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="3 shards cannot feed 4 ranks"):
        list(make_webdataset(tmp_path / "shards", image_transform, char_tokenizer, 0))


def test_epoch_samples_repeats_to_a_fixed_length(tmp_path):
    write_shards(tmp_path / "shards", num_shards=1, corrupt_key=None)
    dataset = make_webdataset(tmp_path / "shards", image_transform, char_tokenizer, 2, epoch_samples=7)
    assert len(list(dataset)) == 7


def test_truncated_shard_is_counted_and_the_rest_is_read(tmp_path):
    write_shards(tmp_path / "shards", corrupt_key=None)
    broken = tmp_path / "shards" / "00002.tar"
    broken.write_bytes(broken.read_bytes()[:1500])
    report = DataReport()
    items = list(make_webdataset(tmp_path / "shards", image_transform, char_tokenizer, 0, report=report))
    assert len([item for item in items if "skipped" not in item]) == 6
    assert report.as_dict() == {"unreadable shard data": 1}


def test_samples_without_caption_or_image_become_skip_markers(tmp_path):
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as archive:
        add_member(archive, "a.jpg", image_bytes((1, 2, 3)))
        add_member(archive, "b.txt", b"no image here")
        add_member(archive, "c.jpg", image_bytes((1, 2, 3)))
        add_member(archive, "c.txt", b"\xff\xfe not utf-8")
        add_member(archive, "d.webp", image_bytes((9, 9, 9), "WEBP"))
        add_member(archive, "d.txt", "un café".encode())
    items = list(make_webdataset(tmp_path / "shards", image_transform, char_tokenizer, 0))
    assert [item.get("skipped") for item in items] == [
        "no caption in sample", "no image in sample", "non-utf8 caption", None,
    ]
    assert items[3]["caption"] == "un café"
