"""HTTP server over one loaded SearchEngine: a JSON search API, collection images by id, and the search page."""
from __future__ import annotations

import bisect
import contextlib
import io
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path, PurePath

import torch
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from clipsearch.defaults import DEFAULT_TOP_K
from clipsearch.images import DECOMPRESSION_BOMB, SkipReasons, decode_image, display_path, load_image
from clipsearch.server.live import RELOAD_POLL_SECONDS, LiveCollection

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

MAX_QUERY_CHARS = 500
MAX_TOP_K = 200
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Multipart boundaries and part headers ride on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# A small compressed file can declare an enormous canvas; refuse before decoding any pixels.
MAX_UPLOAD_PIXELS = 40_000_000
# Each decode may hold a full-size RGB copy (up to ~120 MB at the pixel cap); bound how many run at once.
MAX_CONCURRENT_DECODES = 4
# Formats a browser would plausibly upload; every other PIL decoder stays unreachable from the network.
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
# Any requested edge is served as the next of these (the browser scales down), so one image has at
# most three cached variants instead of a thousand: the page's query preview is 48 CSS px (96 at 2x),
# its cards 190-250 CSS px (384 covers 190 at 2x).
THUMBNAIL_SIZES = (96, 192, 384)
MIN_THUMBNAIL_SIZE, MAX_THUMBNAIL_SIZE, DEFAULT_THUMBNAIL_SIZE = 16, 1024, 384
# A photo's 384 px JPEG thumbnail weighs 16-39 kB (three 640-720 px photos measured): 64 MiB keeps about
# two thousand, near a hundred pages of results.
THUMBNAIL_CACHE_BYTES = 64 * 2**20

PAGE_HEADERS = {
    # The page loads only its own script, style and images (uploads are previewed as blob: URLs).
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    """A request the API refuses, answered as {"error": message} with `status_code`."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def describe_model(spec: dict) -> dict:
    """The few spec fields a person needs to recognise the model, whichever family built it."""
    description = {"family": spec.get("family"), "embed_dim": spec.get("embed_dim")}
    if "architecture" in spec:
        description["architecture"] = spec["architecture"]
    else:
        image, text = spec.get("image", {}), spec.get("text", {})
        text_name = text.get("name") or (text.get("source") and PurePath(text["source"]).name)
        description["architecture"] = " + ".join(str(part) for part in (image.get("timm_name"), text_name) if part) or None
    description["image_size"] = spec.get("image", {}).get("size")
    return description


def parse_collection_id(raw_id: str, collection_size: int) -> int:
    """Accept only a plain decimal index into the collection; anything else names nothing we serve."""
    if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 12:
        raise ApiError(404, f"no collection item {raw_id[:40]!r}")
    item_id = int(raw_id)
    if item_id >= collection_size:
        raise ApiError(404, f"no collection item {item_id} (the collection holds {collection_size} images)")
    return item_id


def decode_upload(data: bytes) -> Image.Image:
    """A fully decoded RGB image from untrusted bytes, refusing non-images and decompression bombs.

    Decoded exactly as the encoder decoded the collection (clipsearch.images), so uploading a
    collection's own RGBA, 16-bit or EXIF-rotated file finds that file.
    """
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    reasons = SkipReasons(log=False)
    # The pixel cap is checked from the header, before any pixel is decoded.
    image = decode_image(io.BytesIO(data), "upload", reasons, formats=UPLOAD_FORMATS, max_pixels=MAX_UPLOAD_PIXELS)
    if image is not None:
        return image
    if reasons.reason == DECOMPRESSION_BOMB:
        raise ApiError(413, f"image has too many pixels: at most {MAX_UPLOAD_PIXELS:,} are accepted")
    if reasons.reason == "not an image":
        raise ApiError(415, f"upload is not a supported image ({', '.join(UPLOAD_FORMATS)})")
    raise ApiError(415, f"upload could not be decoded as an image ({reasons.reason})")


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The request body, stopping as soon as it passes `limit` bytes whatever Content-Length claimed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    chunks, received = [], 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(413, f"upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer; one line for the log, not a traceback
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        logger.warning("%s hung up during an upload, after %d bytes", client, received)
        raise ApiError(400, "the upload was cut off") from None
    return b"".join(chunks)


async def read_uploaded_image_bytes(request: Request) -> tuple[bytes, str]:
    """The bytes and filename of the multipart field 'image', within the upload size limit."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, "send the image as multipart/form-data in a field named 'image'")
    body = await read_capped_body(request, MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES)

    async def replay_body():
        yield body

    parser = MultiPartParser(request.headers, replay_body(), max_files=1, max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ApiError(400, f"malformed multipart upload: {error.message}") from error
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the multipart form has no file field named 'image'")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        return data, PurePath(upload.filename or "upload").name[:200]
    finally:
        await form.close()


class ThumbnailCache:
    """An LRU of encoded thumbnails holding at most `max_bytes`; the collection is fixed while the server runs."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._entries: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        return None

    def put(self, key: tuple, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            self.total_bytes -= len(previous) if previous is not None else 0
            self._entries[key] = value
            self.total_bytes += len(value)
            while self.total_bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.total_bytes -= len(evicted)

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._entries)


def thumbnail_size(requested: int) -> int:
    """The smallest of THUMBNAIL_SIZES at least `requested` pixels wide, or the largest."""
    return THUMBNAIL_SIZES[min(bisect.bisect_left(THUMBNAIL_SIZES, requested), len(THUMBNAIL_SIZES) - 1)]


def make_thumbnail(path: str | os.PathLike, size: int) -> bytes | None:
    """A JPEG of the image within a `size` square, decoded as the encoder saw it (upright); None if unreadable."""
    # A JPEG decodes at a reduced scale still at least `size`: a 4000x4000 photo costs a 500x500 decode.
    image = load_image(path, SkipReasons(), draft_size=size)
    if image is None:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def resolved_roots(roots: Sequence[str | os.PathLike]) -> list[Path]:
    return [Path(root).resolve() for root in roots]


def is_under_roots(path: str | os.PathLike, roots: Sequence[Path]) -> bool:
    """Whether `path`, with every symlink resolved, lies inside one of the (resolved) `roots`."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def create_app(engine, serve_roots: Sequence[str | os.PathLike] | None = None,
               poll_seconds: float = RELOAD_POLL_SECONDS) -> FastAPI:
    """The web app over an already loaded engine; requests share its model and read-only embeddings.

    Image files are served only from under `serve_roots` (symlinks resolved), so a shard listing
    /etc/passwd cannot make the server send it; None serves whatever the collection lists. An
    engine loaded from an embedding folder is reloaded when an update of the folder lands
    (live.LiveCollection, looked for every `poll_seconds`); ids in results carry the update they
    come from, so an image asked for by an older result's id is still the image it showed.
    """
    live = LiveCollection(engine, poll_seconds)
    model_description = describe_model(engine.bundle.spec)
    roots = None if serve_roots is None else resolved_roots(serve_roots)
    # Encoders are not documented as re-entrant, and the CPUs are better spent on one forward at a time;
    # the searcher's matrix multiply only reads, so it needs no lock of its own.
    inference_lock = threading.Lock()
    # Uploads and thumbnails share these: each decode may hold a full-size copy of an image.
    decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
    thumbnails = ThumbnailCache(THUMBNAIL_CACHE_BYTES)

    @contextlib.asynccontextmanager
    async def watching(app: FastAPI):
        live.start()
        try:
            yield
        finally:
            live.stop()

    app = FastAPI(title="clipsearch", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=watching)
    app.state.thumbnails = thumbnails  # for tests and benchmarks to inspect
    app.state.live = live

    @app.exception_handler(ApiError)
    async def api_error_response(request: Request, error: ApiError):
        return JSONResponse({"error": error.message}, status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error_response(request: Request, error: StarletteHTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error_response(request: Request, error: RequestValidationError):
        messages = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "request"
            messages.append(f"{where}: {problem.get('msg', 'invalid value')}")
        return JSONResponse({"error": "; ".join(messages)}, status_code=422)

    @app.middleware("http")
    async def safety_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def result_list(engine, hits) -> list[dict]:
        # Paths are shown escaped: a file name that is not UTF-8 cannot travel in JSON, the id fetches it.
        # Image URLs name the update the ids belong to, so they stay right (and cacheable) across a reload.
        update = "" if engine.update is None else f"update={engine.update}"
        return [
            {
                "rank": rank,
                "id": hit.id,
                "path": display_path(hit.path),
                "score": round(float(hit.score), 6),
                "image_url": f"/api/image/{hit.id}" + (f"?{update}" if update else ""),
                "thumbnail_url": f"/api/image/{hit.id}?size={DEFAULT_THUMBNAIL_SIZE}" + (f"&{update}" if update else ""),
            }
            for rank, hit in enumerate(hits, start=1)
        ]

    def answer(engine, query: dict, top_k: int, hits) -> dict:
        return {"query": query, "top_k": top_k, "update": engine.update, "results": result_list(engine, hits)}

    def locate(engine, raw_id: str, update: int | None) -> tuple[str, int | None]:
        """The image file an id names in the update it came from (the engine's by default), and its
        row in `engine` when the id is the engine's own (else None: look the path up)."""
        if update is None or update == engine.update:
            row = parse_collection_id(raw_id, len(engine.searcher))
            return engine.path_of(row), row
        previous = live.previous
        if previous is not None and previous.update == update:
            return previous.paths[parse_collection_id(raw_id, len(previous.paths))], None
        raise ApiError(410, f"ids of update {update} are out of date: the server now serves update {engine.update}; "
                            "search again")

    def decode_within_slots(data: bytes) -> Image.Image:
        with decode_slots:
            return decode_upload(data)

    def thumbnail_within_slots(key: tuple, path: str) -> bytes | None:
        with decode_slots:
            # Requests for the same thumbnail queue here; only the first decodes it.
            cached = thumbnails.get(key)
            if cached is not None:
                return cached
            thumbnail = make_thumbnail(path, key[-1])
            if thumbnail is not None:
                thumbnails.put(key, thumbnail)
            return thumbnail

    def search_text(engine, text: str, top_k: int):
        with inference_lock, torch.inference_mode():
            return engine.search_text([text], top_k)[0]

    def search_image(engine, image: Image.Image, top_k: int):
        with inference_lock, torch.inference_mode():
            return engine.search_image([image], top_k)[0]

    def search_similar(engine, item_id: int, top_k: int):
        searcher = engine.searcher
        with torch.inference_mode():
            # The item's stored (normalised) embedding is the query: no model call, no lock needed.
            # The item itself would top its own list, so one more is asked for and the item left out.
            query = searcher.embeddings[item_id : item_id + 1]
            hits = searcher.search(query, top_k + 1)[0]
        return [hit for hit in hits if hit.id != item_id][:top_k]

    @app.get("/api/health")
    def health():
        engine = live.engine
        return {
            "status": "ok",
            "collection_size": len(engine.searcher),
            "update": engine.update,  # the embedding folder's update these answers come from
            "update_complete": engine.complete,
            "embedding_dim": int(engine.searcher.dim),
            "model": model_description,
            "limits": {
                "max_query_chars": MAX_QUERY_CHARS,
                "max_top_k": MAX_TOP_K,
                "default_top_k": DEFAULT_TOP_K,
                "max_upload_bytes": MAX_UPLOAD_BYTES,
            },
        }

    @app.get("/api/search")
    async def text_search(
        q: str = Query(..., max_length=MAX_QUERY_CHARS, description="the text to search for"),
        top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K),
    ):
        text = q.strip()
        if not text:
            raise ApiError(400, "the query is empty")
        engine = live.engine  # this request's collection, whatever a reload does meanwhile
        hits = await run_in_threadpool(search_text, engine, text, top_k)
        return answer(engine, {"kind": "text", "text": text}, top_k, hits)

    @app.post("/api/search/image")
    async def image_search(request: Request, top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)):
        data, filename = await read_uploaded_image_bytes(request)
        # Decoding is CPU work on untrusted input; keep it off the event loop like inference.
        image = await run_in_threadpool(decode_within_slots, data)
        engine = live.engine
        hits = await run_in_threadpool(search_image, engine, image, top_k)
        return answer(engine, {"kind": "image", "filename": display_path(filename)}, top_k, hits)

    # `:path` lets ids holding a decoded '/' reach parse_collection_id too, for the same clear 404.
    @app.get("/api/similar/{item_id:path}")
    async def similar_search(
        item_id: str,
        top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K),
        update: int | None = Query(None, description="the update the id comes from (results name it)"),
    ):
        engine = live.engine
        path, index = locate(engine, item_id, update)
        index = engine.row_of(path) if index is None else index
        if index is None:
            raise ApiError(404, f"collection item {item_id} of update {update} is no longer in the collection")
        hits = await run_in_threadpool(search_similar, engine, index, top_k)
        return answer(engine, {"kind": "similar", "id": index, "path": display_path(path)}, top_k, hits)

    @app.get("/api/image/{item_id:path}")
    async def collection_image(
        item_id: str,
        size: int | None = Query(
            None, ge=MIN_THUMBNAIL_SIZE, le=MAX_THUMBNAIL_SIZE, description="thumbnail edge, served as the next of 96, 192, 384"
        ),
        update: int | None = Query(None, description="the update the id comes from (results name it)"),
    ):
        # The file is looked up from the collection by index; no client-sent path ever reaches the filesystem.
        path, _ = locate(live.engine, item_id, update)
        if roots is not None and not is_under_roots(path, roots):
            logger.warning("refused collection item %s: %s is outside the collection's folders", item_id, display_path(path))
            raise ApiError(
                403,
                f"collection item {item_id} lies outside the collection's folders; the server serves only "
                "files under them (restart it with --serve_root <folder>, or --serve_any_path to lift this)",
            )
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        if stat is None or not os.path.isfile(path):
            raise ApiError(404, f"collection item {item_id} is no longer on disk")
        # Only a URL naming its update may be cached long: without one, the id can mean another image later.
        cache_headers = {"Cache-Control": "public, max-age=3600" if update is not None else "no-cache"}
        if size is None:
            return FileResponse(path, headers=cache_headers)
        # Keyed by the file's version, not the id: ids change with updates, and a file can be rewritten.
        key = (path, stat.st_size, stat.st_mtime_ns, thumbnail_size(size))
        thumbnail = thumbnails.get(key)
        if thumbnail is None:
            thumbnail = await run_in_threadpool(thumbnail_within_slots, key, path)
            if thumbnail is None:
                raise ApiError(404, f"collection item {item_id} cannot be read as an image")
        return Response(thumbnail, media_type="image/jpeg", headers=cache_headers)

    @app.get("/", include_in_schema=False)
    def index_page():
        return FileResponse(STATIC_DIR / "index.html", headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", serve_roots=None):
    """A uvicorn server over `engine`, not yet started; `serve` runs it, tests run it in a thread."""
    import uvicorn

    app = create_app(engine, serve_roots=serve_roots)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    return uvicorn.Server(config)


def serve(
    engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    serve_roots: Sequence[str | os.PathLike] | None = None,
    listener: socket.socket | None = None,
) -> None:
    """Serve `engine` until interrupted; the model and embeddings stay loaded across requests.

    `listener` is a socket already bound to host:port (the CLI binds it before loading the model,
    so a port in use fails at once).
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can search the collection", host)
    if serve_roots is None:
        logger.warning("serving any file the collection lists (--serve_any_path)")
    else:
        logger.info("serving image files only from under %s", ", ".join(display_path(root) for root in serve_roots))
    logger.info("serving %d images at http://%s:%d/", len(engine.searcher), host, port)
    make_server(engine, host, port, serve_roots=serve_roots).run(sockets=[listener] if listener is not None else None)


@contextlib.contextmanager
def serve_in_background(engine, host: str = "127.0.0.1", log_level: str = "warning", serve_roots=None):
    """Run the server on a free port in a daemon thread for the `with` block; yields its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    server = make_server(engine, host, listener.getsockname()[1], log_level=log_level, serve_roots=serve_roots)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background search server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
