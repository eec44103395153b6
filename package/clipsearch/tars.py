"""Webdataset tars where users keep them (local paths, or s3://, gs://, http(s):// URLs through fsspec): listing, versions, samples, and members read back for display.

No torch: the encoder's reader turns these samples into batches, and `images.load_image` reads a
row named `<tar>#<key>` back from its tar.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clipsearch.errors import UserError

logger = logging.getLogger(__name__)

TAR_SUFFIX = ".tar"
# A row of a tar is named `<tar>#<key>`: the tar as given (absolute for a local file) and the sample's key.
MEMBER_SEPARATOR = "#"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CAPTION_MEMBER = "txt"
METADATA_MEMBER = "json"
# The package each object store needs: not installed by 0_install.sh, named when missing.
STORE_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# A tar that cannot be fetched is tried this many times, waiting RETRY_SECONDS, then twice as long, ...;
# a missing one (404, no such file) is not retried. Three tries over ~3 s ride out a dropped connection
# or a restarting server without holding a run for minutes on a URL that is down.
FETCH_TRIES = 3
RETRY_SECONDS = 1.0
# Versions of this many tars are asked for at once: object stores answer each in tens of milliseconds.
INFO_THREADS = 16
_TAR_BLOCK = 512
# Bytes kept from the end of what was read, for the end-of-archive check (tar pads its end to 10 KB records).
_TAIL = 64 * _TAR_BLOCK


class TarFetchError(Exception):
    """A tar could not be read after its tries (missing, or unreachable); the message says why."""


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def dataset_location(dataset_path: str | os.PathLike) -> str:
    """--dataset_path as recorded in model.json and the manifest: a URL as given, a local path made absolute."""
    text = str(dataset_path)
    return text if is_remote(text) else os.path.abspath(text)


def tars_collection_name(dataset_path: str | os.PathLike) -> str:
    """A name for a collection of tars (its default embedding folder): the folder that holds them."""
    first = str(dataset_path).split("::")[0].split("://", 1)[-1].rstrip("/")
    while first and (first.endswith(TAR_SUFFIX) or glob.has_magic(first) or "{" in first.rpartition("/")[2]):
        first = first.rpartition("/")[0]
    if not first and not is_remote(str(dataset_path)):
        first = os.getcwd()
    return os.path.basename(first.rstrip("/")) or "tars"


def row_name(tar: str, key: str) -> str:
    return f"{tar}{MEMBER_SEPARATOR}{key}"


def split_row_name(name: str) -> tuple[str, str] | None:
    """(tar, key) of a row named by `row_name`, or None for any other row (an image file's path).

    The tar is the part before the last '#' that ends in .tar: keys are webdataset keys (no '.').
    """
    tar, separator, key = name.rpartition(MEMBER_SEPARATOR)
    if not separator or not tar.endswith(TAR_SUFFIX) or not key:
        return None
    return tar, key


@functools.cache
def _filesystem(protocol: str, pid: int):
    """One filesystem per protocol and process: fsspec's async ones (http, s3, gs) refuse to run in a
    forked loader worker, which makes its own."""
    import fsspec

    try:
        return fsspec.filesystem(protocol)
    except ImportError as error:
        package = STORE_PACKAGES.get(protocol, getattr(error, "name", None) or "its fsspec backend")
        raise UserError(f"reading {protocol}:// needs the {package} package: pip install {package}") from None
    except ValueError:
        raise UserError(f"{protocol}:// is not a storage fsspec knows; give a local path or an s3://, gs:// "
                        "or https:// URL") from None


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a remote URL."""
    protocol = url.split("://", 1)[0].lower()
    return _filesystem(protocol, os.getpid()), url


def looks_like_tars(dataset_path: str) -> bool:
    """Whether --dataset_path names tars: a URL, a .tar file, a brace or glob pattern of them, a '::' list,
    or a folder holding .tar files and no split tables (a photo folder with a stray archive stays photos
    unless it holds only tars: give 'folder/*.tar' to say so)."""
    text = str(dataset_path)
    if is_remote(text) or "::" in text:
        return True
    if text.endswith(TAR_SUFFIX):
        return True
    if os.path.isdir(text):
        from clipsearch.data import IMAGE_EXTENSIONS
        from clipsearch.tables import tables_present

        names = os.listdir(text)
        return (any(name.endswith(TAR_SUFFIX) for name in names) and not tables_present(text)
                and not any(name.lower().endswith(IMAGE_EXTENSIONS) for name in names))
    return False


def _listed(url: str) -> list[str]:
    """The tars one expanded part names: itself, a glob's matches, or a folder's .tar files."""
    if is_remote(url):
        fs, path = filesystem(url)
        protocol = url.split("://", 1)[0]
        if url.endswith(TAR_SUFFIX) and not glob.has_magic(url.split("://", 1)[1]) or protocol in ("http", "https"):
            return [url]  # named (an HTTP server has no listing to glob)
        try:
            if glob.has_magic(url.split("://", 1)[1]):
                found = fs.glob(path)
            else:
                found = fs.ls(path, detail=False)
        except Exception as error:  # noqa: BLE001 - each store fails its own way
            raise UserError(f"cannot list {url}: {type(error).__name__}: {str(error)[:200]}") from None
        return sorted(fs.unstrip_protocol(entry) for entry in found if entry.endswith(TAR_SUFFIX))
    local = os.path.abspath(url.removeprefix("file://"))
    if glob.has_magic(local):
        return sorted(match for match in glob.glob(local) if match.endswith(TAR_SUFFIX))
    if os.path.isdir(local):
        return sorted(os.path.join(local, name) for name in os.listdir(local) if name.endswith(TAR_SUFFIX))
    return [local]


_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Brace patterns as webdataset (and so training) reads them: `{00000..00099}` counts, keeping the first
    number's width; `{a,b}` lists. Written here so that checking a pattern needs no torch."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    counted = re.fullmatch(r"(\d+)\.\.(\d+)", match.group(1))
    if counted:
        first, last = counted.groups()
        options = [f"{number:0{len(first)}d}" for number in range(int(first), int(last) + 1)]
    else:
        options = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def list_tars(dataset_path: str) -> list[str]:
    """Every tar --dataset_path names, in order, each once: brace patterns, globs, folders and '::' lists
    expanded. Local tars become absolute paths."""
    tars: dict[str, None] = {}
    for part in str(dataset_path).split("::"):
        if part:
            for url in expand_braces(part):
                tars.update(dict.fromkeys(_listed(url)))
    if not tars:
        raise UserError(f"--dataset_path {dataset_path} matches no .tar files")
    return list(tars)


def _transient(error: Exception, url: str) -> Exception:
    """The failure worth another try, or TarFetchError when the tar is missing for sure: a local file that is
    not there, a 404 or 410. fsspec's HTTP says "not found" for a refused connection too, with the
    connection error as its cause, which is worth retrying."""
    if isinstance(error, UserError):
        raise error
    if isinstance(error, FileNotFoundError):
        cause = error.__cause__
        if cause is None or getattr(cause, "status", None) in (404, 410):
            raise TarFetchError(f"not found: {url}") from None
        return cause
    return error


def _wait_or_give_up(attempt: int, failure: BaseException, url: str, what: str, progress: str = "") -> None:
    """Log and wait before try `attempt + 2`, or raise TarFetchError after the last one."""
    text = str(failure).strip()
    reason = f"{type(failure).__name__}: {text.splitlines()[0][:200] if text else ''}"
    if attempt + 1 == FETCH_TRIES:
        raise TarFetchError(f"{what} failed {FETCH_TRIES} times, last: {reason}") from None
    logger.warning("%s %s failed (%s); trying again%s", what, url, reason, progress)
    time.sleep(RETRY_SECONDS * 2**attempt)


def _with_tries(action: Callable, url: str, what: str):
    """`action()`, tried FETCH_TRIES times with doubling waits; a missing file fails at once."""
    for attempt in range(FETCH_TRIES):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - network and storage errors come in many types
            _wait_or_give_up(attempt, _transient(error, url), url, what)
    raise AssertionError("unreachable")


def tar_version(url: str) -> tuple | None:
    """What tells one version of a tar from another: (size, mtime_ns) of a local file; for a URL, its size and the
    store's version tag (ETag, generation, last-modified). None when it cannot be found or reached now."""
    if not is_remote(url):
        try:
            stat = os.stat(url)
        except OSError:
            return None
        return (stat.st_size, stat.st_mtime_ns)
    fs, path = filesystem(url)
    try:
        info = _with_tries(lambda: fs.info(path), url, "asking for the size of")
    except TarFetchError as error:
        logger.warning("%s: %s", url, error)
        return None
    tag = next((str(info[name]) for name in ("ETag", "etag", "generation", "md5Hash", "LastModified", "mtime",
                                              "updated", "last_modified") if info.get(name) is not None), "")
    return (int(info.get("size") or -1), tag)


def tar_versions(tars: Sequence[str]) -> dict[str, tuple | None]:
    with ThreadPoolExecutor(INFO_THREADS) as pool:
        return dict(zip(tars, pool.map(tar_version, tars)))


def open_tar_file(url: str, streaming: bool = True):
    """A binary file object reading the tar: local, or through fsspec, streamed front to back once (any
    HTTP server can do that; range requests are for `streaming=False`, reading one member back)."""
    if not is_remote(url):
        return open(url, "rb")
    fs, path = filesystem(url)
    if not streaming:
        return fs.open(path, "rb")
    if url.startswith(("http://", "https://")):
        return fs.open(path, "rb", block_size=0)  # one GET, no range requests
    return fs.open(path, "rb", block_size=1 << 22, cache_type="readahead")


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def key_and_extension(member_name: str) -> tuple[str, str]:
    """webdataset's split of a member name: the key is the path up to the first '.' of the file name."""
    folder, _, name = member_name.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


@dataclass
class TarSample:
    """The members of one key: an image, its caption (.txt) and metadata (.json), as bytes."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    mtime: int | None = None  # of the image member, seconds

    @property
    def image(self) -> bytes | None:
        return next((self.members[name] for name in IMAGE_MEMBERS if name in self.members), None)


@dataclass(frozen=True)
class TarProblem:
    """A part of a tar that yields no sample: `key` None for the tar itself (truncated after its last sample)."""

    key: str | None
    reason: str


class _CountingReader(io.RawIOBase):
    """Reads through a file object, remembering how far it got and the bytes just read (for the end check)."""

    def __init__(self, file):
        self.file = file
        self.position = 0
        self.tail = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # tarfile reads through read(): one copy fewer than RawIOBase's read over readinto.
        data = self.file.read(size)
        self.position += len(data)
        self.tail = data[-_TAIL:] if len(data) >= _TAIL else (self.tail + data)[-_TAIL:]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)



def _scan(file, seen: set[str]) -> Iterator[TarSample | TarProblem]:
    """Samples of one open tar in member order, skipping keys in `seen` (given before a retry); keys that
    come back later in the tar are one TarProblem, and so is a truncated tar's end.

    Stream mode reads each byte once (what a remote tar needs). Python's tarfile ends quietly on a
    tar cut at a header, so the end is checked: a whole tar has a zero block after its last member.
    """
    reader = _CountingReader(file)
    sample: TarSample | None = None
    end_of_members = 0
    this_pass: set[str] = set()
    duplicated: dict[str, None] = {}
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = key_and_extension(member.name)
                data = archive.extractfile(member).read()
                end_of_members = member.offset_data + -(-member.size // _TAR_BLOCK) * _TAR_BLOCK
                if sample is not None and key != sample.key:
                    if sample.key not in seen:
                        yield sample
                    sample = None
                if sample is None:
                    if key in this_pass:  # members apart from the key's first ones would make a second row
                        duplicated.setdefault(key)
                        continue
                    this_pass.add(key)
                    sample = TarSample(key)
                sample.members[extension] = data
                if extension in IMAGE_MEMBERS:
                    sample.mtime = int(member.mtime)
            # tarfile stopped at the end marker (or at a cut), at most one 10 KB record past the last member.
            compressed = getattr(archive.fileobj, "comptype", "tar") != "tar"
            trailer = reader.position - end_of_members
            end_block = reader.tail[len(reader.tail) - trailer :][:_TAR_BLOCK] if 0 < trailer <= _TAIL else b""
    except (tarfile.TarError, EOFError) as error:
        if sample is not None and sample.key not in seen:
            yield TarProblem(sample.key, f"truncated tar (it ends inside this sample: {error})")
        elif sample is None:
            yield TarProblem(None, f"truncated or not a tar ({error})")
        return
    if sample is not None and sample.key not in seen:
        yield sample
    if duplicated:  # named by the tar: a skip named <tar>#<key> would stand for the key's good row
        keys = list(duplicated)
        yield TarProblem(None, f"duplicate keys, members apart from each key's first ones left out: "
                               f"{', '.join(keys[:5])}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}")
    if compressed:  # offsets count uncompressed bytes; the decompressor itself fails on a cut stream
        return
    if len(end_block) < _TAR_BLOCK or any(end_block):
        last = f" after sample {sample.key}" if sample is not None else ""
        yield TarProblem(None, f"truncated tar (no end-of-archive block{last}): samples after it are missing")


def tar_samples(url: str) -> Iterator[TarSample | TarProblem]:
    """Every sample of a tar, once, in order. A read that fails (a dropped connection) is retried from a
    reopened tar, skipping the samples already given; after FETCH_TRIES it raises TarFetchError."""
    seen: set[str] = set()
    problems: set[TarProblem] = set()
    for attempt in range(FETCH_TRIES):
        try:
            with open_tar_file(url) as file:
                for item in _scan(file, seen):
                    if isinstance(item, TarSample):
                        seen.add(item.key)
                    elif item in problems:  # found again on a retry
                        continue
                    else:
                        problems.add(item)
                    yield item
            return
        except Exception as error:  # noqa: BLE001 - network and storage errors come in many types
            _wait_or_give_up(attempt, _transient(error, url), url, "reading",
                             f" after its {len(seen)} samples read" if seen else "")


def sample_fields(sample: TarSample, tar: str) -> tuple[dict, str | None]:
    """A sample's fields (its caption, the top-level values of its .json, its tar and key) and a problem
    worth a log line (a malformed .json or caption), or None."""
    from clipsearch.fields import scalar

    fields: dict = {}
    problem = None
    if METADATA_MEMBER in sample.members:
        try:
            metadata = json.loads(sample.members[METADATA_MEMBER])
            if not isinstance(metadata, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            problem = f"malformed .json ({str(error)[:80]}); its fields are left out"
        else:
            for name, value in metadata.items():
                value = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else scalar(value)
                if value is not None:
                    fields[str(name)] = value
    if CAPTION_MEMBER in sample.members:
        caption = sample.members[CAPTION_MEMBER].decode("utf-8", errors="replace").strip()
        if caption:
            fields["caption"] = caption
    fields["tar"], fields["key"] = tar, sample.key
    return fields, problem


# ---------------------------------------------------------------------------------------------
# One member read back, for thumbnails and result pages
# ---------------------------------------------------------------------------------------------

_member_index: dict[tuple, dict[str, tuple[int, int]]] = {}
_member_index_lock = threading.Lock()
# Tars whose member index is kept: an index is about 100 bytes per member.
MEMBER_INDEXES = 64


def _index_tar(url: str) -> dict[str, tuple[int, int]]:
    """key -> (data offset, size) of each sample's image member, from one pass over the tar's headers
    (seeking past the data: a local tar of 10,000 samples takes milliseconds)."""
    index: dict[str, tuple[int, int]] = {}
    with open_tar_file(url, streaming=False) as file, tarfile.open(fileobj=file, mode="r:") as archive:
        for member in archive:
            key, extension = key_and_extension(member.name)
            if member.isfile() and extension in IMAGE_MEMBERS and key not in index:
                index[key] = (member.offset_data, member.size)
    return index


def read_member_image(name: str) -> bytes | None:
    """The image bytes of a row named `<tar>#<key>`, or None when the tar or the key is gone.

    Each tar's headers are read once per process (kept for MEMBER_INDEXES tars, keyed by the tar's
    version), then every image of it is one ranged read.
    """
    parts = split_row_name(name)
    if parts is None:
        return None
    tar, key = parts
    version = tar_version(tar)
    if version is None:
        return None
    try:
        return _read_indexed_member(tar, key, version)
    except ValueError:  # a server without range requests (fsspec says so): read the tar up to the sample
        with open_tar_file(tar) as file:
            return next((item.image for item in _scan(file, set()) if isinstance(item, TarSample) and item.key == key),
                        None)


def _read_indexed_member(tar: str, key: str, version: tuple) -> bytes | None:
    cache_key = (tar, version)
    with _member_index_lock:
        index = _member_index.get(cache_key)
    if index is None:
        try:
            index = _index_tar(tar)
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - an unreadable tar shows as a missing image
            logger.warning("cannot read %s: %s", tar, error)
            return None
        with _member_index_lock:
            while len(_member_index) >= MEMBER_INDEXES:
                _member_index.pop(next(iter(_member_index)))
            _member_index[cache_key] = index
    if key not in index:
        return None
    offset, size = index[key]
    with open_tar_file(tar, streaming=False) as file:
        file.seek(offset)
        return file.read(size)


def write_tar(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]], mtime: int = 0):
    """A webdataset tar of `samples`, (key, {extension: bytes}) each, written atomically (tests, benchmarks)."""
    from clipsearch.durable import atomic_write

    def write(file) -> None:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for key, members in samples:
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size, info.mtime = len(data), mtime
                    archive.addfile(info, io.BytesIO(data))

    return atomic_write(path, write)
