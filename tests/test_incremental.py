"""Incremental updates: add / modify / delete / rename cycles, a kill mid-update, two ranks, exact duplicates."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from clipsearch.cli.encode import main as encode_main
from clipsearch.store import list_shards, load_collection, read_shard


def encode(checkpoint, dataset, emb_path, *extra):
    argv = ["--load_model", str(checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path)]
    return encode_main([*argv, "--num_workers", "0", "--no_progress", "--accelerator", "cpu", *extra])


def draw(path, index, size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((index * 67) % 256, (index * 131) % 256, (index * 29) % 256)
    image = Image.new("RGB", size, colour)
    image.putpixel((index % size[0], 0), (255 - colour[0], 0, 0))  # distinct bytes for every index
    image.save(path)
    return path


def make_dataset(folder, count, start=0):
    return [draw(folder / f"sub{index % 2}" / f"img{index:03d}.png", index) for index in range(start, start + count)]


def assert_current(emb_path, dataset, checkpoint, tmp_path):
    """The folder's live set is exactly the dataset's images, each embedded as a fresh full encode would."""
    collection = load_collection(emb_path)
    on_disk = sorted(str(path) for path in dataset.rglob("*.png"))
    assert sorted(collection.paths) == on_disk and len(set(collection.paths)) == len(collection.paths)
    fresh_path = tmp_path / f"fresh-{time.monotonic_ns()}"
    encode(checkpoint, dataset, fresh_path)
    fresh = load_collection(fresh_path)
    fresh_rows = {path: row for row, path in enumerate(fresh.paths)}
    for row, path in enumerate(collection.paths):
        torch.testing.assert_close(collection.embeddings[row], fresh.embeddings[fresh_rows[path]], atol=1e-4, rtol=0)
    return collection


def test_add_modify_delete_rename_cycles_encode_only_what_changed(tmp_path, tiny_checkpoint):
    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    paths = make_dataset(dataset, 8)
    manifest = encode(tiny_checkpoint, dataset, emb_path, "--shard_size", "4")
    assert manifest["counts"]["encoded"] == 8 and manifest["update"] == 0
    first_shards = {path.name: path.stat().st_mtime_ns for path in list_shards(emb_path)}

    make_dataset(dataset, 2, start=8)  # add
    manifest = encode(tiny_checkpoint, dataset, emb_path, "--shard_size", "4")
    assert manifest["this_update"] == {"encoded": 2, "removed": 0, "seconds": manifest["this_update"]["seconds"]}
    assert manifest["counts"]["encoded"] == 10

    draw(paths[1], 101)  # modify: new pixels, a later mtime
    os.utime(paths[1], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    paths[2].unlink()  # delete
    renamed = paths[3].with_name("renamed.png")
    paths[3].rename(renamed)  # rename: the old path goes, the new one is encoded
    manifest = encode(tiny_checkpoint, dataset, emb_path, "--shard_size", "4")
    assert manifest["this_update"]["encoded"] == 2 and manifest["this_update"]["removed"] == 3
    assert manifest["counts"]["encoded"] == 9
    collection = assert_current(emb_path, dataset, tiny_checkpoint, tmp_path)
    assert str(paths[2]) not in collection.paths and str(renamed) in collection.paths

    # Nothing changed: nothing encoded, and old shards were never rewritten.
    manifest = encode(tiny_checkpoint, dataset, emb_path, "--shard_size", "4")
    assert manifest["this_update"]["encoded"] == 0
    assert {name: (emb_path / name).stat().st_mtime_ns for name in first_shards} == first_shards

    manifest = encode(tiny_checkpoint, dataset, emb_path, "--overwrite")
    assert manifest["update"] == 0 and manifest["this_update"]["encoded"] == 9
    assert [path.name for path in list_shards(emb_path)] == ["0-000-64.ckpt"]


def test_exact_duplicates_are_reported_and_folded_on_request(tmp_path, tiny_checkpoint, capsys):
    from clipsearch.search import SearchEngine

    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    paths = make_dataset(dataset, 5)
    copy = shutil.copy(paths[0], dataset / "copy-of-0.png")
    manifest = encode(tiny_checkpoint, dataset, emb_path)
    assert manifest["duplicates"] == {"groups": 1, "extra_copies": 1}
    listed = (emb_path / "duplicates.tsv").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[1] for line in listed) == sorted([str(paths[0]), str(copy)])

    query = Image.open(paths[0])
    plain = SearchEngine.from_files(tiny_checkpoint, emb_path).search_image([query], top_k=3)[0]
    assert {hit.path for hit in plain[:2]} == {str(paths[0]), str(copy)}
    folded = SearchEngine.from_files(tiny_checkpoint, emb_path, fold_duplicates=True).search_image([query], top_k=3)[0]
    assert len(folded) == 3 and {folded[0].path, *folded[0].duplicates} == {str(paths[0]), str(copy)}
    assert not {hit.path for hit in folded[1:]} & {str(paths[0]), str(copy)}

    # The same through the search command: one JSON result that lists the other copy.
    from clipsearch.cli.search import main as search_main

    search_main(["--load_model", str(tiny_checkpoint), "--emb_path", str(emb_path), "--image", str(paths[0]),
                 "--top_k", "3", "--json", "--no_grid", "--fold_duplicates"])
    (answer,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    first = answer["results"][0]
    assert {first["path"], *first["duplicates"]} == {str(paths[0]), str(copy)}


def test_a_kill_in_the_middle_of_an_update_then_rerun(tmp_path, tiny_checkpoint):
    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    paths = make_dataset(dataset, 6)
    encode(tiny_checkpoint, dataset, emb_path)
    paths[0].unlink()
    draw(paths[1], 201)
    os.utime(paths[1], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    added = make_dataset(dataset, 60, start=6)

    argv = ["--load_model", str(tiny_checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli.encode", *argv]
        + ["--num_workers", "0", "--no_progress", "--accelerator", "cpu", "--shard_size", "2", "--batch_size", "2"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list_shards(emb_path)) < 6 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the update finished before it could be killed"
    killed = {shard.name: shard.stat().st_mtime_ns for shard in list_shards(emb_path)}
    assert not (emb_path / "manifest.json").exists()

    # Mid-update, search never sees the deleted image or the stale embedding of the changed one.
    partial = load_collection(emb_path)
    assert str(paths[0]) not in partial.paths and str(paths[1]) not in partial.paths
    assert not partial.complete

    manifest = encode(tiny_checkpoint, dataset, emb_path, "--shard_size", "2", "--batch_size", "2")
    assert manifest["counts"]["encoded"] == 65
    encoded_after_first = []
    for shard_path in list_shards(emb_path):
        if not shard_path.name.startswith("0-000-"):
            encoded_after_first += read_shard(shard_path)["path"]
    assert sorted(encoded_after_first) == sorted(map(str, [paths[1], *added]))  # each exactly once
    assert {name: (emb_path / name).stat().st_mtime_ns for name in killed} == killed  # kept, not redone
    assert_current(emb_path, dataset, tiny_checkpoint, tmp_path)


def test_two_ranks_update_a_folder_one_rank_made(tmp_path, tiny_checkpoint):
    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    paths = make_dataset(dataset, 6)
    encode(tiny_checkpoint, dataset, emb_path, "--batch_size", "2")
    paths[4].unlink()
    make_dataset(dataset, 5, start=6)
    manifest = encode(tiny_checkpoint, dataset, emb_path, "--batch_size", "2", "--devices", "2")
    assert manifest["world_size"] == 2 and manifest["this_update"] == pytest.approx(
        {"encoded": 5, "removed": 1, "seconds": manifest["this_update"]["seconds"]}
    )
    assert {path.name.split("-")[0] for path in list_shards(emb_path)} == {"0", "1"}
    assert_current(emb_path, dataset, tiny_checkpoint, tmp_path)


def draw_stored(path, colour):
    """An uncompressed PNG: every such image of one size has the same byte count, whatever its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path, compress_level=0)
    return path


def rewrite_keeping_stat(path, colour):
    """New pixels under the old size and mtime, as `touch -r` or a copy that keeps mtime leaves a file."""
    before = os.stat(path)
    draw_stored(path, colour)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def row_of(collection, path):
    return collection.embeddings[collection.paths.index(str(path))]


def test_recheck_content_catches_a_rewrite_that_kept_size_and_mtime(tmp_path, tiny_checkpoint):
    from clipsearch.search import SearchEngine

    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    make_dataset(dataset, 5)
    target = draw_stored(dataset / "target.png", (250, 10, 10))
    encode(tiny_checkpoint, dataset, emb_path)
    stale = row_of(load_collection(emb_path), target).clone()
    rewrite_keeping_stat(target, (10, 10, 250))

    # Size and mtime say nothing changed: without the flag the stale row stays.
    manifest = encode(tiny_checkpoint, dataset, emb_path)
    assert manifest["this_update"]["encoded"] == 0 and "content_recheck" not in manifest["this_update"]
    torch.testing.assert_close(row_of(load_collection(emb_path), target), stale)

    manifest = encode(tiny_checkpoint, dataset, emb_path, "--recheck_content")
    assert manifest["this_update"]["encoded"] == 1 and manifest["this_update"]["removed"] == 1
    assert manifest["this_update"]["content_recheck"] == {"rechecked": 6, "changed": 1}
    collection = assert_current(emb_path, dataset, tiny_checkpoint, tmp_path)
    assert not torch.allclose(row_of(collection, target), stale, atol=1e-3)
    hits = SearchEngine.from_files(tiny_checkpoint, emb_path).search_image([Image.open(target)], top_k=6)[0]
    assert [hit.score for hit in hits if hit.path == str(target)] == [pytest.approx(1.0, abs=1e-4)]

    # Unchanged files are hashed, found equal, and not encoded again; no shard is written.
    shards = {path.name: path.stat().st_mtime_ns for path in list_shards(emb_path)}
    manifest = encode(tiny_checkpoint, dataset, emb_path, "--recheck_content")
    assert manifest["this_update"]["encoded"] == 0
    assert manifest["this_update"]["content_recheck"] == {"rechecked": 6, "changed": 0}
    assert {path.name: path.stat().st_mtime_ns for path in list_shards(emb_path)} == shards


def test_recheck_content_resumes_a_killed_update_and_runs_on_two_ranks(tmp_path, tiny_checkpoint):
    from clipsearch.encoding.plan import Layout, plan_update
    from clipsearch.store import update_file, write_json

    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    make_dataset(dataset, 4)
    targets = [draw_stored(dataset / f"target{index}.png", (200, 20 * index, 10)) for index in range(2)]
    encode(tiny_checkpoint, dataset, emb_path, "--batch_size", "2")
    for index, target in enumerate(targets):
        rewrite_keeping_stat(target, (10, 20 * index, 200))

    # A run killed right after writing its update record, before any shard: a rerun with the flag
    # resumes that update; one without it plans a new one that still encodes the dropped rows.
    image_paths = sorted(str(path) for path in dataset.rglob("*.png"))
    layout = Layout(world_size=2, batch_size=2, shard_size=10_000)
    killed = plan_update(emb_path, image_paths, layout, overwrite=False, recheck_content=True)
    assert sorted(killed.to_encode) == sorted(map(str, targets))
    write_json(emb_path / update_file(killed.number), killed.record)
    resumed = plan_update(emb_path, image_paths, layout, overwrite=False, recheck_content=True)
    assert (resumed.number, resumed.record["plan"]) == (killed.number, killed.record["plan"])
    without_flag = plan_update(emb_path, image_paths, layout, overwrite=False)
    assert without_flag.number == killed.number + 1 and sorted(without_flag.to_encode) == sorted(map(str, targets))

    manifest = encode(tiny_checkpoint, dataset, emb_path, "--batch_size", "2", "--devices", "2", "--recheck_content")
    assert manifest["world_size"] == 2 and manifest["update"] == killed.number
    assert manifest["this_update"]["encoded"] == 2
    assert {path.name.split("-")[0] for path in list_shards(emb_path) if not path.name.startswith("0-000-")} == {"0", "1"}
    assert_current(emb_path, dataset, tiny_checkpoint, tmp_path)
