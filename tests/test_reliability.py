"""What a full disk, a second process, a kill mid-save or a careless --out must not break.

Full disks are real where the test can mount a small tmpfs (root), and injected ENOSPC where it
cannot; kills are real SIGKILLs of subprocesses.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_incremental import encode as encode_quietly
from test_incremental import make_dataset

from clipsearch import durable
from clipsearch.cli.common import UserError
from clipsearch.cli.export_clip_retrieval import main as export_main
from clipsearch.store import load_collection, read_shard

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]), "HF_HUB_OFFLINE": "1"}


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout, cwd=REPO)


def error_lines(stderr: str) -> list[str]:
    """What a failed command printed, less the warnings libraries print on the way."""
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]


def temporaries(folder: Path) -> list[Path]:
    """Files a writer leaves behind: durable's temporaries, '*.tmp', locks."""
    return [path for path in folder.rglob("*")
            if durable.TEMPORARY_PATTERN.match(path.name) or path.name.endswith((".tmp", durable.LOCK_SUFFIX))]


# ---------------------------------------------------------------------------------------------
# Small disks: a tmpfs where this test may mount one
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_bytes) -> a folder on a new tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}); the injected-ENOSPC "
                        "tests cover full disks instead")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Take all but about `leave_bytes` of a disk with one file; delete it to free the space."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as file:
        file.write(b"\0" * max(0, free - leave_bytes))
    return filler


# ---------------------------------------------------------------------------------------------
# 1. The export removes only what it made
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded_home(tmp_path_factory, tiny_checkpoint):
    """A user's folder: photos, their embeddings beside them, and a file of their own."""
    home = tmp_path_factory.mktemp("home")
    make_dataset(home / "photos", 6)
    encode_quietly(tiny_checkpoint, home / "photos", home / "emb")
    (home / "notes.txt").write_text("mine")
    return home


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_export_refuses_every_out_that_holds_what_it_did_not_write(encoded_home, tmp_path):
    before = snapshot(encoded_home)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("keep")
    refused = {
        str(encoded_home): "overlaps --emb_path",  # the case: the folder that holds the embeddings
        str(encoded_home / "emb" / "export"): "overlaps --emb_path",
        str(encoded_home / "photos"): "overlaps the image folder",
        str(encoded_home / "photos" / "sub0" / "export"): "overlaps the image folder",
        str(tmp_path / "theirs"): "holds files this export did not write",
        str(encoded_home / "notes.txt"): "not a folder",
    }
    for out, reason in refused.items():
        with pytest.raises(UserError, match=reason):
            export_main(["--emb_path", str(encoded_home / "emb"), "--out", out])
    assert snapshot(encoded_home) == before
    assert (tmp_path / "theirs" / "keep.txt").read_text() == "keep"


def test_export_writes_a_new_folder_and_replaces_only_its_own(encoded_home, tmp_path):
    out = tmp_path / "export"
    export_main(["--emb_path", str(encoded_home / "emb"), "--out", str(out), "--rows_per_file", "4"])
    first = snapshot(out)
    assert set(first) == {"clipsearch-export.json", "img_emb/img_emb_0.npy", "img_emb/img_emb_1.npy",
                          "metadata/metadata_0.parquet", "metadata/metadata_1.parquet"}
    export_main(["--emb_path", str(encoded_home / "emb"), "--out", str(out), "--rows_per_file", "6"])
    assert set(snapshot(out)) == {"clipsearch-export.json", "img_emb/img_emb_0.npy", "metadata/metadata_0.parquet"}
    (out / "metadata" / "my-notes.txt").write_text("mine now")
    with pytest.raises(UserError, match="my-notes.txt"):
        export_main(["--emb_path", str(encoded_home / "emb"), "--out", str(out)])
    assert (out / "metadata" / "my-notes.txt").read_text() == "mine now"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # no temporaries, no lock


# ---------------------------------------------------------------------------------------------
# 2. Checkpoints: committed beside themselves, a previous one kept, an unreadable one skipped
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from clipsearch.sample_data import ensure_sample_dataset

    return ensure_sample_dataset(tmp_path_factory.mktemp("data") / "sample", num_train=48, num_dev=10, image_size=32)


def training_flags(dataset: Path, models_dir: Path, logs_dir: Path, steps: int = 4) -> list[str]:
    return [f"--dataset_path={dataset}", f"--models_dir={models_dir}", f"--logs_dir={logs_dir}", "--run_name=run",
            "--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", f"--max_steps={steps}", "--batch_size=8",
            "--num_workers=0", "--val_check_interval=2", "--warmup_steps=1", "--checkpoint_every_steps=2",
            "--log_every_n_steps=1"]


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_dataset, tmp_path_factory) -> Path:
    from clipsearch.cli.pretrain_openai import main

    root = tmp_path_factory.mktemp("uninterrupted")
    return main(training_flags(tiny_dataset, root / "models", root / "logs")).run_dir


def assert_same_weights(expected_run: Path, got_run: Path) -> None:
    from clipsearch.checkpoint import read_checkpoint

    expected = read_checkpoint(expected_run / "last.ckpt")
    got = read_checkpoint(got_run / "last.ckpt")
    assert got["global_step"] == expected["global_step"]
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, rtol=0, atol=0)


# The training process is killed the moment it opens its second checkpoint file for writing:
# wherever it stages that file, what it leaves there is the evidence.
KILL_AT_SECOND_CHECKPOINT_WRITE = """
import os, signal, sys
opened = []

def hook(event, args):
    if event != "open" or not args or args[0] is None or isinstance(args[0], int):
        return
    path, mode, flags = str(args[0]), args[1], args[2] if len(args) > 2 else 0
    writing = (mode is not None and any(letter in str(mode) for letter in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
    # Staged under $TMPDIR by a tempfile.mkstemp (fsspec's way), not an anonymous TemporaryFile.
    staged = os.path.dirname(path) == os.environ["TMPDIR"] and os.path.basename(path).startswith("tmp")
    if writing and (".ckpt" in path or staged):
        opened.append(path)
        if len(opened) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
from clipsearch.cli.common import run_command
from clipsearch.cli.pretrain_openai import main
run_command(main, sys.argv[1:])
"""


def test_a_kill_during_a_checkpoint_save_leaves_nothing_in_tmpdir_and_resumes(
        tiny_dataset, uninterrupted_run, tmp_path, small_disk):
    # $TMPDIR full and on another filesystem than --models_dir, as on many clusters: training must
    # not need it, and a kill must leave nothing there.
    tmpdir = small_disk(1 << 20)
    fill(tmpdir, 0)
    flags = training_flags(tiny_dataset, tmp_path / "models", tmp_path / "logs")
    killed = run_python(KILL_AT_SECOND_CHECKPOINT_WRITE, *flags, env={"TMPDIR": str(tmpdir)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [path.name for path in tmpdir.rglob("*") if path.is_file()] == ["filler"]
    run_dir = tmp_path / "models" / "run"
    from clipsearch.cli.pretrain_openai import main

    resumed = main(flags)
    assert resumed.start_step == 2 and resumed.global_step == 4
    assert not temporaries(run_dir), "the killed save's temporary was not cleaned up"
    assert_same_weights(uninterrupted_run, run_dir)


def test_a_full_models_dir_is_one_line_and_the_rerun_equals_an_uninterrupted_run(
        tiny_dataset, uninterrupted_run, tmp_path, small_disk):
    models_dir = small_disk(160 << 20)
    # Room for last.ckpt (41 MB) and best.ckpt (14 MB) at step 2, not for a second last.ckpt at step 4.
    size = (uninterrupted_run / "last.ckpt").stat().st_size
    filler = fill(models_dir, int(size * 1.6) + (uninterrupted_run / "best.ckpt").stat().st_size)
    flags = training_flags(tiny_dataset, models_dir, tmp_path / "logs")
    failed = run_python("from clipsearch.cli.common import run_command\n"
                        "from clipsearch.cli.pretrain_openai import main\nimport sys\nrun_command(main, sys.argv[1:])",
                        *flags)
    assert failed.returncode == 1, failed.stderr[-3000:]
    (line,) = [line for line in error_lines(failed.stderr) if line.startswith("error:")]
    assert "Traceback" not in failed.stderr and "Errno 28" not in failed.stderr
    assert f"no space left in {models_dir / 'run'}: writing last.ckpt needs {durable.format_bytes(size)}" in line
    from clipsearch.cli.pretrain_openai import main
    from clipsearch.train import checkpoint_problem

    assert checkpoint_problem(models_dir / "run" / "last.ckpt") == (None, 2)  # the finished work is intact
    assert not temporaries(models_dir / "run")
    filler.unlink()
    resumed = main(flags)
    assert resumed.start_step == 2 and resumed.global_step == 4
    assert_same_weights(uninterrupted_run, models_dir / "run")


def test_an_unreadable_last_checkpoint_falls_back_on_the_previous_one(uninterrupted_run, tiny_dataset, tmp_path,
                                                                      capsys):
    from clipsearch.cli.pretrain_openai import main

    run_dir = tmp_path / "models" / "run"
    shutil.copytree(uninterrupted_run, run_dir)
    last = run_dir / "last.ckpt"
    assert (run_dir / "last-previous.ckpt").is_file()
    last.write_bytes(last.read_bytes()[: 12 << 20])  # what a cut copy left (12 of 41 MB)
    capsys.readouterr()
    resumed = main(training_flags(tiny_dataset, tmp_path / "models", tmp_path / "logs", steps=6))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert f"warning: {last} cannot be read" in warnings[0] and "resuming from" in warnings[0]
    assert "last-previous.ckpt (step 4)" in warnings[0]
    assert resumed.start_step == 4 and resumed.global_step == 6
    assert (run_dir / "last.ckpt.unreadable").stat().st_size == 12 << 20  # kept for the user, out of the way
    # Nothing readable at all: one line, no traceback.
    for name in ("last.ckpt", "last-previous.ckpt"):
        (run_dir / name).write_bytes(b"cut")
    with pytest.raises(UserError, match="no earlier good checkpoint"):
        main(training_flags(tiny_dataset, tmp_path / "models", tmp_path / "logs", steps=8))


# ---------------------------------------------------------------------------------------------
# 3. One process per folder: the second is told who holds it; a dead holder's lock is taken over
# ---------------------------------------------------------------------------------------------

PAUSE_AT_FIRST_WRITE = """
import sys, time
from clipsearch import durable
durable.set_crash_hook(lambda label: (print("paused", flush=True), time.sleep(600)))
from clipsearch.cli.common import run_command
from clipsearch.cli.encode import main
run_command(main, sys.argv[1:])
"""


def test_a_second_encode_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(
        tmp_path, tiny_checkpoint, caplog):
    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    make_dataset(dataset, 6)
    argv = ["--load_model", str(tiny_checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path),
            "--num_workers", "0", "--no_progress", "--accelerator", "cpu"]
    first = subprocess.Popen([sys.executable, "-c", PAUSE_AT_FIRST_WRITE, *argv], env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout.readline().strip() == "paused"  # it holds the folder, mid-run
        with pytest.raises(UserError) as refused:
            encode_quietly(tiny_checkpoint, dataset, emb_path)
        message = str(refused.value)
        assert f"{emb_path} is in use: encoding (rank 0) by pid {first.pid} on {socket.gethostname()}" in message
        assert f"({sys.executable} -c --load_model {tiny_checkpoint}" in message  # the holder's command line
        assert len(message.splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    assert (emb_path / "encode-rank-0.lock").exists()  # what the killed run left
    with caplog.at_level("WARNING", logger="clipsearch.durable"):
        manifest = encode_quietly(tiny_checkpoint, dataset, emb_path)
    assert f"taking over the lock left by pid {first.pid}" in caplog.text
    assert manifest["counts"]["encoded"] == 6
    assert not temporaries(emb_path)


HOLD_LOCK = """
import sys, time
from clipsearch.durable import FolderLock
FolderLock(sys.argv[1], sys.argv[2], "a test holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(folder: Path, name: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), name], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_training_index_querybank_and_export_refuse_a_held_folder(encoded_home, tiny_checkpoint, tiny_dataset,
                                                                  tmp_path):
    from clipsearch.cli.index import main as index_main
    from clipsearch.cli.pretrain_openai import main as train_main
    from clipsearch.cli.querybank import main as querybank_main

    emb = str(encoded_home / "emb")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "train.tsv").write_text("image\tcaption\nx.png\ta red square\n")
    commands = {
        (tmp_path / "models" / "run", "train"):
            lambda: train_main(training_flags(tiny_dataset, tmp_path / "models", tmp_path / "logs")),
        (encoded_home / "emb", "index.faiss"): lambda: index_main(["--emb_path", emb]),
        (encoded_home / "emb", "querybank.pt"): lambda: querybank_main(
            ["--emb_path", emb, "--load_model", str(tiny_checkpoint), "--dataset_path", str(tmp_path / "captions")]),
        (tmp_path, "export"): lambda: export_main(["--emb_path", emb, "--out", str(tmp_path / "export")]),
    }
    for (folder, name), command in commands.items():
        holder = hold_lock(folder, name)
        try:
            with pytest.raises(UserError, match=f"{folder} is in use: .* by pid {holder.pid} on "):
                command()
        finally:
            holder.kill()
            holder.wait()
    assert not (tmp_path / "export").exists() and not (encoded_home / "emb" / "querybank.pt").exists()


def test_the_consolidated_store_waits_for_the_process_building_it(encoded_home, caplog):
    from clipsearch.mmap_store import consolidate

    shutil.rmtree(encoded_home / "emb" / "consolidated", ignore_errors=True)  # an export may have built it
    holder = hold_lock(encoded_home / "emb", "consolidated")
    built = []
    waiter = threading.Thread(target=lambda: built.append(consolidate(encoded_home / "emb")))
    with caplog.at_level("WARNING", logger="clipsearch.durable"):
        waiter.start()
        time.sleep(1.0)
        assert not built and f"waiting for pid {holder.pid}" in caplog.text
        holder.kill()
        holder.wait()
        waiter.join(timeout=60)
    assert len(built[0]) == 6


# ---------------------------------------------------------------------------------------------
# 4. A server notices an update of its folder
# ---------------------------------------------------------------------------------------------


def test_the_server_reloads_an_update_without_failing_a_request(tmp_path, tiny_checkpoint):
    from fastapi.testclient import TestClient

    from clipsearch.search import SearchEngine
    from clipsearch.server import create_app

    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    paths = make_dataset(dataset, 8)
    encode_quietly(tiny_checkpoint, dataset, emb_path)
    engine = SearchEngine.from_files(str(tiny_checkpoint), emb_path)
    app = create_app(engine, serve_roots=[dataset], poll_seconds=0.2)
    failures, answered, stop = [], [], threading.Event()
    with TestClient(app) as client:
        first = client.get("/api/search", params={"q": "a photo", "top_k": 3}).json()
        assert client.get("/api/health").json()["update"] == 0

        def hammer():
            while not stop.is_set():
                response = client.get("/api/search", params={"q": "a photo", "top_k": 50})
                (answered if response.status_code == 200 else failures).append(response)

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for thread in threads:
            thread.start()
        deleted = paths[:2]
        for path in deleted:
            path.unlink()
        added = make_dataset(dataset, 5, start=8)
        encode_quietly(tiny_checkpoint, dataset, emb_path)
        deadline = time.monotonic() + 30
        while client.get("/api/health").json()["update"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join()
        health = client.get("/api/health").json()
        assert (health["update"], health["collection_size"], health["update_complete"]) == (1, 11, True)
        assert not failures and len(answered) > 2
        found = {result["path"] for result in client.get("/api/search", params={"q": "x", "top_k": 50}).json()["results"]}
        assert found == {str(path) for path in [*paths[2:], *added]}
        # An id from a result of the update before still names the image that result showed.
        assert all(result["thumbnail_url"].endswith("&update=0") for result in first["results"])
        kept = next(result for result in first["results"] if Path(result["path"]).exists())
        assert client.get(kept["image_url"]).content == Path(kept["path"]).read_bytes()
        similar = client.get(f"/api/similar/{kept['id']}", params={"update": 0}).json()
        assert similar["query"]["path"] == kept["path"] and similar["update"] == 1
        gone_id = engine.searcher.paths.index(str(deleted[0]))
        assert "no longer on disk" in client.get(f"/api/image/{gone_id}", params={"update": 0}).json()["error"]
        assert client.get("/api/image/0", params={"update": 7}).status_code == 410


def test_a_server_keeps_serving_while_an_update_is_written_or_cannot_be_served(tmp_path, tiny_checkpoint, caplog):
    from clipsearch.cli.index import main as index_main
    from clipsearch.search import SearchEngine
    from clipsearch.server.live import LiveCollection

    dataset, emb_path = tmp_path / "photos", tmp_path / "emb"
    make_dataset(dataset, 6)
    encode_quietly(tiny_checkpoint, dataset, emb_path)
    index_main(["--emb_path", str(emb_path)])
    live = LiveCollection(SearchEngine.from_files(str(tiny_checkpoint), emb_path, index_path=emb_path), poll_seconds=0)
    make_dataset(dataset, 2, start=6)
    encode_quietly(tiny_checkpoint, dataset, emb_path)
    (emb_path / "manifest.json").rename(tmp_path / "manifest.json")  # as while the run is still writing
    assert not live.check() and len(live.engine.searcher) == 6
    (tmp_path / "manifest.json").rename(emb_path / "manifest.json")
    with caplog.at_level("WARNING", logger="clipsearch.server.live"):
        assert not live.check()  # its index was built for the rows before: refused, said once
        assert not live.check()
    assert caplog.text.count("cannot be served") == 1 and "still serving update 0" in caplog.text
    index_main(["--emb_path", str(emb_path)])
    assert live.check() and len(live.engine.searcher) == 8 and live.engine.update == 1


# ---------------------------------------------------------------------------------------------
# 5. Full disks while encoding: one line, finished shards kept, the rerun completes
# ---------------------------------------------------------------------------------------------


def assert_same_collection(emb_path: Path, reference: Path) -> None:
    got, expected = load_collection(emb_path), load_collection(reference)
    assert sorted(got.paths) == sorted(expected.paths) and len(set(got.paths)) == len(got.paths)
    rows = {path: row for row, path in enumerate(expected.paths)}
    for row, path in enumerate(got.paths):
        torch.testing.assert_close(got.embeddings[row], expected.embeddings[rows[path]], atol=1e-5, rtol=0)


def test_encoding_into_a_full_disk_is_one_line_and_resumes_after_space_is_freed(tmp_path, tiny_checkpoint,
                                                                                small_disk):
    dataset = tmp_path / "photos"
    make_dataset(dataset, 12)
    encode_quietly(tiny_checkpoint, dataset, tmp_path / "reference", "--shard_size", "2")
    disk = small_disk(1 << 20)
    filler = fill(disk, 24 << 10)
    emb_path = disk / "emb"
    argv = ["--load_model", str(tiny_checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path),
            "--num_workers", "0", "--no_progress", "--accelerator", "cpu", "--shard_size", "2"]
    failed = subprocess.run([sys.executable, "-m", "clipsearch.cli.encode", *argv], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    lines = [line for line in error_lines(failed.stderr) if not line.startswith("INFO")]
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left in {emb_path}: writing "), failed.stderr
    assert " needs " in lines[0] and " free" in lines[0]
    finished = load_collection(emb_path)  # what was written is readable, and search can use it
    assert 0 < len(finished.paths) < 12 and not finished.complete
    filler.unlink()
    manifest = encode_quietly(tiny_checkpoint, dataset, emb_path, "--shard_size", "2")
    assert manifest["counts"]["encoded"] == 12 and not temporaries(emb_path)
    assert_same_collection(emb_path, tmp_path / "reference")


def test_injected_enospc_half_way_through_a_shard(tmp_path, tiny_checkpoint, monkeypatch):
    """The same without a tmpfs: the stream under every durable write fails half-way, as a full disk does."""
    dataset = tmp_path / "photos"
    make_dataset(dataset, 6)
    encode_quietly(tiny_checkpoint, dataset, tmp_path / "reference", "--shard_size", "2")
    budget = {"bytes": 4_000}  # model.json, the update record and about one shard
    original = durable._Stream.write

    def write_until_full(self, data):
        size = memoryview(data).nbytes
        if size > budget["bytes"]:
            os.write(self.descriptor, memoryview(data).cast("B")[: budget["bytes"]])
            self.written += budget["bytes"]
            budget["bytes"] = 0
            self.full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget["bytes"] -= size
        return original(self, data)

    monkeypatch.setattr(durable._Stream, "write", write_until_full)
    emb_path = tmp_path / "emb"
    with pytest.raises(durable.DiskFullError, match=rf"no space left in {emb_path}: writing \S+ needs .* free"):
        encode_quietly(tiny_checkpoint, dataset, emb_path, "--shard_size", "2")
    assert not temporaries(emb_path)
    committed = list(emb_path.glob("*.ckpt"))
    assert committed and all(read_shard(shard) for shard in committed)  # what was committed is whole
    monkeypatch.undo()
    encode_quietly(tiny_checkpoint, dataset, emb_path, "--shard_size", "2")
    assert_same_collection(emb_path, tmp_path / "reference")


# ---------------------------------------------------------------------------------------------
# 6. Noise: a client that hangs up, and one rule for cut images
# ---------------------------------------------------------------------------------------------


def png_with_rows(width: int, height: int, rows: int, interlaced: bool = False) -> bytes:
    """A greyscale PNG whose header declares width x height but whose complete zlib stream holds `rows` rows."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if interlaced:  # Adam7: every pass's rows, the last pass cut to `rows - height` rows
        raw = b""
        for column, row, column_step, row_step in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                                                   (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
            pass_width = len(range(column, width, column_step))
            pass_rows = len(range(row, height, row_step)) if pass_width else 0
            if row_step == 2 and column_step == 1:
                pass_rows -= height - rows
            raw += (b"\0" + b"\x80" * pass_width) * pass_rows
    else:
        raw = (b"\0" + b"\x80" * width) * rows
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1 if interlaced else 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_one_rule_for_cut_images_in_uploads_and_encoding(tmp_path, tiny_checkpoint):
    from fastapi.testclient import TestClient

    from clipsearch.images import SkipReasons, decode_image
    from clipsearch.search import SearchEngine
    from clipsearch.server import create_app

    whole = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(whole, format="PNG")
    cases = {
        "short.png": (png_with_rows(3000, 3000, 1000), False),  # the header promises 3000 rows, the data holds 1000
        "short-interlaced.png": (png_with_rows(40, 30, 25, interlaced=True), False),
        "cut.png": (whole.getvalue()[: len(whole.getvalue()) // 2], False),
        "whole.png": (whole.getvalue(), True),
        "whole-interlaced.png": (png_with_rows(40, 30, 30, interlaced=True), True),
        "no-end-marker.png": (whole.getvalue()[:-12], True),  # every pixel is there; only IEND is missing
    }
    dataset = tmp_path / "photos"
    dataset.mkdir()
    for name, (data, _) in cases.items():
        (dataset / name).write_bytes(data)
    emb_path = tmp_path / "emb"
    encode_quietly(tiny_checkpoint, dataset, emb_path)
    collection = load_collection(emb_path)
    client = TestClient(create_app(SearchEngine.from_files(str(tiny_checkpoint), emb_path)))
    for name, (data, usable) in cases.items():
        reasons = SkipReasons(log=False)
        assert (decode_image(io.BytesIO(data), name, reasons) is not None) is usable, (name, reasons.reasons)
        encoded = str(dataset / name) in collection.paths
        response = client.post("/api/search/image", files={"image": (name, data, "image/png")})
        assert encoded is usable and (response.status_code == 200) is usable, (name, response.text)
        if not usable:
            assert collection.skipped[str(dataset / name)] == "truncated image"
            assert "truncated image" in response.json()["error"]


def test_a_client_hanging_up_mid_upload_is_one_log_line(engine_for_server, caplog):
    from clipsearch.server import serve_in_background

    with caplog.at_level("INFO"), serve_in_background(engine_for_server) as url:
        # uvicorn's own loggers stop at "uvicorn": listen there too, where a traceback would go.
        logging.getLogger("uvicorn.error").addHandler(caplog.handler)
        host, port = url.removeprefix("http://").split(":")
        boundary = uuid.uuid4().hex
        head = (f"POST /api/search/image HTTP/1.1\r\nHost: {host}\r\nContent-Length: 500000\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n--{boundary}\r\n"
                'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n')
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(head.encode() + b"\x89PNG" + b"\0" * 20_000)
        deadline = time.monotonic() + 10
        while "hung up" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        logging.getLogger("uvicorn.error").removeHandler(caplog.handler)
    hung_up = [record for record in caplog.records if "hung up" in record.getMessage()]
    assert len(hung_up) == 1 and "after 20" in hung_up[0].getMessage()
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text
    assert not any(record.exc_info for record in caplog.records)


@pytest.fixture
def engine_for_server(tiny_checkpoint, colour_images):
    from test_server import build_colour_engine

    return build_colour_engine(tiny_checkpoint, colour_images[1])


def test_durable_writes_leave_the_old_file_or_the_new_one(tmp_path):
    """Unit level: a writer that fails half-way leaves the old file and no temporary."""
    target = tmp_path / "record.json"
    durable.write_json(target, {"version": 1})

    def half_then_fail(stream):
        stream.write(b'{"version": ')
        raise RuntimeError("the writer broke")

    with pytest.raises(RuntimeError):
        durable.atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"version": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["record.json"]
    # A dead writer's temporary is removed by the next lock holder; a live writer's is left alone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"record.json.{dead.stdout.strip()}.{durable._HOST_TAG}.abcdef.tmp"
    live = durable.temporary_path(target)
    stale.write_text("half")
    live.write_text("in progress")
    with durable.FolderLock(tmp_path, "work", "a test"):
        assert not stale.exists() and live.exists()


def test_locks_where_flock_is_missing_go_by_the_holders_pid(tmp_path, monkeypatch, caplog):
    """Some network filesystems have no flock: a lock names its pid, and a dead pid's lock is taken over."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file = tmp_path / "work.lock"
    lock_file.write_text(json.dumps({"pid": int(ended.stdout), "host": socket.gethostname(), "command": "gone"}))
    with caplog.at_level("WARNING", logger="clipsearch.durable"):
        lock = durable.FolderLock(tmp_path, "work", "a test")._acquire_by_pid()
    assert f"taking over the lock left by pid {int(ended.stdout)}" in caplog.text
    with pytest.raises(durable.FolderLockedError, match=f"in use: a second test by pid {os.getpid()} "):
        durable.FolderLock(tmp_path, "work", "a second test")._acquire_by_pid()
    lock.release()
    assert not lock_file.exists()
