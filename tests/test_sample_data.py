"""Tests for the generated sample dataset: determinism, caching, and captions that match the images."""
import hashlib

import numpy as np
import pytest

from clipsearch.cli.sample_data import main
from clipsearch.data import load_image, read_table
from clipsearch.datasets import ImageGroupDataset
from clipsearch.sample_data import (
    BACKGROUNDS,
    COLOURS,
    COMPLETE_MARKER,
    POSITION_PHRASES,
    SHAPES,
    describe_scene,
    ensure_sample_dataset,
    generate_example,
    sample_scene,
)

SMALL = {"num_train": 12, "num_dev": 5, "image_size": 32, "seed": 3}


def file_hashes(root):
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def modification_times(root):
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


@pytest.fixture
def sample_root(tmp_path):
    return ensure_sample_dataset(tmp_path / "sample", **SMALL)


def test_same_seed_gives_byte_identical_files(tmp_path, sample_root):
    again = ensure_sample_dataset(tmp_path / "again", **SMALL)
    hashes = file_hashes(sample_root)
    assert hashes == file_hashes(again)
    assert len([name for name in hashes if name.endswith(".png")]) == SMALL["num_train"] + SMALL["num_dev"]
    other_seed = ensure_sample_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    assert file_hashes(other_seed)["images/train/000000.png"] != hashes["images/train/000000.png"]


def test_complete_dataset_is_not_regenerated(sample_root):
    before = modification_times(sample_root)
    assert ensure_sample_dataset(sample_root, **SMALL) == sample_root
    assert modification_times(sample_root) == before


def test_missing_marker_triggers_regeneration(sample_root):
    expected = file_hashes(sample_root)
    (sample_root / COMPLETE_MARKER).unlink()
    (sample_root / "images/train/000001.png").write_bytes(b"half-written")
    ensure_sample_dataset(sample_root, **SMALL)
    assert file_hashes(sample_root) == expected


def test_changed_settings_regenerate_and_remove_stale_images(sample_root):
    ensure_sample_dataset(sample_root, **{**SMALL, "num_train": 4})
    assert sorted(path.name for path in (sample_root / "images/train").iterdir()) == [
        f"{index:06d}.png" for index in range(4)
    ]
    assert read_table(sample_root, "train")["image"].nunique() == 4


def test_tables_load_with_several_captions_per_image(sample_root):
    for split, count in (("train", SMALL["num_train"]), ("dev", SMALL["num_dev"])):
        table = read_table(sample_root, split)
        dataset = ImageGroupDataset(table, image_transform=lambda image: image, tokenizer=lambda texts: texts)
        assert len(dataset.image_paths) == count
        assert all(2 <= len(captions) <= 3 for captions in dataset.captions)
        image = load_image(dataset.image_paths[0])
        assert image.mode == "RGB" and image.size == (SMALL["image_size"], SMALL["image_size"])


def test_written_captions_describe_the_generated_scene(sample_root):
    table = read_table(sample_root, "train")
    for index in range(SMALL["num_train"]):
        scene, _, captions = generate_example(SMALL["seed"], "train", index, SMALL["image_size"])
        written = table.loc[table["image"].str.endswith(f"{index:06d}.png"), "caption"].tolist()
        assert written == captions
        for caption in written:
            assert f"{scene.background} background" in caption
            for obj in scene.objects:
                assert f"{obj.size} {obj.colour} {obj.shape}" in caption or (
                    f"{obj.colour} {obj.shape}, {obj.size}" in caption
                )


def test_object_centre_has_the_named_colour():
    checked = 0
    for index in range(40):
        scene, image, _ = generate_example(0, "dev", index, 96)
        pixels = np.asarray(image, dtype=np.float32)
        for obj in scene.objects:
            # Average a 3x3 patch so the added pixel noise does not decide the outcome.
            x, y = round(obj.x * 96), round(obj.y * 96)
            centre = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
            assert np.abs(centre - np.array(COLOURS[obj.colour])).max() < 30, (index, obj)
            checked += 1
    assert checked > 40


def test_scenes_cover_the_vocabulary_and_positions_match_the_words():
    rng = np.random.default_rng(0)
    seen_shapes, seen_colours, seen_backgrounds, seen_layouts = set(), set(), set(), set()
    for _ in range(400):
        scene = sample_scene(rng)
        captions = describe_scene(scene, rng)
        assert 2 <= len(captions) <= 3 and len(set(captions)) == len(captions)
        seen_backgrounds.add(scene.background)
        seen_layouts.add(scene.layout)
        for obj in scene.objects:
            seen_shapes.add(obj.shape)
            seen_colours.add(obj.colour)
        if len(scene.objects) == 1:
            obj = scene.objects[0]
            expected_side = {"left": obj.x < 0.4, "right": obj.x > 0.6, "top": obj.y < 0.4, "bottom": obj.y > 0.6}
            assert expected_side.get(scene.layout, 0.4 < obj.x < 0.6 and 0.4 < obj.y < 0.6)
            assert any(phrase in caption for phrase in POSITION_PHRASES[scene.layout] for caption in captions)
        else:
            first, second = scene.objects
            assert first.x < second.x if scene.layout == "horizontal" else first.y < second.y
            assert (first.shape, first.colour) != (second.shape, second.colour)
    assert seen_shapes == set(SHAPES) and seen_colours == set(COLOURS) and seen_backgrounds == set(BACKGROUNDS)
    assert seen_layouts == set(POSITION_PHRASES) | {"horizontal", "vertical"}


def test_command_line_generates_and_forces(tmp_path, capsys):
    root = tmp_path / "cli"
    arguments = ["--path", str(root), "--num_train", "3", "--num_dev", "2", "--image_size", "24"]
    main(arguments)
    assert capsys.readouterr().out.strip() == str(root)
    (root / "images/dev/000000.png").write_bytes(b"damaged")
    main(arguments)
    assert (root / "images/dev/000000.png").read_bytes() == b"damaged"
    main([*arguments, "--force"])
    assert load_image(root / "images/dev/000000.png") is not None
