"""The embedding folder: hostile and broken shards, shards the records do not list, durable writes, the live set."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import clipsearch.store as store
from clipsearch.cli.common import UserError
from clipsearch.store import ShardError, load_collection, read_catalog, write_json, write_shard


def encode(checkpoint, dataset, emb_path, *extra):
    from clipsearch.cli.encode import main as encode_main

    argv = ["--load_model", str(checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path)]
    return encode_main([*argv, "--num_workers", "0", "--no_progress", *extra])


class Payload:
    """Unpickling this would create a file: proof that a shard ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "pickle", "wrong contents"])
def test_a_broken_or_hostile_shard_is_one_error_naming_the_file(tmp_path, kind):
    write_shard(tmp_path / "0-000-2.ckpt", ["a", "b"], torch.randn(2, 4))
    bad = tmp_path / "0-001-2.ckpt"
    marker = tmp_path / "code-ran"
    if kind == "truncated":
        write_shard(bad, ["c"], torch.randn(1, 4))
        bad.write_bytes(bad.read_bytes()[:200])
    elif kind == "garbage":
        bad.write_bytes(b"\x00not a shard" * 10)
    elif kind == "pickle":
        bad.write_bytes(pickle.dumps({"path": ["c"], "emb": Payload(str(marker))}))
    else:
        torch.save({"paths": ["c"], "embeddings": torch.randn(1, 4)}, bad)
    with pytest.raises(ShardError) as raised:
        load_collection(tmp_path)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert str(bad) in message and "re-encode" in message and "remove this file" in message
    assert not marker.exists()


def test_search_cli_prints_one_line_for_a_truncated_shard(tmp_path, tiny_checkpoint):
    bad = write_shard(tmp_path / "0-000-2.ckpt", ["c"], torch.randn(1, 64))
    bad.write_bytes(bad.read_bytes()[:100])
    result = subprocess.run(
        [sys.executable, "-m", "clipsearch.cli.search", "--load_model", str(tiny_checkpoint)]
        + ["--emb_path", str(tmp_path), "--query", "red", "--out_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in result.stderr


def test_a_shard_the_records_do_not_list_is_refused(tmp_path, tiny_checkpoint, colour_images):
    root, _ = colour_images
    emb_path = tmp_path / "emb"
    encode(tiny_checkpoint, root, emb_path)
    assert len(load_collection(emb_path).paths) == 12
    # A crafted shard dropped into a valid folder would otherwise make the server serve /etc/passwd.
    write_shard(emb_path / "7-000-64.ckpt", ["/etc/passwd"], torch.randn(1, 64))
    with pytest.raises(ShardError, match="7-000-64.ckpt is not listed in the folder's records.*remove it"):
        load_collection(emb_path)
    with pytest.raises(ShardError, match="7-000-64.ckpt"):
        encode(tiny_checkpoint, root, emb_path)  # an update refuses it too
    (emb_path / "7-000-64.ckpt").unlink()
    assert "/etc/passwd" not in load_collection(emb_path).paths


def test_json_and_shards_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", None)) or real_replace(a, b))
    write_json(tmp_path / "model.json", {"a": 1})
    write_shard(tmp_path / "0-000-1.ckpt", ["a"], torch.ones(1, 2))
    # The file is flushed, renamed, then the folder is flushed so the rename itself survives a power cut.
    assert events == [("fsync", False), ("replace", None), ("fsync", True)] * 2
    assert sorted(os.listdir(tmp_path)) == ["0-000-1.ckpt", "model.json"]


def test_catalog_applies_removals_and_newer_rows(tmp_path):
    (tmp_path / "model.json").write_text('{"format": 2, "fingerprint": "f"}')
    write_shard(tmp_path / "0-000-2.ckpt", ["a", "b", "c"], torch.eye(3), stats=[(1, 1)] * 3, digests=["x", "y", "x"])
    write_shard(tmp_path / "0-001-2.ckpt", ["b"], -torch.eye(3)[1:2], [("d", "missing file")], stats=[(2, 2)], digests=["z"])
    write_json(tmp_path / "update-000.json", {"update": 0, "first_step": 0, "shards": ["0-000-2.ckpt"], "removed": []})
    write_json(tmp_path / "update-001.json", {"update": 1, "first_step": 1, "shards": ["0-001-2.ckpt"], "removed": ["b", "c"]})
    collection = load_collection(tmp_path)
    assert collection.paths == ["a", "b"] and collection.skipped == {"d": "missing file"}
    torch.testing.assert_close(collection.embeddings[1], -torch.eye(3)[1])  # the newer row, not the stale one
    assert read_catalog(tmp_path, upto=1).stat_of("b") == (1, 1)
    assert not collection.complete  # no manifest: a run in progress
    assert store.Collection.duplicate_groups(collection) == []


def test_folders_of_older_versions_and_plain_shards(tmp_path, tiny_checkpoint, colour_images):
    from clipsearch.store import EncodingMismatchError

    # Written before update records: its done records list the shards, and only those are read.
    older = tmp_path / "older"
    older.mkdir()
    write_shard(older / "0-000-2.ckpt", ["a", "b"], torch.randn(2, 4))
    write_json(older / "model.json", {"fingerprint": "f", "embed_dim": 4})
    write_json(older / "rank-0.done.json", {"shards": ["0-000-2.ckpt"]})
    assert load_collection(older).paths == ["a", "b"]
    write_shard(older / "1-000-2.ckpt", ["/etc/passwd"], torch.randn(1, 4))
    with pytest.raises(ShardError, match="1-000-2.ckpt is not listed"):
        load_collection(older)

    # Plain interchange shards (no model.json) are searched as they are, but never encoded into.
    root, _ = colour_images
    plain = tmp_path / "plain"
    plain.mkdir()
    write_shard(plain / "0-000-2.ckpt", ["a"], torch.randn(1, 64))
    assert load_collection(plain).paths == ["a"]
    with pytest.raises(EncodingMismatchError, match="without a model.json.*--overwrite"):
        encode(tiny_checkpoint, root, plain)
