"""HTTP server over one loaded SearchEngine: a JSON search API, collection images by id, and the search page."""
from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path, PurePath

import torch
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

MAX_QUERY_CHARS = 500
MAX_TOP_K = 200
DEFAULT_TOP_K = 24
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Multipart boundaries and part headers ride on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# A small compressed file can declare an enormous canvas; refuse before decoding any pixels.
MAX_UPLOAD_PIXELS = 40_000_000
# Each decode may hold a full-size RGB copy (up to ~120 MB at the pixel cap); bound how many run at once.
MAX_CONCURRENT_DECODES = 4
# Formats a browser would plausibly upload; every other PIL decoder stays unreachable from the network.
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
MIN_THUMBNAIL_SIZE, MAX_THUMBNAIL_SIZE, DEFAULT_THUMBNAIL_SIZE = 16, 1024, 320
THUMBNAIL_CACHE_ENTRIES = 2048

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
    """A fully decoded RGB image from untrusted bytes, refusing non-images and decompression bombs."""
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError as error:
        raise ApiError(413, f"image has too many pixels ({error})") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ApiError(415, f"upload is not a supported image ({', '.join(UPLOAD_FORMATS)})") from error
    # Image.open reads only the header, so the declared size is known before any pixel is decoded.
    if image.width * image.height > MAX_UPLOAD_PIXELS:
        raise ApiError(413, f"image is {image.width}x{image.height}; at most {MAX_UPLOAD_PIXELS:,} pixels are accepted")
    # JPEGs decode straight at a reduced scale that still exceeds any encoder's input size.
    image.draft("RGB", (1024, 1024))
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise ApiError(415, f"upload could not be decoded as an image ({type(error).__name__})") from error


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The request body, stopping as soon as it passes `limit` bytes whatever Content-Length claimed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ApiError(413, f"upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        chunks.append(chunk)
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
    """A bounded LRU of encoded thumbnails; the collection is fixed while the server runs."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        return None

    def put(self, key: tuple[int, int], value: bytes) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def make_thumbnail(path: Path, size: int) -> bytes:
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # lets JPEG decode at a reduced scale: large photos stay cheap
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def create_app(engine) -> FastAPI:
    """The web app over an already loaded engine; requests share its model and read-only embeddings."""
    searcher = engine.searcher
    collection_size = len(searcher)
    model_description = describe_model(engine.bundle.spec)
    # Encoders are not documented as re-entrant, and the CPUs are better spent on one forward at a time;
    # the searcher's matrix multiply only reads, so it needs no lock of its own.
    inference_lock = threading.Lock()
    decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
    thumbnails = ThumbnailCache(THUMBNAIL_CACHE_ENTRIES)

    app = FastAPI(title="clipsearch", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")

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

    def result_list(hits) -> list[dict]:
        return [
            {
                "rank": rank,
                "id": hit.id,
                "path": hit.path,
                "score": round(float(hit.score), 6),
                "thumbnail_url": f"/api/image/{hit.id}?size={DEFAULT_THUMBNAIL_SIZE}",
            }
            for rank, hit in enumerate(hits, start=1)
        ]

    def decode_within_slots(data: bytes) -> Image.Image:
        with decode_slots:
            return decode_upload(data)

    def search_text(text: str, top_k: int):
        with inference_lock, torch.inference_mode():
            return engine.search_text([text], top_k)[0]

    def search_image(image: Image.Image, top_k: int):
        with inference_lock, torch.inference_mode():
            return engine.search_image([image], top_k)[0]

    def search_similar(item_id: int, top_k: int):
        with torch.inference_mode():
            # The item's stored (normalised) embedding is the query: no model call, no lock needed.
            query = searcher.embeddings[item_id : item_id + 1]
            return searcher.search(query, top_k)[0]

    @app.get("/api/health")
    def health():
        return {
            "status": "ok",
            "collection_size": collection_size,
            "embedding_dim": int(searcher.dim),
            "model": model_description,
            "limits": {
                "max_query_chars": MAX_QUERY_CHARS,
                "max_top_k": MAX_TOP_K,
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
        hits = await run_in_threadpool(search_text, text, top_k)
        return {"query": {"kind": "text", "text": text}, "top_k": top_k, "results": result_list(hits)}

    @app.post("/api/search/image")
    async def image_search(request: Request, top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)):
        data, filename = await read_uploaded_image_bytes(request)
        # Decoding is CPU work on untrusted input; keep it off the event loop like inference.
        image = await run_in_threadpool(decode_within_slots, data)
        hits = await run_in_threadpool(search_image, image, top_k)
        query = {"kind": "image", "filename": filename}
        return {"query": query, "top_k": top_k, "results": result_list(hits)}

    # `:path` lets ids holding a decoded '/' reach parse_collection_id too, for the same clear 404.
    @app.get("/api/similar/{item_id:path}")
    async def similar_search(item_id: str, top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)):
        index = parse_collection_id(item_id, collection_size)
        hits = await run_in_threadpool(search_similar, index, top_k)
        query = {"kind": "similar", "id": index, "path": engine.path_of(index)}
        return {"query": query, "top_k": top_k, "results": result_list(hits)}

    @app.get("/api/image/{item_id:path}")
    async def collection_image(
        item_id: str,
        size: int | None = Query(None, ge=MIN_THUMBNAIL_SIZE, le=MAX_THUMBNAIL_SIZE, description="thumbnail edge"),
    ):
        # The file is looked up from the collection by index; no client-sent path ever reaches the filesystem.
        index = parse_collection_id(item_id, collection_size)
        path = Path(engine.path_of(index))
        if not path.is_file():
            raise ApiError(404, f"collection item {index} is no longer on disk")
        cache_headers = {"Cache-Control": "public, max-age=3600"}
        if size is None:
            return FileResponse(path, headers=cache_headers)
        thumbnail = thumbnails.get((index, size))
        if thumbnail is None:
            try:
                thumbnail = await run_in_threadpool(make_thumbnail, path, size)
            except (OSError, ValueError) as error:
                logger.warning("cannot make a thumbnail of %s: %s", path, error)
                raise ApiError(404, f"collection item {index} cannot be read as an image") from error
            thumbnails.put((index, size), thumbnail)
        return Response(thumbnail, media_type="image/jpeg", headers=cache_headers)

    @app.get("/", include_in_schema=False)
    def index_page():
        return FileResponse(STATIC_DIR / "index.html", headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A uvicorn server over `engine`, not yet started; `serve` runs it, tests run it in a thread."""
    import uvicorn

    config = uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level, access_log=False)
    return uvicorn.Server(config)


def serve(engine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `engine` until interrupted; the model and embeddings stay loaded across requests."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can search the collection", host)
    logger.info("serving %d images at http://%s:%d/", len(engine.searcher), host, port)
    make_server(engine, host, port).run()


@contextlib.contextmanager
def serve_in_background(engine, host: str = "127.0.0.1", log_level: str = "warning"):
    """Run the server on a free port in a daemon thread for the `with` block; yields its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    server = make_server(engine, host, listener.getsockname()[1], log_level=log_level)
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
