"""Encoding webdataset tars: local and over HTTP, fields and bad samples, updates, unreadable tars, display."""
import functools
import http.server
import io
import json
import re
import threading

import pytest
from PIL import Image

from clipsearch import tars
from clipsearch.cli.common import UserError
from clipsearch.cli.encode import main as encode_main
from clipsearch.cli.encode import parse_args
from clipsearch.store import load_collection, read_json, read_shard
from clipsearch.tars import list_tars, read_member_image, write_tar


def png(index: int, size: tuple[int, int] = (40, 32)) -> bytes:
    image = Image.new("RGB", size, ((index * 67) % 256, (index * 131) % 256, (index * 29) % 256))
    image.putpixel((index % size[0], 0), (255, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample(index: int) -> tuple[str, dict[str, bytes]]:
    metadata = {"url": f"https://example.com/{index}.png", "width": 40, "height": 32, "similarity": 0.25 + index / 100}
    return f"{index:06d}", {"png": png(index), "txt": f"photo number {index}".encode(),
                            "json": json.dumps(metadata).encode()}


def make_tars(folder, count: int = 3, per_tar: int = 3) -> list[str]:
    """Tars of good samples, 00000.tar ... with keys numbered across tars."""
    folder.mkdir(parents=True, exist_ok=True)
    return [str(write_tar(folder / f"{number:05d}.tar", [sample(number * 10 + index) for index in range(per_tar)]))
            for number in range(count)]


def encode(checkpoint, dataset, emb_path, *extra):
    argv = ["--load_model", str(checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path),
            "--num_workers", "0", "--no_progress", "--accelerator", "cpu", "--batch_size", "2"]
    return encode_main([*argv, *extra])


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(tars, "RETRY_SECONDS", 0.01)


def test_brace_patterns_globs_and_folders_list_each_tar_once(tmp_path):
    made = make_tars(tmp_path / "shards", count=3, per_tar=1)
    assert list_tars(str(tmp_path / "shards" / "{00000..00002}.tar")) == made
    assert list_tars(f"{tmp_path}/shards/*.tar::{tmp_path}/shards/00001.tar") == made
    assert list_tars(str(tmp_path / "shards")) == made
    with pytest.raises(UserError, match="matches no .tar files"):
        list_tars(str(tmp_path / "elsewhere" / "*.tar"))
    with pytest.raises(UserError, match="matches no .tar files"):  # before the model loads
        encode_main(["--dataset_path", str(tmp_path / "shards" / "*.tgz.tar"), "--emb_path", str(tmp_path / "emb")])
    with pytest.raises(UserError, match="none of the 2 tars it names exists"):
        encode_main(["--dataset_path", str(tmp_path / "shards" / "{00008..00009}.tar"), "--emb_path", str(tmp_path)])
    try:
        import s3fs  # noqa: F401
    except ImportError:  # not installed by 0_install.sh: a run on s3:// names the package to install
        with pytest.raises(UserError, match="pip install s3fs"):
            tars.filesystem("s3://bucket/shards/00000.tar")
    with pytest.raises(SystemExit):  # a tar's caption is a field already: --captions is refused in one line
        parse_args(["--dataset_path", str(tmp_path / "shards" / "{00000..00002}.tar"), "--captions"])


def test_tars_encode_every_sample_once_with_its_fields_and_list_bad_samples(tmp_path, tiny_checkpoint, quick_retries):
    shards = tmp_path / "shards"
    make_tars(shards, count=2)
    bad = [sample(100), ("000101", {"txt": b"no image here"}), ("000102", {"jpg": b"not a jpeg at all"}),
           ("000103", {"png": png(103), "json": b"{not json"}), sample(104), ("000100", {"png": png(105)})]
    write_tar(shards / "00002.tar", bad)
    whole = write_tar(tmp_path / "whole.tar", [sample(200), sample(201), sample(202)]).read_bytes()
    (shards / "00003.tar").write_bytes(whole[: 512 * 4])  # cut after the first sample's members
    emb = tmp_path / "emb"
    manifest = encode(tiny_checkpoint, shards / "{00000..00003}.tar", emb)

    collection = load_collection(emb)
    keys = sorted(path.rpartition("#")[2] for path in collection.paths)
    assert keys == ["000000", "000001", "000002", "000010", "000011", "000012", "000100", "000103", "000104",
                    "000200"], "every readable sample once, none twice"
    assert all(path.startswith(str(shards)) and "#" in path for path in collection.paths)
    # Each row keeps its caption and its .json's values beside its embedding.
    row = collection.paths.index(f"{shards}/00000.tar#000001")
    fields = collection.fields.row(row)
    assert fields["caption"] == "photo number 1" and fields["url"] == "https://example.com/1.png"
    assert fields["similarity"] == pytest.approx(0.26) and fields["key"] == "000001"
    assert fields["tar"] == f"{shards}/00000.tar"
    assert "url" not in collection.fields.row(collection.paths.index(f"{shards}/00002.tar#000103"))  # bad .json
    # Bad samples are listed with their tar and key; the rest of each tar is encoded.
    skipped = collection.skipped
    assert skipped[f"{shards}/00002.tar#000101"].startswith("no image in sample")
    assert skipped[f"{shards}/00002.tar#000102"] in ("corrupt image", "not an image")
    assert "truncated tar" in skipped[f"{shards}/00003.tar"]
    assert skipped[f"{shards}/00002.tar"].startswith("duplicate keys") and "000100" in skipped[f"{shards}/00002.tar"]
    errors = (emb / "errors.tsv").read_text()
    assert f"{shards}/00002.tar#000101" in errors and f"{shards}/00003.tar\t" in errors
    assert manifest["counts"]["encoded"] == 10 and manifest["dataset_path"] == str(shards / "{00000..00003}.tar")
    # Results show the image: a row's name reads its member back from the tar.
    assert read_member_image(f"{shards}/00000.tar#000001") == png(1)
    from clipsearch.images import load_image

    assert load_image(f"{shards}/00001.tar#000012").size == (40, 32)

    # Re-run with one more tar: only that tar is encoded, into a new update.
    write_tar(shards / "00004.tar", [sample(40), sample(41)])
    manifest = encode(tiny_checkpoint, shards / "{00000..00004}.tar", emb)
    update = read_json(emb / "update-001.json")
    assert update["tars"] == 1 and len(update["shards"]) == 1 and update["removed"] == []
    assert read_shard(emb / update["shards"][0])["tar"] == f"{shards}/00004.tar"
    assert manifest["counts"]["encoded"] == 12 and manifest["this_update"]["encoded"] == 2
    # A rewritten tar replaces its rows; a tar left out of the pattern is dropped with its rows and skips.
    write_tar(shards / "00000.tar", [sample(5)])
    manifest = encode(tiny_checkpoint, f"{shards}/{{00000..00002}}.tar::{shards}/00004.tar", emb)
    collection = load_collection(emb)
    assert sorted(path.rpartition("#")[2] for path in collection.paths if "00000.tar" in path) == ["000005"]
    assert not any("00003.tar" in path for path in (*collection.paths, *collection.skipped))
    assert manifest["counts"]["encoded"] == 9 and len(collection.paths) == len(set(collection.paths))


def test_unreadable_tar_is_named_and_the_run_fails_keeping_finished_tars(tmp_path, tiny_checkpoint, quick_retries,
                                                                          monkeypatch):
    shards = tmp_path / "shards"
    make_tars(shards, count=3, per_tar=2)
    opened = {"count": 0}
    real_open = tars.open_tar_file

    def flaky_open(url):  # the middle tar's storage is down
        if url.endswith("00001.tar"):
            opened["count"] += 1
            raise ConnectionError("connection refused")
        return real_open(url)

    monkeypatch.setattr(tars, "open_tar_file", flaky_open)
    emb = tmp_path / "emb"
    with pytest.raises(UserError, match=r"1 tar could not be read.*00001\.tar.*3 times.*ConnectionError"):
        encode(tiny_checkpoint, shards / "{00000..00002}.tar", emb)
    assert opened["count"] == tars.FETCH_TRIES  # bounded retries, then reported
    assert not (emb / "manifest.json").exists()
    assert sorted(path.rpartition("#")[2] for path in load_collection(emb).paths) == ["000000", "000001", "000020",
                                                                                      "000021"]
    # The storage is back: the same command reads only the missing tar and completes the update.
    monkeypatch.setattr(tars, "open_tar_file", real_open)
    manifest = encode(tiny_checkpoint, shards / "{00000..00002}.tar", emb)
    assert manifest["update"] == 0 and manifest["this_update"]["encoded"] == 2 and manifest["counts"]["encoded"] == 6


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """A folder served on 127.0.0.1 by a thread: what a static file host or a bucket's HTTP endpoint does."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tars_over_http_are_encoded_and_a_missing_url_is_reported(tmp_path, tiny_checkpoint, http_folder,
                                                                   quick_retries):
    folder, base = http_folder
    make_tars(folder, count=2)
    emb = tmp_path / "emb"
    with pytest.raises(UserError, match=r"00002\.tar \(not found"):  # 404: reported at once, not retried
        encode(tiny_checkpoint, f"{base}/{{00000..00002}}.tar", emb)
    collection = load_collection(emb)
    assert len(collection.paths) == 6 and collection.paths[0] == f"{base}/00000.tar#000000"
    assert collection.fields.row(0)["caption"] == "photo number 0"
    assert read_member_image(f"{base}/00001.tar#000011") == png(11)
    # The URL comes back (a version now, so a new update): the same command encodes it alone.
    write_tar(folder / "00002.tar", [sample(20)])
    manifest = encode(tiny_checkpoint, f"{base}/{{00000..00002}}.tar", emb)
    assert manifest["update"] == 1 and manifest["counts"]["encoded"] == 7 and manifest["this_update"]["encoded"] == 1
    # One more tar on the server: the others' versions (size, Last-Modified) are unchanged, so only it is read,
    # here by a loader worker (forked after this process asked the server for versions: it needs its own client).
    write_tar(folder / "00003.tar", [sample(30)])
    manifest = encode(tiny_checkpoint, f"{base}/{{00000..00003}}.tar", emb, "--num_workers", "1")
    assert manifest["update"] == 2 and manifest["this_update"]["encoded"] == 1 and manifest["counts"]["encoded"] == 8
    assert read_json(emb / "update-002.json")["tars"] == 1


def test_a_dropped_connection_resumes_the_tar_without_repeating_samples(tmp_path, monkeypatch, quick_retries):
    path = write_tar(tmp_path / "00000.tar", [sample(index) for index in range(4)])
    data = path.read_bytes()

    class Dropping(io.BytesIO):
        """Fails once, after the first two samples' bytes, as a reset connection does."""

        dropped = False

        def read(self, size=-1):
            if not Dropping.dropped and self.tell() > len(data) // 2:
                Dropping.dropped = True
                raise ConnectionResetError("connection reset by peer")
            return super().read(size)

    monkeypatch.setattr(tars, "open_tar_file", lambda url: Dropping(data))
    keys = [item.key for item in tars.tar_samples("remote/00000.tar")]
    assert Dropping.dropped and keys == ["000000", "000001", "000002", "000003"]


def test_tar_rows_come_back_in_search_results_the_export_and_the_page(tmp_path, tiny_checkpoint, capsys):
    import fastapi.testclient
    import pyarrow.parquet as pq

    from clipsearch.checkpoint import load_bundle
    from clipsearch.cli.export_clip_retrieval import main as export_main
    from clipsearch.cli.search import main as search_main
    from clipsearch.search import SearchEngine, Searcher
    from clipsearch.server import create_app

    shards = tmp_path / "shards"
    make_tars(shards, count=2, per_tar=2)
    emb = tmp_path / "emb"
    encode(tiny_checkpoint, shards, emb)  # a folder of tars
    capsys.readouterr()
    search_main(["--emb_path", str(emb), "--load_model", str(tiny_checkpoint), "--query", "a photo", "--json",
                 "--where", "caption=photo number 11", "--out_dir", str(tmp_path / "out")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (hit,) = result["results"]
    assert hit["path"] == f"{shards}/00001.tar#000011"
    assert hit["fields"]["url"] == "https://example.com/11.png" and hit["fields"]["caption"] == "photo number 11"
    assert (tmp_path / "out" / "a photo.png").is_file()

    export_main(["--emb_path", str(emb), "--out", str(tmp_path / "export")])
    table = pq.read_table(next((tmp_path / "export" / "metadata").iterdir()))
    exported = dict(zip(table.column("image_path").to_pylist(), table.column("url").to_pylist()))
    assert exported[f"{shards}/00000.tar#000001"] == "https://example.com/1.png" and len(exported) == 4

    collection = load_collection(emb)
    engine = SearchEngine(load_bundle(tiny_checkpoint), Searcher(collection.paths, collection.embeddings),
                          fields=collection.fields)
    member = collection.paths.index(f"{shards}/00001.tar#000010")
    with fastapi.testclient.TestClient(create_app(engine, serve_roots=[shards])) as client:
        original = client.get(f"/api/image/{member}")
        assert original.status_code == 200 and original.content == png(10)
        assert original.headers["content-type"] == "image/png"
        thumbnail = client.get(f"/api/image/{member}", params={"size": 96})
        assert thumbnail.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumbnail.content)).size
    with fastapi.testclient.TestClient(create_app(engine, serve_roots=[tmp_path / "out"])) as guarded:
        assert guarded.get(f"/api/image/{member}").status_code == 403  # a local tar outside the served folders


def test_two_processes_take_whole_tars_each(tmp_path, tiny_checkpoint):
    shards = tmp_path / "shards"
    made = make_tars(shards, count=3, per_tar=3)
    emb = tmp_path / "emb"
    manifest = encode(tiny_checkpoint, shards / "*.tar", emb, "--devices", "2")
    update = read_json(emb / "update-000.json")
    by_rank = {}
    for name in update["shards"]:
        shard = read_shard(emb / name)
        by_rank.setdefault(name.split("-")[0], []).append(shard["tar"])
        assert {path.rpartition("#")[0] for path in shard["path"]} == {shard["tar"]}  # one tar, whole
    assert by_rank == {"0": made[:1], "1": made[1:]}
    assert manifest["counts"]["encoded"] == 9 and manifest["world_size"] == 2
    assert len(set(load_collection(emb).paths)) == 9


def test_a_tar_cut_anywhere_is_reported_and_a_padded_one_is_whole(tmp_path):
    import random

    whole = write_tar(tmp_path / "whole.tar", [sample(index) for index in range(6)]).read_bytes()
    (tmp_path / "padded.tar").write_bytes(whole + bytes(100_000))  # tar -b 128 pads its end this far and more
    assert [item.key for item in tars.tar_samples(str(tmp_path / "padded.tar"))] == [f"{i:06d}" for i in range(6)]
    import tarfile

    with tarfile.open(tmp_path / "whole.tar") as archive:
        last = archive.getmembers()[-1]
        end_marker = last.offset_data + -(-last.size // 512) * 512
    for cut in random.Random(0).sample(range(1, end_marker + 512), 12):  # past the first end block, nothing is lost
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        items = list(tars.tar_samples(str(tmp_path / "cut.tar")))
        assert isinstance(items[-1], tars.TarProblem) and "truncated" in items[-1].reason, cut


def test_an_unreachable_server_gets_bounded_retries(quick_retries):
    import socket

    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/00000.tar"
    assert tars.tar_version(url) is None
    with pytest.raises(tars.TarFetchError, match=f"failed {tars.FETCH_TRIES} times"):
        list(tars.tar_samples(url))


def test_an_object_store_glob_is_listed_and_read(tmp_path, tiny_checkpoint):
    """fsspec's in-memory store stands in for s3:// and gs://: a glob is listed by the store, each tar streamed."""
    import fsspec

    store = fsspec.filesystem("memory")
    for number in range(2):
        local = write_tar(tmp_path / f"{number:05d}.tar", [sample(number * 10 + index) for index in range(2)])
        store.pipe(f"/bucket{tmp_path}/shards/{number:05d}.tar", local.read_bytes())
    pattern = f"memory://bucket{tmp_path}/shards/*.tar"
    listed = list_tars(pattern)  # as the store names them
    assert [url.rpartition("/")[2] for url in listed] == ["00000.tar", "00001.tar"] and listed[0].startswith("memory:")
    manifest = encode(tiny_checkpoint, pattern, tmp_path / "emb")
    assert manifest["counts"]["encoded"] == 4 and manifest["dataset_path"] == pattern
    assert sorted(load_collection(tmp_path / "emb").paths)[-1] == f"{listed[1]}#000011"
    assert read_member_image(f"{listed[1]}#000011") == png(11)


def test_a_tar_without_a_version_now_is_encoded_and_read_again_once_it_has_one(tmp_path, tiny_checkpoint,
                                                                                 monkeypatch):
    shards = tmp_path / "shards"
    made = make_tars(shards, count=2, per_tar=2)
    real_version = tars.tar_version
    monkeypatch.setattr(tars, "tar_version", lambda url: None if url == made[1] else real_version(url))
    emb = tmp_path / "emb"
    assert encode(tiny_checkpoint, shards, emb)["counts"]["encoded"] == 4  # the store would not say its version
    monkeypatch.setattr(tars, "tar_version", real_version)
    manifest = encode(tiny_checkpoint, shards, emb)
    assert read_json(emb / "update-001.json")["tars"] == 1 and manifest["counts"]["encoded"] == 4


class HeadOnlyHandler(QuietHandler):
    """Answers HEAD for every file but 404s a GET of gone.tar: a tar that vanished after the plan was made."""

    def do_GET(self):
        if self.path.endswith("/gone.tar"):
            self.send_error(404)
        else:
            super().do_GET()


def test_a_rank_that_cannot_read_its_tar_names_it_in_one_line_and_the_others_finish(tmp_path, tiny_checkpoint,
                                                                                     capfd):
    shards, served = tmp_path / "shards", tmp_path / "served"
    make_tars(shards, count=3, per_tar=3)
    served.mkdir()
    write_tar(served / "gone.tar", [sample(90)])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(HeadOnlyHandler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gone = f"http://127.0.0.1:{server.server_address[1]}/gone.tar"
    emb = tmp_path / "emb"
    try:
        with pytest.raises(SystemExit) as stopped:
            encode(tiny_checkpoint, f"{shards}/*.tar::{gone}", emb, "--devices", "2")
    finally:
        server.shutdown()
        server.server_close()
    assert stopped.value.code == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.fullmatch(rf"error: rank [01]: 1 tar could not be read, .*: {re.escape(gone)} \(not found.*", errors[0])
    assert len(load_collection(emb).paths) == 9  # every readable tar, whichever rank had it
