"""Writer stage: collects one shard's batches and writes it through the store, atomically and durably."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from clipsearch.fields import stat_fields

# list_shards ... write_json moved to clipsearch.store; importable from here for older callers.
from clipsearch.store import (  # noqa: F401
    list_shards,
    read_json,
    read_shard,
    shard_name,
    write_json,
    write_shard,
)


class ShardWriter:
    """Collects one shard's batches and writes the shard when the runner moves to the next one.

    `stat_of` gives each image's (size, mtime_ns[, digest of its table fields]) as the plan saw it:
    stored per row, it is what the next incremental update compares against. Each row's fields are
    its file's size and time, what decoding learnt (the batch's `facts`), and its table fields
    (`fields_of`), which win where names meet.
    """

    def __init__(self, emb_path: str | os.PathLike, rank: int, batch_size: int, embed_dim: int, stat_of: dict,
                 fields_of: dict[str, dict] | None = None, file_facts: bool = True):
        self.emb_path = Path(emb_path)
        self.embed_dim = embed_dim
        self.rank = rank
        self.batch_size = batch_size
        self.stat_of = stat_of
        self.fields_of = fields_of or {}
        self.file_facts = file_facts  # rows that are files (not captions) get their size and time
        self.step: int | None = None
        self.embeddings: list[torch.Tensor] = []
        self.image_paths: list[str] = []
        self.digests: list[str | None] = []
        self.facts: list[dict] = []
        self.skipped: list[tuple[str, str]] = []
        self.written: list[Path] = []

    def path_of(self, step: int) -> Path:
        return self.emb_path / shard_name(self.rank, step, self.batch_size)

    def is_done(self, step: int) -> bool:
        return self.path_of(step).is_file()

    def add(self, step: int, embeddings: torch.Tensor | None, batch) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        if len(batch.image_paths):
            self.embeddings.append(embeddings)
            self.image_paths.extend(batch.image_paths)
            self.digests.extend(batch.digests)
            self.facts.extend(batch.facts or [{}] * len(batch.image_paths))
        self.skipped.extend(batch.skipped)

    def flush(self) -> Path | None:
        if self.step is None:
            return None
        embeddings = torch.cat(self.embeddings) if self.embeddings else torch.empty(0, self.embed_dim)
        stats = [self.stat_of.get(path) for path in self.image_paths]
        fields = [
            {**(stat_fields(stat) if self.file_facts else {}), **(facts or {}), **self.fields_of.get(path, {})}
            for path, stat, facts in zip(self.image_paths, stats, self.facts)
        ]
        path = write_shard(self.path_of(self.step), self.image_paths, embeddings, self.skipped, stats, self.digests,
                           fields)
        self.written.append(path)
        self.step, self.embeddings, self.image_paths, self.digests, self.facts, self.skipped = None, [], [], [], [], []
        return path
