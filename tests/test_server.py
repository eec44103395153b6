"""The web search API through FastAPI's TestClient: searches, images by id, limits and hostile input."""
from __future__ import annotations

import io
import struct
import threading
import zlib

import pytest
import torch
from PIL import Image

from clipsearch.checkpoint import load_bundle
from clipsearch.server import create_app
from clipsearch.server.app import MAX_QUERY_CHARS, MAX_TOP_K, MAX_UPLOAD_BYTES

fastapi_testclient = pytest.importorskip("fastapi.testclient")


def build_colour_engine(checkpoint_path, image_paths):
    """A real SearchEngine over the given images, embedded by the checkpoint's own image tower."""
    from clipsearch.search import SearchEngine, Searcher

    bundle = load_bundle(checkpoint_path)
    with torch.no_grad():
        pixels = torch.stack([bundle.eval_transform(Image.open(path).convert("RGB")) for path in image_paths])
        embeddings = bundle.model.encode_image(pixels)
    return SearchEngine(bundle, Searcher([str(path) for path in image_paths], embeddings))


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


def test_similar_search_starts_with_the_item_itself(client, colour_images):
    _, image_paths = colour_images
    body = client.get("/api/similar/4", params={"top_k": 4}).json()
    assert body["query"] == {"kind": "similar", "id": 4, "path": str(image_paths[4])}
    assert body["results"][0]["id"] == 4
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(body["results"]) == 4


def test_image_by_id_serves_the_file_and_bounded_thumbnails(client, colour_images):
    _, image_paths = colour_images
    original = client.get("/api/image/11")
    assert original.status_code == 200
    assert original.content == image_paths[11].read_bytes()
    thumbnail = client.get("/api/image/11", params={"size": 16})
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 16
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
