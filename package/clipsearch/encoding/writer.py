"""Writer stage: embedding shards and run records, each written atomically so a kill never leaves half a file."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import torch

SHARD_SUFFIX = ".ckpt"
TMP_SUFFIX = ".tmp"
SHARD_NAME_PATTERN = re.compile(r"^(\d+)-(\d+)-(\d+)\.ckpt$")


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
    """Every finished shard in the folder, in the stable order rows are numbered by."""
    return sorted((path for path in Path(emb_path).glob(f"*{SHARD_SUFFIX}") if path.is_file()), key=shard_sort_key)


def atomic_replace(path: str | os.PathLike, write, per_process: bool = False) -> Path:
    """Run `write(temporary_path)`, then rename over `path`; readers see the old file or the new one.

    `per_process` names the temporary after the process and thread, for files that several ranks
    write at once: with one shared temporary name, one rank's rename takes away the file another
    rank is about to rename (a crash seen in the two-process encoding test).
    """
    path = Path(path)
    writer = f".{os.getpid()}-{threading.get_ident()}" if per_process else ""
    temporary = path.with_name(path.name + writer + TMP_SUFFIX)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_json(path: str | os.PathLike, data: dict) -> Path:
    return atomic_replace(
        path, lambda temporary: Path(temporary).write_text(json.dumps(data, indent=2) + "\n"), per_process=True
    )


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_shard(
    path: str | os.PathLike,
    image_paths: list[str],
    embeddings: torch.Tensor,
    skipped: list[tuple[str, str]] | None = None,
) -> Path:
    """Save `{'path', 'emb', 'skipped'}`; the skipped list travels with the shard so resumes keep it."""
    if len(image_paths) != embeddings.shape[0]:
        raise ValueError(f"{len(image_paths)} paths but {embeddings.shape[0]} embeddings for shard {path}")
    shard = {
        "path": list(image_paths),
        "emb": embeddings.detach().to("cpu", torch.float32).contiguous().clone(),
        "skipped": [[skipped_path, reason] for skipped_path, reason in (skipped or [])],
    }
    return atomic_replace(path, lambda temporary: torch.save(shard, temporary))


def read_shard(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A shard as plain data; `weights_only` means a shard file can never run code."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def remove_stale_tmp(emb_path: str | os.PathLike, rank: int) -> list[Path]:
    """Delete this rank's leftovers of a killed run; other ranks may be writing theirs right now."""
    stale = [
        path
        for path in Path(emb_path).glob(f"{rank}-*{SHARD_SUFFIX}{TMP_SUFFIX}")
        if parse_shard_name(path.name.removesuffix(TMP_SUFFIX))
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class ShardWriter:
    """Collects one shard's batches and writes the shard when the runner moves to the next one."""

    def __init__(self, emb_path: str | os.PathLike, rank: int, batch_size: int, embed_dim: int):
        self.emb_path = Path(emb_path)
        self.embed_dim = embed_dim
        self.rank = rank
        self.batch_size = batch_size
        self.step: int | None = None
        self.embeddings: list[torch.Tensor] = []
        self.image_paths: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.written: list[Path] = []

    def path_of(self, step: int) -> Path:
        return self.emb_path / shard_name(self.rank, step, self.batch_size)

    def is_done(self, step: int) -> bool:
        return self.path_of(step).is_file()

    def add(self, step: int, embeddings: torch.Tensor, image_paths: list[str], skipped: list[tuple[str, str]]):
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        if len(image_paths):
            self.embeddings.append(embeddings)
            self.image_paths.extend(image_paths)
        self.skipped.extend(skipped)

    def flush(self) -> Path | None:
        if self.step is None:
            return None
        if self.embeddings:
            embeddings = torch.cat(self.embeddings)
        else:
            embeddings = torch.empty(0, self.embed_dim)
        path = write_shard(self.path_of(self.step), self.image_paths, embeddings, self.skipped)
        self.written.append(path)
        self.step, self.embeddings, self.image_paths, self.skipped = None, [], [], []
        return path
