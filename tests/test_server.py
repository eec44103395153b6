"""The web search API through FastAPI's TestClient: searches, images by id, limits and hostile input."""
from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.checkpoint import load_bundle
from clipsearch.images import display_path
from clipsearch.query_terms import MAX_TERMS
from clipsearch.server import create_app
from clipsearch.server.app import (
    MAX_CONCURRENT_DECODES,
    MAX_CONDITIONS,
    MAX_QUERY_CHARS,
    MAX_RESULTS,
    MAX_TOP_K,
    MAX_UPLOAD_BYTES,
    THUMBNAIL_SIZES,
    ThumbnailCache,
    thumbnail_size,
)

fastapi_testclient = pytest.importorskip("fastapi.testclient")


def build_colour_engine(checkpoint_path, image_paths):
    """A real SearchEngine over the given images, embedded by the checkpoint's own image tower, with two
    fields: the image's folder (`group`) and a `caption` naming its number."""
    import pyarrow

    from clipsearch.metadata import MetadataTable
    from clipsearch.search import SearchEngine, Searcher

    bundle = load_bundle(checkpoint_path)
    with torch.no_grad():
        pixels = torch.stack([bundle.eval_transform(Image.open(path).convert("RGB")) for path in image_paths])
        embeddings = bundle.model.encode_image(pixels)
    paths = [str(path) for path in image_paths]
    fields = MetadataTable(paths, {"group": "text", "caption": "text"}, {
        "group": pyarrow.array([os.path.basename(os.path.dirname(path)) for path in paths]),
        "caption": pyarrow.array([f"colour number {number}" for number in range(len(paths))]),
    })
    return SearchEngine(bundle, Searcher(paths, embeddings), fields=fields)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, colour_images):
    _, image_paths = colour_images
    return build_colour_engine(tiny_checkpoint, image_paths)


@pytest.fixture(scope="module")
def client(engine):
    with fastapi_testclient.TestClient(create_app(engine)) as test_client:
        yield test_client


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge canvas: the shape of a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_error(response, status_code: int):
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


def test_health_reports_collection_and_model(client, colour_images):
    body = client.get("/api/health").json()
    assert body["collection_size"] == len(colour_images[1])
    assert body["embedding_dim"] == 64
    assert body["model"]["family"] == "openai"
    assert body["model"]["architecture"] == "ViT-Tiny-16"


def test_text_search_ranks_collection_items(client, colour_images):
    _, image_paths = colour_images
    response = client.get("/api/search", params={"q": "a red square", "top_k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == {"kind": "text", "text": "a red square"}
    results = body["results"]
    assert [result["rank"] for result in results] == [1, 2, 3, 4, 5]
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert len({result["id"] for result in results}) == 5
    for result in results:
        assert result["path"] == str(image_paths[result["id"]])
        assert result["thumbnail_url"].startswith(f"/api/image/{result['id']}?size=")


def test_top_k_beyond_collection_returns_whole_collection(client, colour_images):
    response = client.get("/api/search", params={"q": "anything", "top_k": MAX_TOP_K})
    assert response.status_code == 200
    assert len(response.json()["results"]) == len(colour_images[1])


def test_image_search_finds_the_uploaded_image_first(client, colour_images):
    _, image_paths = colour_images
    upload = image_paths[7].read_bytes()
    response = client.post("/api/search/image", params={"top_k": 3}, files={"image": ("query.png", upload, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["kind"] == "image" and body["query"]["filename"] == "query.png"
    assert body["results"][0]["id"] == 7
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_image_search_accepts_jpeg_and_strips_client_folders_from_filename(client):
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(buffer, format="JPEG")
    response = client.post(
        "/api/search/image", files={"image": ("../../etc/evil.jpg", buffer.getvalue(), "image/jpeg")}
    )
    assert response.status_code == 200, response.text
    assert response.json()["query"]["filename"] == "evil.jpg"


def test_similar_search_leaves_out_the_item_itself(client, colour_images):
    _, image_paths = colour_images
    body = client.get("/api/similar/4", params={"top_k": 4}).json()
    assert body["query"] == {"kind": "similar", "id": 4, "path": str(image_paths[4])}
    assert 4 not in [result["id"] for result in body["results"]]
    assert len(body["results"]) == 4
    whole = client.get("/api/similar/4", params={"top_k": MAX_TOP_K}).json()["results"]
    assert sorted(result["id"] for result in whole) == [n for n in range(len(image_paths)) if n != 4]


def test_image_by_id_serves_the_file_and_bounded_thumbnails(client, colour_images):
    _, image_paths = colour_images
    original = client.get("/api/image/11")
    assert original.status_code == 200
    assert original.content == image_paths[11].read_bytes()
    thumbnail = client.get("/api/image/11", params={"size": 16})
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= thumbnail_size(16)
    for size in (0, 15, 1025, -3, 10**12, "big"):
        assert_error(client.get("/api/image/11", params={"size": size}), 422)


HOSTILE_IDS = [
    "../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2e%2e",
    "..",
    "-1",
    "12",  # one past the last of the 12 colour images
    "99999999999999999999999999",
    "1e2",
    "0x1",
    "%201",
    "%00",
    "%EF%BC%91",  # a full-width digit one: str.isdigit says yes, the collection says no
    "etc%5Cpasswd",
]


@pytest.mark.parametrize("endpoint", ["/api/image/", "/api/similar/"])
@pytest.mark.parametrize("hostile_id", HOSTILE_IDS)
def test_hostile_ids_are_404(client, endpoint, hostile_id):
    response = client.get(endpoint + hostile_id)
    assert_error(response, 404)
    assert b"root:" not in response.content


@pytest.mark.parametrize(
    "url", ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fapp.py"]
)
def test_static_files_do_not_escape_their_folder(client, url):
    response = client.get(url)
    assert response.status_code == 404
    assert b"root:" not in response.content and b"import" not in response.content


def test_client_sent_paths_are_ignored(client, colour_images):
    _, image_paths = colour_images
    response = client.get("/api/image/0", params={"path": "/etc/passwd", "size": 32})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    "params, status_code",
    [
        ({"q": "x" * (MAX_QUERY_CHARS + 1)}, 422),
        ({"q": "x" * 20_000}, 422),
        ({}, 422),
        ({"q": "   "}, 400),
        ({"q": "cat", "top_k": 0}, 422),
        ({"q": "cat", "top_k": -5}, 422),
        ({"q": "cat", "top_k": MAX_TOP_K + 1}, 422),
        ({"q": "cat", "top_k": 10**30}, 422),
        ({"q": "cat", "top_k": "ten"}, 422),
    ],
)
def test_text_search_limits(client, params, status_code):
    assert_error(client.get("/api/search", params=params), status_code)


def test_longest_allowed_query_is_searched(client):
    response = client.get("/api/search", params={"q": "é" * MAX_QUERY_CHARS, "top_k": 1})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1


def test_similar_top_k_is_bounded(client):
    assert_error(client.get("/api/similar/0", params={"top_k": MAX_TOP_K + 1}), 422)
    assert_error(client.get("/api/similar/0", params={"top_k": -1}), 422)


def test_non_image_upload_is_415(client):
    response = client.post("/api/search/image", files={"image": ("notes.png", b"just some text\n" * 50, "image/png")})
    assert "not a supported image" in assert_error(response, 415)


def test_truncated_image_upload_is_415(client):
    whole = png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
    response = client.post("/api/search/image", files={"image": ("cut.png", whole[: len(whole) // 2], "image/png")})
    assert_error(response, 415)


@pytest.mark.parametrize("side", [8000, 40000])  # over our pixel cap, and over PIL's own bomb threshold
def test_decompression_bomb_is_refused_before_decoding(client, side):
    response = client.post("/api/search/image", files={"image": ("bomb.png", png_header_only(side, side), "image/png")})
    assert "pixels" in assert_error(response, 413)


def test_upload_that_is_not_multipart_is_415(client):
    response = client.post("/api/search/image", content=b"\x89PNG", headers={"content-type": "image/png"})
    assert_error(response, 415)


def test_upload_without_image_field_is_400(client, colour_images):
    _, image_paths = colour_images
    response = client.post("/api/search/image", files={"photo": ("a.png", image_paths[0].read_bytes(), "image/png")})
    assert_error(response, 400)
    assert_error(client.post("/api/search/image", files={"image": ("empty.png", b"", "image/png")}), 400)


def test_oversize_upload_is_413(client):
    payload = b"\0" * (MAX_UPLOAD_BYTES + 1)
    response = client.post("/api/search/image", files={"image": ("huge.png", payload, "image/png")})
    assert_error(response, 413)


def test_oversize_upload_without_content_length_is_cut_off_while_reading(client):
    """A chunked body declares no length, so only counting the bytes as they arrive can stop it."""
    boundary = "limit-test-boundary"
    sent = {"bytes": 0}

    def body():
        yield (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(64):  # 16 MiB in all, past the 10 MiB limit
            sent["bytes"] += 256 * 1024
            yield b"\0" * (256 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/api/search/image",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in {key.lower() for key in response.request.headers}
    assert_error(response, 413)


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/api/nothing-here"), 404)


def test_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="search-form"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_concurrent_requests_match_serial_answers(client, colour_images):
    _, image_paths = colour_images
    upload = image_paths[2].read_bytes()

    def text_ids(query):
        return [r["id"] for r in client.get("/api/search", params={"q": query, "top_k": 6}).json()["results"]]

    def image_ids():
        response = client.post("/api/search/image", params={"top_k": 6}, files={"image": ("q.png", upload, "image/png")})
        return [r["id"] for r in response.json()["results"]]

    def similar_ids(item_id):
        return [r["id"] for r in client.get(f"/api/similar/{item_id}", params={"top_k": 6}).json()["results"]]

    jobs = [(text_ids, (f"query {n % 4}",)) for n in range(8)] + [(image_ids, ())] * 4 + [(similar_ids, (3,))] * 4
    expected = [job(*args) for job, args in jobs]
    answers: list = [None] * len(jobs)
    errors: list = []

    def worker(position, job, args):
        try:
            answers[position] = job(*args)
        except Exception as error:  # noqa: BLE001 - any failure is reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n, job, args)) for n, (job, args) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert answers == expected


# ---------------------------------------------------------------------------------------------
# A hostile collection, encoded by the real encoder and served with its roots enforced
# ---------------------------------------------------------------------------------------------

NON_UTF8_NAME = b"caf\xe9-\xff.png"  # Latin-1 bytes: a legal Linux file name that is not UTF-8


def two_tone(size, left, right):
    image = Image.new("RGB", size, left)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def write_hostile_collection(root):
    """One file per awkward mode, each decoding to a distinct picture; returns their paths (str, as encoded)."""
    root.mkdir()
    rgba = two_tone((64, 48), (200, 30, 30), (0, 0, 255)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize((64, 48)))
    rgba.save(root / "rgba.png")
    la = Image.merge("LA", (Image.linear_gradient("L").resize((40, 56)), Image.new("L", (40, 56), 90)))
    la.save(root / "la.png")
    palette = two_tone((50, 50), (10, 160, 40), (250, 220, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(root / "palette_transparent.png", transparency=0)
    ramp = Image.linear_gradient("L").resize((60, 60)).transpose(Image.Transpose.ROTATE_180)
    Image.fromarray((np.asarray(ramp, dtype=np.uint16) * 257).astype("<u2")).save(root / "sixteen_bit.png")
    two_tone((48, 64), (20, 200, 200), (120, 0, 120)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    two_tone((80, 40), (255, 140, 0), (30, 30, 30)).save(root / "exif_rotated.jpg", exif=exif, quality=95)
    Image.radial_gradient("L").resize((52, 52)).save(root / "grey.png")
    two_tone((44, 44), (0, 0, 0), (255, 255, 255)).convert("1").save(root / "bilevel.png")
    non_utf8 = os.path.join(os.fsencode(root), NON_UTF8_NAME)
    with open(non_utf8, "wb") as file:
        two_tone((64, 64), (90, 60, 200), (240, 240, 240)).save(file, format="PNG")
    return sorted(os.fsdecode(os.path.join(os.fsencode(root), name)) for name in os.listdir(os.fsencode(root)))


@pytest.fixture(scope="module")
def hostile_collection(tmp_path_factory, tiny_checkpoint):
    from clipsearch.cli.encode import main as encode_main
    from clipsearch.search import SearchEngine

    work = tmp_path_factory.mktemp("hostile")
    image_paths = write_hostile_collection(work / "images")
    encode_main(
        ["--load_model", str(tiny_checkpoint), "--dataset_path", str(work / "images"), "--emb_path", str(work / "emb")]
        + ["--num_workers", "0", "--no_progress"]
    )
    engine = SearchEngine.from_files(tiny_checkpoint, work / "emb")
    assert sorted(engine.searcher.paths) == image_paths, "the encoder skipped part of the hostile collection"
    return work, image_paths, engine


@pytest.fixture(scope="module")
def hostile_client(hostile_collection):
    work, _, engine = hostile_collection
    with fastapi_testclient.TestClient(create_app(engine, serve_roots=[work / "images"])) as test_client:
        yield test_client


def test_every_hostile_image_uploaded_finds_itself_first(hostile_client, hostile_collection):
    _, image_paths, engine = hostile_collection
    for path in image_paths:
        data = open(path, "rb").read()
        response = hostile_client.post("/api/search/image", params={"top_k": 2}, files={"image": ("q", data)})
        assert response.status_code == 200, (path, response.text)
        best = response.json()["results"][0]
        assert engine.path_of(best["id"]) == path, (display_path(path), response.json()["results"])
        assert best["score"] == pytest.approx(1.0, abs=1e-4)


def test_cli_image_query_agrees_with_the_encoder(hostile_collection, tiny_checkpoint, capsys):
    from clipsearch.cli.search import main as search_main

    work, image_paths, _ = hostile_collection
    argv = ["--load_model", str(tiny_checkpoint), "--emb_path", str(work / "emb"), "--top_k", "1", "--json"]
    search_main(argv + ["--no_grid"] + [flag for path in image_paths for flag in ("--image", path)])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [answer["results"][0]["path"] for answer in answers] == [display_path(path) for path in image_paths]
    assert all(answer["grid"] is None for answer in answers)


def test_non_utf8_file_name_never_breaks_a_response(hostile_client, hostile_collection):
    _, image_paths, engine = hostile_collection
    item = next(n for n in range(len(engine.searcher)) if os.fsencode(engine.path_of(n)).endswith(NON_UTF8_NAME))
    escaped = display_path(engine.path_of(item))
    assert escaped.endswith("caf\\xe9-\\xff.png")

    responses = [
        hostile_client.get(f"/api/similar/{item}", params={"top_k": MAX_TOP_K}),
        hostile_client.get(f"/api/similar/{(item + 1) % len(image_paths)}", params={"top_k": MAX_TOP_K}),
        hostile_client.get("/api/search", params={"q": "a photo", "top_k": MAX_TOP_K}),
        hostile_client.post(
            "/api/search/image", params={"top_k": MAX_TOP_K}, files={"image": ("q", open(engine.path_of(item), "rb").read())}
        ),
    ]
    for response in responses:
        assert response.status_code == 200, response.text
        listed = {result["id"]: result["path"] for result in response.json()["results"]}
        if "query" in response.json() and response.json()["query"].get("id") == item:
            assert response.json()["query"]["path"] == escaped
        else:
            assert listed[item] == escaped
    original = hostile_client.get(f"/api/image/{item}")
    assert original.status_code == 200 and original.content == open(engine.path_of(item), "rb").read()
    assert hostile_client.get(f"/api/image/{item}", params={"size": 100}).status_code == 200


def test_files_outside_the_collection_roots_are_refused(tmp_path, tiny_checkpoint, colour_images):
    """A shard listing /etc/passwd, or a symlink out of the folder, gets a 403 and none of the file."""
    from clipsearch.search import SearchEngine, Searcher

    root = tmp_path / "collection"
    root.mkdir()
    inside = root / "inside.png"
    inside.write_bytes(colour_images[1][0].read_bytes())
    secret = tmp_path / "secret.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(secret)
    (root / "link-out.png").symlink_to(secret)
    listed = [str(inside), "/etc/passwd", str(root / "link-out.png"), str(root / ".." / secret.name)]
    bundle = load_bundle(tiny_checkpoint)
    engine = SearchEngine(bundle, Searcher(listed, torch.randn(len(listed), bundle.embed_dim)))
    with fastapi_testclient.TestClient(create_app(engine, serve_roots=[root])) as guarded:
        assert guarded.get("/api/image/0").content == inside.read_bytes()
        for item in (1, 2, 3):
            for params in ({}, {"size": 64}):
                response = guarded.get(f"/api/image/{item}", params=params)
                assert "outside the collection's folders" in assert_error(response, 403)
                assert b"root:" not in response.content
    with fastapi_testclient.TestClient(create_app(engine, serve_roots=None)) as open_server:
        assert open_server.get("/api/image/2").content == secret.read_bytes()  # the user's opt-out


def test_thumbnail_sizes_are_quantised_and_decoded_within_the_slots(engine, monkeypatch):
    from clipsearch.server import app as app_module

    assert {thumbnail_size(size) for size in range(1, 2000)} == set(THUMBNAIL_SIZES)
    assert all(thumbnail_size(size) >= size for size in range(1, THUMBNAIL_SIZES[-1] + 1))

    running, most = [0], [0]
    lock = threading.Lock()
    real_make_thumbnail = app_module.make_thumbnail

    def counting_make_thumbnail(path, size):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.01)
            return real_make_thumbnail(path, size)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(app_module, "make_thumbnail", counting_make_thumbnail)
    app = create_app(engine)
    with fastapi_testclient.TestClient(app) as fresh:
        def fetch(size):
            assert fresh.get("/api/image/5", params={"size": size}).status_code == 200

        threads = [threading.Thread(target=fetch, args=(size,)) for size in range(16, 1025, 16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert 1 <= most[0] <= MAX_CONCURRENT_DECODES
    assert sorted(key[-1] for key in app.state.thumbnails.keys()) == list(THUMBNAIL_SIZES)  # keys end with the edge


def test_thumbnail_cache_never_exceeds_its_byte_budget():
    cache = ThumbnailCache(max_bytes=10_000)
    generator = np.random.default_rng(0)
    for step in range(500):
        size = int(generator.integers(1, 4_000))
        cache.put((step % 37, int(generator.choice(THUMBNAIL_SIZES))), b"x" * size)
        assert cache.total_bytes <= 10_000
        assert cache.total_bytes == sum(len(cache.get(key)) for key in list(cache.keys()))
    cache.put((999, 96), b"x" * 10_001)  # larger than the whole budget: not kept
    assert cache.get((999, 96)) is None and cache.total_bytes <= 10_000


def mapped_file_of(tensor: torch.Tensor) -> str | None:
    """What /proc/self/maps names as holding `tensor`'s data (Linux): a file, "[heap]", or None when anonymous."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory maps (Linux)")
def test_serve_with_mmap_serves_the_consolidated_store(tmp_path, tiny_checkpoint, colour_images, monkeypatch):
    """`3_inference_search.sh --serve --mmap`: the served engine searches the fp16 file in place, answering as in memory."""
    import socket

    import clipsearch.server
    from clipsearch.cli.encode import main as encode_main
    from clipsearch.cli.search import main as search_main
    from clipsearch.search import SearchEngine

    emb_path = tmp_path / "emb"
    encode_main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(colour_images[0]),
                 "--emb_path", str(emb_path), "--num_workers", "0", "--no_progress", "--accelerator", "cpu"])
    served = {}

    def answer_instead_of_serving(engine, host, port, serve_roots, listener):
        with fastapi_testclient.TestClient(create_app(engine, serve_roots=serve_roots)) as served_client:
            served["engine"] = engine
            served["text"] = served_client.get("/api/search", params={"q": "a red square", "top_k": 3}).json()
            served["similar"] = served_client.get("/api/similar/4", params={"top_k": 3}).json()

    monkeypatch.setattr(clipsearch.server, "serve", answer_instead_of_serving)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    search_main(["--load_model", str(tiny_checkpoint), "--emb_path", str(emb_path), "--serve", "--mmap", "--port", port])

    store_file = str((emb_path / "consolidated" / "embeddings.f16").resolve())
    storage = served["engine"].searcher.storage
    assert storage.dtype == torch.float16 and mapped_file_of(storage) == store_file
    in_memory = SearchEngine.from_files(tiny_checkpoint, emb_path)
    assert mapped_file_of(in_memory.searcher.storage) != store_file  # the check tells the two apart
    expected = in_memory.search_text(["a red square"], 3)[0]
    top = served["text"]["results"][0]
    assert top["path"] == expected[0].path and top["score"] == pytest.approx(expected[0].score, abs=2e-3)
    assert len(served["similar"]["results"]) == 3 and 4 not in [hit["id"] for hit in served["similar"]["results"]]


# ---------------------------------------------------------------------------------------------
# Fields, filters, paging, embeddings and combined queries
# ---------------------------------------------------------------------------------------------


def test_results_carry_fields_and_filters_keep_only_passing_rows(client, colour_images):
    body = client.get("/api/search", params={"q": "a red square", "top_k": 12, "where": ["group=group1"]}).json()
    assert body["where"] == ["group=group1"] and len(body["results"]) == 4  # images 1, 4, 7, 10
    assert {result["id"] for result in body["results"]} == {1, 4, 7, 10}
    assert all(result["fields"] == {"group": "group1", "caption": f"colour number {result['id']}"} for result in body["results"])
    both = client.get("/api/search", params={"q": "x", "where": ["group!=group1", "caption~*number 1*"]}).json()
    assert {result["id"] for result in both["results"]} == {11}
    health = client.get("/api/health").json()
    assert health["fields"] == {"path": "text", "group": "text", "caption": "text"} and health["rows"] == "images"
    similar = client.get("/api/similar/4", params={"where": "group=group1"}).json()
    assert {result["id"] for result in similar["results"]} == {1, 7, 10}


def test_pages_join_into_the_whole_ranking(client):
    whole = client.get("/api/search", params={"q": "blue", "top_k": 12}).json()["results"]
    pages = [client.get("/api/search", params={"q": "blue", "top_k": 5, "offset": offset}).json() for offset in (0, 5, 10)]
    assert [result["id"] for page in pages for result in page["results"]] == [result["id"] for result in whole]
    assert [result["rank"] for result in pages[1]["results"]] == [6, 7, 8, 9, 10] and pages[1]["offset"] == 5
    assert pages[2]["results"][-1]["rank"] == 12 and len(pages[2]["results"]) == 2


def test_embeddings_come_back_when_asked(client, engine):
    plain = client.get("/api/search", params={"q": "green", "top_k": 2}).json()
    assert "embedding" not in plain["results"][0] and "query_embedding" not in plain
    body = client.get("/api/search", params={"q": "green", "top_k": 2, "embeddings": "true"}).json()
    for result in body["results"]:
        stored = engine.searcher.embeddings[result["id"]]
        assert np.allclose(result["embedding"], stored.numpy(), atol=1e-6)
        assert float(np.dot(result["embedding"], body["query_embedding"])) == pytest.approx(result["score"], abs=1e-4)
    torch.testing.assert_close(torch.tensor(body["query_embedding"]), engine.encode_texts(["green"])[0], atol=1e-5, rtol=0)


def test_combined_queries_as_json_and_with_uploads(client, engine, colour_images):
    _, image_paths = colour_images
    terms = [{"text": "a red square", "weight": 2}, {"id": 5, "weight": -1}]
    body = client.post("/api/query", json={"terms": terms, "top_k": 4, "where": ["group!=group2"], "embeddings": True}).json()
    from clipsearch.query_terms import ROW, TEXT, Term

    expected = engine.search([Term(TEXT, "a red square", 2.0), Term(ROW, 5, -1.0)], 4, ["group!=group2"])
    assert [result["id"] for result in body["results"]] == [hit.id for hit in expected]
    assert body["query"]["kind"] == "combined" and [term["kind"] for term in body["query"]["terms"]] == ["text", "row"]
    torch.testing.assert_close(torch.tensor(body["query_embedding"]),
                               engine.embed_terms([Term(TEXT, "a red square", 2.0), Term(ROW, 5, -1.0)]), atol=1e-5, rtol=0)
    # An uploaded image as a term: alone, it finds itself; with the word, the same ranking as the engine's.
    query = {"terms": [{"image": "photo"}, {"text": "blue", "weight": 0.5}], "top_k": 3}
    response = client.post("/api/query", data={"query": json.dumps(query)},
                           files={"photo": ("q.png", image_paths[7].read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["query"]["terms"][0] == {"kind": "image", "filename": "q.png", "weight": 1.0}
    alone = client.post("/api/query", data={"query": json.dumps({"terms": [{"image": "photo"}], "top_k": 1})},
                        files={"photo": ("q.png", image_paths[7].read_bytes(), "image/png")}).json()
    assert alone["results"][0]["id"] == 7


@pytest.mark.parametrize("body, status, message", [
    ({"terms": [{"text": "x"}] * (MAX_TERMS + 1)}, 400, f"at most {MAX_TERMS} terms"),
    ({"terms": [{"text": "x" * (MAX_QUERY_CHARS + 1)}]}, 400, "1 to 500 characters"),
    ({"terms": [{"text": "dog", "weight": "two"}]}, 400, "weight 'two' is not a number"),
    ({"terms": [{"text": "dog", "weight": 0}]}, 400, "other than 0"),
    ({"terms": [{"id": 999}]}, 404, "no collection item 999"),
    ({"terms": [{"id": 1}, {"id": 1, "weight": -1}]}, 400, "cancel out"),
    ({"terms": [{"image": "nothing"}]}, 400, "no uploaded file"),
    ({"terms": [{"colour": "red"}]}, 400, "a term is"),
    ({"terms": []}, 400, "non-empty list"),
    ({"terms": [{"text": "dog"}], "where": ["colour=red"]}, 400, "no field 'colour'"),
    ({"terms": [{"text": "dog"}], "where": ["group>"]}, 400, "no value"),
    ({"terms": [{"text": "dog"}], "offset": MAX_RESULTS}, 400, "offset must be"),
    ({"terms": [{"text": "dog"}], "top_k": 0}, 400, "top_k must be"),
])
def test_combined_query_refusals_are_one_clear_4xx(client, body, status, message):
    assert message in assert_error(client.post("/api/query", json=body), status)


@pytest.mark.parametrize("params, message", [
    ({"where": "group~"}, "no value"),
    ({"where": "size>big"}, "no field 'size'"),
    ({"where": ["a=1"] * (MAX_CONDITIONS + 1)}, f"at most {MAX_CONDITIONS} conditions"),
    ({"offset": MAX_RESULTS - 10, "top_k": 20}, f"rank {MAX_RESULTS} at most"),
])
def test_search_refusals_are_400_with_a_message(client, params, message):
    assert message in assert_error(client.get("/api/search", params={"q": "dog", **params}), 400)


def test_query_body_that_is_not_json_is_400(client):
    response = client.post("/api/query", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_error(response, 400)
    assert_error(client.post("/api/query", content=b"x", headers={"content-type": "text/plain"}), 415)
