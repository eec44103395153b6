"""The embedding folder on disk: shard files, model identity, update records, manifest, and the live collection."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from clipsearch.durable import FolderLock, atomic_write, remove_stale_temporaries, write_json  # noqa: F401  write_json re-exported for the store's callers
from clipsearch.errors import UserError
from clipsearch.fields import FILE_FIELDS, columns_of
from clipsearch.metadata import MetadataTable

logger = logging.getLogger(__name__)

# Shards keep the seed's name and contents, `{'path': [...], 'emb': [n, d]}`, the interchange format;
# the encoder adds 'skipped', per row 'stat' ([size, mtime_ns]) and 'digest' (of the file's bytes), and
# 'meta', the rows' fields as columns: {'kinds': {name: kind}, 'columns': {name: [value per row]}}.
SHARD_SUFFIX = ".ckpt"
TMP_SUFFIX = ".tmp"
SHARD_NAME_PATTERN = re.compile(r"^(\d+)-(\d+)-(\d+)\.ckpt$")
MODEL_FILE = "model.json"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.tsv"
DUPLICATES_FILE = "duplicates.tsv"
UPDATE_PATTERN = re.compile(r"^update-(\d+)\.json$")
INDEX_FILES = ("index.faiss", "index.json")
# What a folder's rows are (model.json's "rows"): images, or the captions of a table (encode --captions).
ROWS_IMAGES, ROWS_CAPTIONS = "images", "captions"
CAPTION_SEPARATOR = "#"
# model.json of this layout; a folder without it (or older) is read as described in `accepted_shards`.
FOLDER_FORMAT = 2
# Normalising a large matrix is done this many rows at a time so it needs no second full copy.
NORMALISE_ROWS = 65_536


class StoreError(UserError, ValueError):
    """The embedding folder cannot be used as it is; the message says which file and what to do.

    A ValueError too, so callers that catch bad input values that way print its one line as well.
    """


class MissingEmbeddingsError(StoreError, FileNotFoundError):
    """No folder, or a folder without shards."""


class ShardError(StoreError):
    """A shard file that cannot be read as an embedding shard, or that the folder's records do not list."""


class EncodingMismatchError(StoreError):
    """The folder holds another model's embeddings."""


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def shard_name(rank: int, step: int, batch_size: int) -> str:
    return f"{rank}-{step:03d}-{batch_size}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> tuple[int, int, int] | None:
    """(rank, step, batch_size) of a shard file name, or None for any other file."""
    match = SHARD_NAME_PATTERN.match(name)
    return tuple(int(group) for group in match.groups()) if match else None


def shard_sort_key(path: str | os.PathLike) -> tuple:
    """Rank, then step, numerically ('10-...' after '2-...'); other names after, by name."""
    name = Path(path).name
    parsed = parse_shard_name(name)
    return (0, parsed[0], parsed[1], name) if parsed else (1, 0, 0, name)


def list_shards(emb_path: str | os.PathLike) -> list[Path]:
    """Every finished shard file in the folder, in rank-then-step order (listed or not)."""
    return sorted((path for path in Path(emb_path).glob(f"*{SHARD_SUFFIX}") if path.is_file()), key=shard_sort_key)


def update_file(number: int) -> str:
    return f"update-{number:03d}.json"


def done_file(rank: int) -> str:
    return f"rank-{rank}.done.json"


def order_fingerprint(paths: Sequence[str], dim: int) -> str:
    """Identity of a collection's row order, so an index built on other rows is never trusted."""
    digest = hashlib.sha256(f"{len(paths)}:{dim}\n".encode())
    for path in paths:
        digest.update(path.encode("utf-8", errors="surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """Digest of a file's bytes: equal digests are exact duplicates (blake2b runs at about 1 GB/s)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_digest(data: bytes) -> str:
    """`file_digest` of bytes in memory (a tar member): the same digest as the file holding them."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_stat(path: str | os.PathLike) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, the change test of incremental updates; None when it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


def write_shard(
    path: str | os.PathLike,
    image_paths: list[str],
    embeddings: torch.Tensor,
    skipped: list[tuple[str, str]] | None = None,
    stats: list[tuple[int, ...] | None] | None = None,
    digests: list[str | None] | None = None,
    fields: Sequence[Mapping[str, object]] | None = None,
    tar: tuple[str, Sequence] | None = None,
) -> Path:
    """Save `{'path', 'emb', 'skipped'}` (+ per-row 'stat', 'digest' and fields when given); skipped images travel with it.

    A shard of a webdataset tar names it, `tar` = (url or path, version): 'tar' and 'tar_version'.

    `fields` holds one dict per row of scalar values (str, int, float, None): a table's other
    columns, an image file's facts (fields.FILE_FIELDS), a webdataset sample's caption and the
    top-level values of its .json. They are stored as columns beside the embeddings, in the same
    file, so a row and its fields are written, replaced and dropped together.
    """
    if len(image_paths) != embeddings.shape[0]:
        raise ValueError(f"{len(image_paths)} paths but {embeddings.shape[0]} embeddings for shard {path}")
    if fields is not None and len(fields) != len(image_paths):
        raise ValueError(f"{len(image_paths)} paths but {len(fields)} rows of fields for shard {path}")
    shard = {
        "path": list(image_paths),
        "emb": embeddings.detach().to("cpu", torch.float32).contiguous().clone(),
        "skipped": [[skipped_path, reason] for skipped_path, reason in (skipped or [])],
    }
    if stats is not None:
        shard["stat"] = [list(stat) if stat else None for stat in stats]
    if digests is not None:
        shard["digest"] = list(digests)
    if fields is not None:
        shard["meta"] = columns_of(fields, FILE_FIELDS)
    if tar is not None:
        # No version when the tar could not be asked for one but could be read: re-read on the next update.
        shard["tar"], shard["tar_version"] = tar[0], None if tar[1] is None else list(tar[1])
    buffer = io.BytesIO()  # serialised first, so a full disk is found before a byte is written
    torch.save(shard, buffer)
    return atomic_write(path, buffer.getbuffer())


def _unreadable(path: Path, reason: str) -> ShardError:
    return ShardError(
        f"{path} is not a readable embedding shard ({reason}); re-encode the folder "
        "(2_inference_encode.sh --overwrite) or remove this file"
    )


def read_shard(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A shard as plain data, checked; `weights_only` means a shard file can never run code.

    Any failure (truncated, corrupt, a pickle of other objects) is one ShardError naming the file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it
            warnings.simplefilter("ignore")
            try:
                shard = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # Files saved in torch's legacy (non-zip) format cannot be memory-mapped.
                shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every way a file fails to load is the same answer
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "weights_only" in str(error) or "Unpickl" in type(error).__name__:
            first_line = "it holds Python objects other than tensors and lists, refused unread"
        raise _unreadable(path, first_line[:200]) from None
    embeddings = shard.get("emb") if isinstance(shard, dict) else None
    image_paths = shard.get("path") if isinstance(shard, dict) else None
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or not isinstance(image_paths, list):
        raise _unreadable(path, "expected {'path': [...], 'emb': [n, d]}")
    if len(image_paths) != embeddings.shape[0]:
        raise _unreadable(path, f"{len(image_paths)} paths but {embeddings.shape[0]} embeddings")
    return shard


def encoding_lock(emb_path: str | os.PathLike, rank: int) -> FolderLock:
    """The lock one rank of an encoding run holds on the folder: a second run is refused, naming the first.

    Per rank, so the ranks of one run (started together, or node by node) never block each other,
    while any two runs meet at rank 0 at the latest.
    """
    return FolderLock(emb_path, f"encode-rank-{rank}", f"encoding (rank {rank})")


def remove_stale_tmp(emb_path: str | os.PathLike, rank: int) -> list[Path]:
    """Delete leftovers of killed runs: this rank's partial shards (the caller holds the rank's lock,
    so none is being written), and any other temporary whose writer has died; other ranks may be
    writing theirs right now."""
    stale = [
        path
        for path in Path(emb_path).glob(f"{rank}-*{SHARD_SUFFIX}*{TMP_SUFFIX}")
        if parse_shard_name(path.name.split(SHARD_SUFFIX)[0] + SHARD_SUFFIX)
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale + remove_stale_temporaries(emb_path)


# ---------------------------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------------------------


def model_source(load_model: str | os.PathLike) -> dict:
    """Where a model came from: the resolved checkpoint (not a `models/latest` link) and its run folder."""
    given = str(load_model)
    if not os.path.exists(given):  # a name that is not a file (e.g. a released model's tag)
        return {"load_model": given, "run": given}
    resolved = os.path.realpath(given)
    return {"load_model": resolved, "run": Path(resolved).parent.name}


def describe_model(identity: dict) -> str:
    run = identity.get("run")
    where = identity.get("load_model")
    return f"run {run} ({where}, fingerprint {identity.get('fingerprint')})" if run else f"{where} (fingerprint {identity.get('fingerprint')})"


def check_model(emb_path: Path, identity: dict, overwrite: bool) -> None:
    """Record which model fills this folder, or stop if it already holds another model's embeddings."""
    existing = read_json(emb_path / MODEL_FILE)
    if existing is None and not overwrite and list_shards(emb_path):
        raise EncodingMismatchError(
            f"{emb_path} holds shards without a model.json, written by something other than this encoder; "
            "use another --emb_path, or --overwrite to replace them"
        )
    if existing is not None and not overwrite:
        if rows_kind(existing) != rows_kind(identity):
            raise EncodingMismatchError(
                f"{emb_path} holds embeddings of {rows_kind(existing)}, and this run encodes {rows_kind(identity)}; "
                "give each its own --emb_path"
            )
        if (existing.get("fingerprint"), existing.get("embed_dim")) != (identity["fingerprint"], identity["embed_dim"]):
            raise EncodingMismatchError(
                f"{emb_path} holds embeddings of another model: {describe_model(existing)}, dim "
                f"{existing.get('embed_dim')}; this run encodes with {describe_model(identity)}, dim "
                f"{identity['embed_dim']}. Use a new --emb_path, or --overwrite to replace them."
            )
        if existing.get("format") == FOLDER_FORMAT:
            return
        raise EncodingMismatchError(
            f"{emb_path} was written by an older clipsearch, without update records; rerun with --overwrite "
            "to re-encode it (search still reads it as it is)"
        )
    write_json(emb_path / MODEL_FILE, {"format": FOLDER_FORMAT, **identity})


# ---------------------------------------------------------------------------------------------
# Records: which shards belong to the folder, and what each update removed
# ---------------------------------------------------------------------------------------------


def read_updates(emb_path: Path) -> list[dict]:
    """The folder's update records, oldest first."""
    updates = []
    for path in emb_path.iterdir():
        match = UPDATE_PATTERN.match(path.name)
        if match:
            record = read_json(path)
            if record is not None:
                updates.append(record)
    return sorted(updates, key=lambda record: record["update"])


def _legacy_updates(emb_path: Path) -> list[dict]:
    """A folder written before update records: the shards its per-rank done records list, as one update."""
    names: list[str] = []
    for path in sorted(emb_path.glob("rank-*.done.json")):
        names.extend((read_json(path) or {}).get("shards", []))
    return [{"update": 0, "shards": sorted(set(names), key=shard_sort_key), "removed": []}] if names else []


@dataclass
class Catalog:
    """What an embedding folder holds now: live rows by path, current skips, and the accepted shards."""

    shards: list[Path] = field(default_factory=list)
    loaded: list[dict] = field(default_factory=list)  # shard contents, embeddings memory-mapped
    # path -> (shard number, row in shard); insertion order is the collection's row order.
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    updates: list[dict] = field(default_factory=list)
    tars: dict[str, int] = field(default_factory=dict)  # a webdataset tar -> the shard that holds its rows

    def stat_of(self, path: str) -> tuple[int, int] | None:
        shard_number, row = self.rows[path]
        stats = self.loaded[shard_number].get("stat")
        stat = stats[row] if stats else None
        return tuple(stat) if stat else None

    def digest_of(self, path: str) -> str | None:
        shard_number, row = self.rows[path]
        digests = self.loaded[shard_number].get("digest")
        return digests[row] if digests else None

    def tar_version(self, tar: str) -> tuple | None:
        version = self.loaded[self.tars[tar]].get("tar_version")
        return None if version is None else tuple(version)

    def drop_tar(self, tar: str) -> None:
        """Forget a tar's rows and skips: those of the shard it was encoded into."""
        number = self.tars.pop(tar)
        shard = self.loaded[number]
        for path in shard["path"]:
            if self.rows.get(path, (None,))[0] == number:
                del self.rows[path]
        for skipped_path, _ in shard.get("skipped", []):
            self.skipped.pop(skipped_path, None)

    def add_update(self, emb_path: Path, update: dict) -> None:
        """Apply one update: drop what it removed (image paths, or tars), then take the rows of its shards that exist."""
        for path in update.get("removed", []):
            if path in self.tars:
                self.drop_tar(path)
            self.rows.pop(path, None)
            self.skipped.pop(path, None)
        for name in update["shards"]:
            path = emb_path / name
            if not path.is_file():  # not written yet (a run in progress, or killed)
                continue
            shard = read_shard(path, mmap=True)
            number = len(self.shards)
            self.shards.append(path)
            self.loaded.append(shard)
            if shard.get("tar") is not None:
                if shard["tar"] in self.tars:  # encoded again: its new rows replace the old ones
                    self.drop_tar(shard["tar"])
                self.tars[shard["tar"]] = number
            for row, image_path in enumerate(shard["path"]):
                self.rows.pop(image_path, None)  # re-inserted last, so row order follows updates
                self.rows[image_path] = (number, row)
                self.skipped.pop(image_path, None)
            for skipped_path, reason in shard.get("skipped", []):
                self.rows.pop(skipped_path, None)
                self.skipped[skipped_path] = reason
        self.updates.append(update)


def read_catalog(emb_path: str | os.PathLike, upto: int | None = None) -> Catalog:
    """Replay the folder's updates (those numbered below `upto`, or all) into the live catalog.

    A folder with model.json accepts only the shards its records list: any other `*.ckpt` file in
    it is refused, so a file dropped there can never add rows (or paths to serve). A folder without
    model.json is plain interchange shards, all read in rank-then-step order.
    """
    emb_path = Path(emb_path)
    catalog = Catalog()
    model = read_json(emb_path / MODEL_FILE)
    if model is None:
        # Plain shards are one update in rank-then-step order; a path repeated in a later shard
        # is the same image encoded again, so its last row stands.
        shards = [path.name for path in list_shards(emb_path)]
        if shards:
            catalog.add_update(emb_path, {"update": 0, "shards": shards, "removed": []})
        return catalog
    # Shards are listed before records are read: a rank writes an update's record before its first
    # shard, so a shard seen here is always covered by a record read after it.
    on_disk = list_shards(emb_path)
    updates = read_updates(emb_path) if model.get("format") == FOLDER_FORMAT else _legacy_updates(emb_path)
    listed = {name for update in updates for name in update["shards"]}
    foreign = [path.name for path in on_disk if path.name not in listed]
    if foreign:
        raise ShardError(
            f"{emb_path / foreign[0]} is not listed in the folder's records (update-*.json), so it was not "
            f"written by this folder's encoding runs{f' ({len(foreign) - 1} more such files)' if len(foreign) > 1 else ''}; "
            "it is refused: remove it, or re-encode the folder with --overwrite"
        )
    for update in updates:
        if upto is not None and update["update"] >= upto:
            break
        catalog.add_update(emb_path, update)
    return catalog


# ---------------------------------------------------------------------------------------------
# The live collection, for search, the index, the server and evaluation
# ---------------------------------------------------------------------------------------------


def normalise_rows(embeddings: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unit-length rows in a new contiguous tensor, normalised in float32 then stored as `dtype`."""
    dtype = dtype or (embeddings.dtype if embeddings.is_floating_point() else torch.float32)
    normalised = torch.empty(embeddings.shape, dtype=dtype)
    for start in range(0, embeddings.shape[0], NORMALISE_ROWS):
        rows = embeddings[start : start + NORMALISE_ROWS].float()
        normalised[start : start + NORMALISE_ROWS] = F.normalize(rows, dim=-1).to(dtype)
    return normalised


@dataclass
class Collection:
    """The current images of an embedding folder: one unit-length row per live image.

    `embeddings` is [n, d]; in float32 it is a transposed view of a [d, n] buffer (the Searcher's
    layout, so it needs no second copy): call `.contiguous()` where row-major memory matters.
    `digests` (one per row, None where unknown) mark exact duplicates: same digest, same bytes.
    `fields` holds every row's fields (caption, url, file facts...) for results and filters.
    """

    paths: list[str]
    embeddings: torch.Tensor
    model: dict
    digests: list[str | None]
    skipped: dict[str, str]
    complete: bool  # False while an encoding run is unfinished (no manifest for its last update)
    fields: MetadataTable | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def rows_kind(self) -> str:
        return rows_kind(self.model)

    @cached_property
    def order_fingerprint(self) -> str:
        return order_fingerprint(self.paths, self.dim)

    def duplicate_groups(self) -> list[list[int]]:
        """Rows whose files have the same bytes, each group in row order (groups of two or more)."""
        by_digest: dict[str, list[int]] = {}
        for row, digest in enumerate(self.digests):
            if digest is not None:
                by_digest.setdefault(digest, []).append(row)
        return [rows for rows in by_digest.values() if len(rows) > 1]


def load_collection(emb_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Collection:
    """Read the folder's live rows into one matrix of unit-length rows in `dtype`.

    Shards are memory-mapped and copied row by row into a preallocated matrix: peak memory is the
    collection once. Raises MissingEmbeddingsError, ShardError (naming the file), or
    EncodingMismatchError when shards disagree on the embedding size.
    """
    emb_path = Path(emb_path)
    if not emb_path.is_dir():
        raise MissingEmbeddingsError(f"embedding folder not found: {emb_path} (make it with 2_inference_encode.sh)")
    catalog = read_catalog(emb_path)
    if not catalog.shards:
        raise MissingEmbeddingsError(
            f"no embedding shards (*{SHARD_SUFFIX}) in {emb_path}; encode images first with 2_inference_encode.sh"
        )
    model = read_json(emb_path / MODEL_FILE) or {}
    dim, first = None, None
    for path, shard in zip(catalog.shards, catalog.loaded):
        shard_dim = int(shard["emb"].shape[1])
        if dim is None:
            dim, first = shard_dim, path.name
        elif shard_dim != dim and shard["emb"].shape[0]:
            raise EncodingMismatchError(
                f"shard {path} has {shard_dim}-d embeddings but {first} has {dim}-d; "
                "one folder must hold one model's embeddings"
            )
    count = len(catalog.rows)
    matrix = torch.empty(count, dim, dtype=dtype) if dtype != torch.float32 else torch.empty(dim, count, dtype=dtype).T
    # Rows grouped by shard, so each shard's rows are gathered with one index_select.
    rows_by_shard: dict[int, tuple[list[int], list[int]]] = {}
    for position, (shard_number, row) in enumerate(catalog.rows.values()):
        targets, sources = rows_by_shard.setdefault(shard_number, ([], []))
        targets.append(position)
        sources.append(row)
    for shard_number, (targets, sources) in rows_by_shard.items():
        embeddings = catalog.loaded[shard_number]["emb"]
        if sources == list(range(embeddings.shape[0])) and targets == list(range(targets[0], targets[0] + len(targets))):
            matrix[targets[0] : targets[0] + len(targets)] = normalise_rows(embeddings, dtype)
        else:
            matrix[torch.tensor(targets)] = normalise_rows(embeddings[torch.tensor(sources)], dtype)
    paths = [str(catalog.loaded[shard_number]["path"][row]) for shard_number, row in catalog.rows.values()]
    digests = []
    for shard_number, row in catalog.rows.values():
        shard_digests = catalog.loaded[shard_number].get("digest")
        digests.append(shard_digests[row] if shard_digests else None)
    complete = not model or (emb_path / MANIFEST_FILE).is_file()
    if not complete:
        logger.warning("%s has no manifest.json: its encoding run has not finished; searching what exists", emb_path)
    fields = MetadataTable.from_shards(paths, catalog.loaded, catalog.rows.values())
    return Collection(paths, matrix, model, digests, dict(catalog.skipped), complete, fields)


def caption_row_name(image_path: str, caption: str) -> str:
    """The row name of a caption in a folder of encode --captions: its image's path and a digest of its
    text, so an edited caption is a new row and the image is read back from the name."""
    digest = hashlib.blake2b(caption.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    return f"{image_path}{CAPTION_SEPARATOR}{digest}"


def caption_row_image(name: str) -> str:
    """The image file a caption row (`caption_row_name`) belongs to."""
    return name.rsplit(CAPTION_SEPARATOR, 1)[0]


def rows_kind(model: dict) -> str:
    """What a folder's rows are: "images", or "captions" for one encoded with `encode --captions`."""
    return model.get("rows", ROWS_IMAGES)


# ---------------------------------------------------------------------------------------------
# What a folder holds now: for derived files (consolidated store) and servers that watch it
# ---------------------------------------------------------------------------------------------


def file_versions(paths: Iterable[Path]) -> list[tuple[str, int, int, int]]:
    """(name, size, mtime_ns, inode) of each file that exists: a new version of a file changes its entry."""
    versions = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:  # gone since it was listed
            continue
        versions.append((path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return versions


def folder_inputs(emb_path: str | os.PathLike) -> list[tuple[str, int, int, int]]:
    """The versions of every shard and JSON record: what the folder's collection is made of.

    Adding, replacing or deleting a shard, or a new record (a manifest records deleted images),
    changes it. An index's record (X.json beside X.faiss) is an output, not an input.
    """
    emb_path = Path(emb_path)
    records = [path for path in sorted(emb_path.glob("*.json")) if not path.with_suffix(".faiss").exists()]
    return file_versions([*list_shards(emb_path), *records])


def update_in_progress(emb_path: str | os.PathLike) -> bool:
    """Whether an encoding run is changing the folder now (or was stopped): records without a manifest."""
    emb_path = Path(emb_path)
    return (emb_path / MODEL_FILE).is_file() and not (emb_path / MANIFEST_FILE).is_file()


def served_update(emb_path: str | os.PathLike) -> int | None:
    """The number of the folder's latest update (finished or not), or None for plain shards."""
    updates = [int(match.group(1)) for path in Path(emb_path).glob("update-*.json")
               if (match := UPDATE_PATTERN.match(path.name))]
    return max(updates, default=None)


# ---------------------------------------------------------------------------------------------
# Run records: clearing for --overwrite, and the manifest once every rank is done
# ---------------------------------------------------------------------------------------------


def clear_folder(emb_path: Path, rank: int, world_size: int) -> None:
    """Delete this rank's earlier files; rank 0 also deletes the records and what belongs to no rank of this run."""
    for path in emb_path.iterdir():
        name = path.name
        shard = parse_shard_name(name.split(SHARD_SUFFIX)[0] + SHARD_SUFFIX) if SHARD_SUFFIX in name else None
        if shard is not None:
            owner = shard[0]
        elif name.startswith("rank-") and name.endswith(".done.json"):
            owner = int(name[5:-10]) if name[5:-10].isdigit() else None
        elif name in (MANIFEST_FILE, ERRORS_FILE, DUPLICATES_FILE, *INDEX_FILES) or UPDATE_PATTERN.match(name):
            owner = 0
        elif name.startswith("errors-") and name.endswith(".tsv"):  # per-rank error lists of older versions
            owner = 0
        else:
            continue
        if owner == rank or (rank == 0 and (owner is None or owner >= world_size)):
            path.unlink(missing_ok=True)



def _write_tsv(path: Path, header: list[str], rows: Iterable[Sequence[str]]) -> None:
    # Tabs and newlines inside a file name would break the columns; they are escaped.
    lines = ("\t".join(value.replace("\t", "\\t").replace("\n", "\\n") for value in row) + "\n" for row in [header, *rows])
    atomic_write(path, "".join(lines))


def write_manifest_if_complete(emb_path: str | os.PathLike, extra: dict | None = None) -> dict | None:
    """Once every rank of the latest update has finished, write manifest.json, errors.tsv and duplicates.tsv.

    Done records survive kills and are checked against the update's plan and its shards, so a
    stale record of another run never completes a manifest.
    """
    emb_path = Path(emb_path)
    model = read_json(emb_path / MODEL_FILE)
    updates = read_updates(emb_path)
    if model is None or not updates:
        return None
    latest = updates[-1]
    records = [read_json(emb_path / done_file(rank)) for rank in range(latest["world_size"])]
    if any(record is None or record.get("plan") != latest["plan"] for record in records):
        return None
    if not all((emb_path / name).is_file() for name in latest["shards"]):
        return None
    catalog = read_catalog(emb_path)
    skipped_by_reason: dict[str, int] = {}
    for reason in catalog.skipped.values():
        skipped_by_reason[reason] = skipped_by_reason.get(reason, 0) + 1
    _write_tsv(emb_path / ERRORS_FILE, ["path", "reason"], sorted(catalog.skipped.items()))
    by_digest: dict[str, list[str]] = {}
    for path in catalog.rows:
        digest = catalog.digest_of(path)
        if digest is not None:
            by_digest.setdefault(digest, []).append(path)
    groups = {digest: paths for digest, paths in by_digest.items() if len(paths) > 1}
    _write_tsv(
        emb_path / DUPLICATES_FILE, ["digest", "path"], [(digest, path) for digest, paths in groups.items() for path in paths]
    )
    manifest = {
        **model,
        **{key: latest[key] for key in ("update", "world_size", "batch_size", "shard_size")},
        "counts": {"encoded": len(catalog.rows), "skipped": len(catalog.skipped), "shards": len(catalog.shards)},
        "this_update": {
            "encoded": sum(record.get("encoded", 0) for record in records),
            "removed": len(latest["removed"]),
            "seconds": max(record.get("seconds_this_run", 0) for record in records),
            **({"content_recheck": latest["content_recheck"]} if "content_recheck" in latest else {}),
        },
        "duplicates": {"groups": len(groups), "extra_copies": sum(len(paths) - 1 for paths in groups.values())},
        "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
        "errors_file": ERRORS_FILE,
        **({"source": latest["source"]} if "source" in latest else {}),
        **(extra or {}),
    }
    write_json(emb_path / MANIFEST_FILE, manifest)
    return manifest


def describe(manifest: dict, emb_path: str | os.PathLike) -> str:
    counts, update = manifest["counts"], manifest["this_update"]
    reasons = ", ".join(f"{count} {reason}" for reason, count in manifest["skipped_by_reason"].items())
    skipped = f"skipped {counts['skipped']} ({reasons}; see {ERRORS_FILE})" if counts["skipped"] else "skipped 0"
    duplicates = manifest["duplicates"]
    line = (
        f"{emb_path} holds {counts['encoded']} images in {counts['shards']} shards; this run encoded "
        f"{update['encoded']}; update {manifest['update']} dropped {update['removed']}"
        f"{' tars' if manifest.get('source') == 'tars' else ''} (deleted or changed); {skipped}"
    )
    if "content_recheck" in update:
        recheck = update["content_recheck"]
        line += (
            f"; rechecked the bytes of {recheck['rechecked']} files with unchanged size and mtime, "
            f"{recheck['changed']} changed"
        )
    if duplicates["groups"]:
        line += f"; {duplicates['extra_copies']} exact duplicates in {duplicates['groups']} groups (see {DUPLICATES_FILE})"
    return line
