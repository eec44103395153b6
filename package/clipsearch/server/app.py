"""HTTP server over one loaded SearchEngine: a JSON search API, collection images by id, and the search page."""
from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch
from fastapi import Depends, FastAPI, Query, Request
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
from clipsearch.fields import Condition, FilterError, parse_condition
from clipsearch.images import DECOMPRESSION_BOMB, SkipReasons, decode_image, display_path, load_image
from clipsearch.query_terms import IMAGE, MAX_TERMS, ROW, TEXT, Term, TermError, check_weight
from clipsearch.search import image_file
from clipsearch.server.live import RELOAD_POLL_SECONDS, LiveCollection
from clipsearch.tars import is_remote, read_member_image, split_row_name, tar_version

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

MAX_QUERY_CHARS = 500
MAX_TOP_K = 200
# Paging goes this deep (offset + top_k): far enough for people, a bound on each request's work.
MAX_RESULTS = 2000
# Filters a request may give, and their length: enough for any real one, a bound on each request's work.
MAX_CONDITIONS = 8
MAX_CONDITION_CHARS = 300
# A combined query in JSON (POST /api/query): its terms and their texts, ids and weights.
MAX_QUERY_BODY_BYTES = 64 * 1024
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


@dataclass(frozen=True)
class Ask:
    """What every search request shapes its answer with: how many, from which rank, among which rows, and
    whether the embeddings come back."""

    top_k: int = DEFAULT_TOP_K
    offset: int = 0
    where: tuple[Condition, ...] = ()
    embeddings: bool = False


async def asked(
    top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K),
    offset: int = Query(0, ge=0, le=MAX_RESULTS - 1, description="results to skip: offset=24 is page two of 24"),
    where: list[str] = Query([], description="FIELD OP VALUE filters, all must hold (see /api/health's fields)"),
    embeddings: bool = Query(False, description="return each result's embedding, and the query's"),
) -> Ask:
    """The search parameters of a request's URL. Async, so FastAPI runs it on the event loop: a sync
    dependency would wait for a worker thread before an upload is read, and a client that sent its
    upload and left meanwhile would find its bytes dropped."""
    return checked_ask(top_k, offset, where, embeddings)


def checked_ask(top_k: object, offset: object, where: object, embeddings: object) -> Ask:
    """The shared request parameters, checked: 4xx with one message for any that cannot be used."""
    for name, value, low, high in (("top_k", top_k, 1, MAX_TOP_K), ("offset", offset, 0, MAX_RESULTS - 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {value!r}")
    if offset + top_k > MAX_RESULTS:
        raise ApiError(400, f"offset + top_k may reach rank {MAX_RESULTS} at most, got {offset + top_k}")
    if not isinstance(where, list) or len(where) > MAX_CONDITIONS:
        raise ApiError(400, f"where takes a list of at most {MAX_CONDITIONS} conditions")
    if not isinstance(embeddings, bool):
        raise ApiError(400, "embeddings must be true or false")
    conditions = []
    for text in where:
        if not isinstance(text, str) or len(text) > MAX_CONDITION_CHARS:
            raise ApiError(400, f"each condition is a text of at most {MAX_CONDITION_CHARS} characters")
        try:
            conditions.append(parse_condition(text))
        except FilterError as error:
            raise ApiError(400, str(error)) from None
    return Ask(top_k, offset, tuple(conditions), embeddings)


def parse_query_body(text: str) -> dict:
    """The JSON of a combined query, its shape checked (the values are checked where they are used)."""
    try:
        body = json.loads(text)
    except ValueError:
        raise ApiError(400, "the query is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("terms"), list) or not body["terms"]:
        raise ApiError(400, 'the query must be a JSON object with a non-empty list "terms"')
    if len(body["terms"]) > MAX_TERMS:
        raise ApiError(400, f"a query takes at most {MAX_TERMS} terms, got {len(body['terms'])}")
    if not all(isinstance(term, dict) for term in body["terms"]):
        raise ApiError(400, 'each term is an object: {"text": ...}, {"id": ...} or {"image": ...}, with a "weight"')
    return body


def rounded(vector: torch.Tensor) -> list[float]:
    """An embedding as JSON numbers, to the six decimals its float32 cosines carry."""
    return [round(value, 6) for value in vector.float().tolist()]


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


async def read_multipart(request: Request, max_files: int, what: str) -> dict[str, tuple[bytes, str] | str]:
    """The fields of a multipart form within the upload limit (all files together): a file as (bytes, its
    name without folders), any other field as text."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, f"send {what} as multipart/form-data")
    body = await read_capped_body(request, MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES)

    async def replay_body():
        yield body

    parser = MultiPartParser(request.headers, replay_body(), max_files=max_files, max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ApiError(400, f"malformed multipart upload: {error.message}") from error
    try:
        fields: dict[str, tuple[bytes, str] | str] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(MAX_UPLOAD_BYTES + 1)
                if len(data) > MAX_UPLOAD_BYTES:
                    raise ApiError(413, f"upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
                fields[name] = (data, PurePath(value.filename or "upload").name[:200])
            else:
                fields[name] = value
        return fields
    finally:
        await form.close()


async def read_uploaded_image_bytes(request: Request) -> tuple[bytes, str]:
    """The bytes and filename of the multipart field 'image', within the upload size limit."""
    form = await read_multipart(request, 1, "the image in a field named 'image'")
    upload = form.get("image")
    if not isinstance(upload, tuple):
        raise ApiError(400, "the multipart form has no file field named 'image'")
    return upload


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


def image_media_type(data: bytes) -> str:
    """The media type of an image member of a tar, from its first bytes (a tar member has no file name to go by)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return "image/jpeg"


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

    def result_list(engine, hits, rank_from: int, embeddings: bool) -> list[dict]:
        # Paths are shown escaped: a file name that is not UTF-8 cannot travel in JSON, the id fetches it.
        # Image URLs name the update the ids belong to, so they stay right (and cacheable) across a reload.
        update = "" if engine.update is None else f"update={engine.update}"
        results = []
        for rank, hit in enumerate(hits, start=rank_from):
            result = {
                "rank": rank,
                "id": hit.id,
                "path": display_path(hit.path),
                "score": round(float(hit.score), 6),
                "fields": {name: display_path(value) if isinstance(value, str) else value
                           for name, value in hit.fields.items()},
                "image_url": f"/api/image/{hit.id}" + (f"?{update}" if update else ""),
                "thumbnail_url": f"/api/image/{hit.id}?size={DEFAULT_THUMBNAIL_SIZE}" + (f"&{update}" if update else ""),
            }
            if embeddings:
                result["embedding"] = rounded(engine.searcher.vectors(torch.tensor([hit.id]))[0])
            results.append(result)
        return results

    def answer(engine, query: dict, ask: Ask, hits, query_embedding=None) -> dict:
        body = {"query": query, "top_k": ask.top_k, "offset": ask.offset, "where": [str(c) for c in ask.where],
                "update": engine.update, "results": result_list(engine, hits, ask.offset + 1, ask.embeddings)}
        if ask.embeddings and query_embedding is not None:
            body["query_embedding"] = rounded(query_embedding)
        return body

    def locate(engine, raw_id: str, update: int | None) -> tuple[str, int | None]:
        """The row path an id names in the update it came from (the engine's by default), and its row in
        `engine` when the id is the engine's own (else None: look the path up)."""
        if update is None or update == engine.update:
            row = parse_collection_id(raw_id, len(engine.searcher))
            return engine.path_of(row), row
        previous = live.previous
        if previous is not None and previous.update == update:
            return previous.paths[parse_collection_id(raw_id, len(previous.paths))], None
        raise ApiError(410, f"ids of update {update} are out of date: the server now serves update {engine.update}; "
                            "search again")

    def current_row(engine, raw_id: str, update: int | None) -> tuple[str, int]:
        """The engine's row for an id of any update the server still knows; 404 when it left the collection."""
        path, row = locate(engine, raw_id, update)
        row = engine.row_of(path) if row is None else row
        if row is None:
            raise ApiError(404, f"collection item {raw_id} of update {update} is no longer in the collection")
        return path, row

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

    def run_search(engine, terms: list, ask: Ask, exclude: Sequence[int] = ()):
        """Embed and rank under the model's lock; (hits, the query's embedding)."""
        with inference_lock, torch.inference_mode():
            try:
                query = engine.embed_terms(terms)
                text = all(term.kind == TEXT for term in terms)
                hits = engine.search_embedding(query, ask.top_k, ask.where, ask.offset, text, exclude)
            except (FilterError, TermError) as error:
                raise ApiError(400, str(error)) from None
        return hits, query

    async def searched(engine, terms: list, ask: Ask, query: dict, exclude: Sequence[int] = ()) -> dict:
        hits, embedding = await run_in_threadpool(run_search, engine, terms, ask, exclude)
        return answer(engine, query, ask, hits, embedding)

    @app.get("/api/health")
    def health():
        engine = live.engine
        return {
            "status": "ok",
            "collection_size": len(engine.searcher),
            "update": engine.update,  # the embedding folder's update these answers come from
            "update_complete": engine.complete,
            "embedding_dim": int(engine.searcher.dim),
            "rows": engine.rows_kind,  # "images", or "captions" for a folder of encode --captions
            "fields": engine.fields.fields,  # each field's kind (number, date, text), for --where-style filters
            "model": model_description,
            "limits": {
                "max_query_chars": MAX_QUERY_CHARS,
                "max_top_k": MAX_TOP_K,
                "default_top_k": DEFAULT_TOP_K,
                "max_results": MAX_RESULTS,
                "max_terms": MAX_TERMS,
                "max_conditions": MAX_CONDITIONS,
                "max_upload_bytes": MAX_UPLOAD_BYTES,
            },
        }

    @app.get("/api/search")
    async def text_search(
        q: str = Query(..., max_length=MAX_QUERY_CHARS, description="the text to search for"),
        ask: Ask = Depends(asked),
    ):
        text = q.strip()
        if not text:
            raise ApiError(400, "the query is empty")
        engine = live.engine  # this request's collection, whatever a reload does meanwhile
        return await searched(engine, [Term(TEXT, text)], ask, {"kind": "text", "text": text})

    @app.post("/api/search/image")
    async def image_search(request: Request, ask: Ask = Depends(asked)):
        data, filename = await read_uploaded_image_bytes(request)
        # Decoding is CPU work on untrusted input; keep it off the event loop like inference.
        image = await run_in_threadpool(decode_within_slots, data)
        engine = live.engine
        return await searched(engine, [Term(IMAGE, image)], ask, {"kind": "image", "filename": display_path(filename)})

    # `:path` lets ids holding a decoded '/' reach parse_collection_id too, for the same clear 404.
    @app.get("/api/similar/{item_id:path}")
    async def similar_search(
        item_id: str,
        ask: Ask = Depends(asked),
        update: int | None = Query(None, description="the update the id comes from (results name it)"),
    ):
        engine = live.engine
        path, row = current_row(engine, item_id, update)
        # The item's stored embedding is the query (no model call); it would top its own list, so it is left out.
        query = {"kind": "similar", "id": row, "path": display_path(path)}
        return await searched(engine, [Term(ROW, row)], ask, query, exclude=[row])

    @app.post("/api/query")
    async def combined_search(request: Request):
        """A query of several weighted terms: JSON {"terms": [{"text"|"id"|"image": ..., "weight": w}, ...],
        "top_k", "offset", "where": [...], "embeddings"}, or that JSON in the multipart field "query" beside
        the image files its "image" terms name."""
        content_type = request.headers.get("content-type", "")
        uploads: dict[str, tuple[bytes, str] | str] = {}
        if content_type.startswith("multipart/form-data"):
            uploads = await read_multipart(request, MAX_TERMS, "the query (field 'query') and its images")
            text = uploads.pop("query", None)
            if not isinstance(text, str):
                raise ApiError(400, "the multipart form has no field named 'query' holding the query's JSON")
        elif content_type.startswith("application/json"):
            text = (await read_capped_body(request, MAX_QUERY_BODY_BYTES)).decode("utf-8", errors="replace")
        else:
            raise ApiError(415, "send the query as application/json, or as multipart/form-data with images")
        body = parse_query_body(text)
        ask = checked_ask(body.get("top_k", DEFAULT_TOP_K), body.get("offset", 0), body.get("where", []),
                          body.get("embeddings", False))
        engine = live.engine
        terms, shown = [], []
        for position, spec in enumerate(body["terms"]):
            weight = spec.get("weight", 1.0)
            where = f"terms[{position}]"
            try:
                weight = check_weight(weight, where)
            except TermError as error:
                raise ApiError(400, str(error)) from None
            if "text" in spec:
                text = spec["text"]
                if not isinstance(text, str) or not text.strip() or len(text) > MAX_QUERY_CHARS:
                    raise ApiError(400, f"{where}: text must be 1 to {MAX_QUERY_CHARS} characters")
                terms.append(Term(TEXT, text.strip(), weight))
                shown.append({"kind": TEXT, "text": text.strip(), "weight": weight})
            elif "id" in spec:
                update = spec.get("update")
                if update is not None and (isinstance(update, bool) or not isinstance(update, int)):
                    raise ApiError(400, f"{where}: update must be an integer")
                path, row = current_row(engine, str(spec["id"]), update)
                terms.append(Term(ROW, row, weight))
                shown.append({"kind": ROW, "id": row, "path": display_path(path), "weight": weight})
            elif "image" in spec:
                upload = uploads.get(str(spec["image"]))
                if not isinstance(upload, tuple):
                    raise ApiError(400, f"{where}: no uploaded file named {str(spec['image'])[:40]!r} in the form")
                image = await run_in_threadpool(decode_within_slots, upload[0])
                terms.append(Term(IMAGE, image, weight))
                shown.append({"kind": IMAGE, "filename": display_path(upload[1]), "weight": weight})
            else:
                raise ApiError(400, f"{where}: a term is {{\"text\": ...}}, {{\"id\": ...}} or {{\"image\": ...}}")
        return await searched(engine, terms, ask, {"kind": "combined", "terms": shown})

    async def thumbnail_response(item_id: str, key: tuple, path: str, cache_headers: dict) -> Response:
        """The JPEG thumbnail cached under `key` (the image's version and edge), made once from `path`."""
        thumbnail = thumbnails.get(key)
        if thumbnail is None:
            thumbnail = await run_in_threadpool(thumbnail_within_slots, key, path)
            if thumbnail is None:
                raise ApiError(404, f"collection item {item_id} cannot be read as an image")
        return Response(thumbnail, media_type="image/jpeg", headers=cache_headers)

    async def tar_member_image(item_id: str, path: str, tar: str, size: int | None, update: int | None):
        # A remote tar is one the encoder read itself; a local one must lie under the collection's folders.
        if roots is not None and not is_remote(tar) and not is_under_roots(tar, roots):
            raise ApiError(403, f"collection item {item_id} lies in a tar outside the collection's folders; restart "
                                "the server with --serve_root <folder>, or --serve_any_path to lift this")
        version = await run_in_threadpool(tar_version, tar)
        if version is None:
            raise ApiError(404, f"collection item {item_id}: its tar {tar} cannot be read now")
        cache_headers = {"Cache-Control": "public, max-age=3600" if update is not None else "no-cache"}
        if size is None:
            data = await run_in_threadpool(read_member_image, path)
            if data is None:
                raise ApiError(404, f"collection item {item_id} is no longer in its tar")
            return Response(data, media_type=image_media_type(data), headers=cache_headers)
        return await thumbnail_response(item_id, (path, *version, thumbnail_size(size)), path, cache_headers)

    @app.get("/api/image/{item_id:path}")
    async def collection_image(
        item_id: str,
        size: int | None = Query(
            None, ge=MIN_THUMBNAIL_SIZE, le=MAX_THUMBNAIL_SIZE, description="thumbnail edge, served as the next of 96, 192, 384"
        ),
        update: int | None = Query(None, description="the update the id comes from (results name it)"),
    ):
        # The file is looked up from the collection by index; no client-sent path ever reaches the filesystem.
        engine = live.engine
        path, _ = locate(engine, item_id, update)
        path = image_file(path, engine.rows_kind)  # a caption's row shows its image
        member = split_row_name(path) if not os.path.isfile(path) else None
        if member is not None:  # a sample of a webdataset tar: its image member, read from the tar
            return await tar_member_image(item_id, path, member[0], size, update)
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
        return await thumbnail_response(item_id, key, path, cache_headers)

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
