"""Writer stage: collects one shard's batches and writes it through the store, atomically and durably."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
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


@dataclass
class _ShardRows:
    """What one shard has collected so far."""

    embeddings: list[torch.Tensor] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    digests: list[str | None] = field(default_factory=list)
    facts: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class ShardWriter:
    """Collects each shard's batches and writes the shard when the runner says it is complete.

    `stat_of` gives each image's (size, mtime_ns[, digest of its table fields]) as the plan saw it:
    stored per row, it is what the next incremental update compares against. Each row's fields are
    its file's size and time, what decoding learnt (the batch's `facts`), and its table fields
    (`fields_of`), which win where names meet. Shards of tars fill side by side (one per loader
    worker), so each collects apart; `tar_of_step` names the tar (and its version) each such shard holds.
    """

    def __init__(self, emb_path: str | os.PathLike, rank: int, batch_size: int, embed_dim: int, stat_of: dict,
                 fields_of: dict[str, dict] | None = None, file_facts: bool = True,
                 tar_of_step: dict[int, tuple[str, tuple]] | None = None):
        self.emb_path = Path(emb_path)
        self.embed_dim = embed_dim
        self.rank = rank
        self.batch_size = batch_size
        self.stat_of = stat_of
        self.fields_of = fields_of or {}
        self.file_facts = file_facts  # rows that are files (not captions, not tar members) get their size and time
        self.tar_of_step = tar_of_step or {}
        self.collecting: dict[int, _ShardRows] = {}
        self.written: list[Path] = []

    def path_of(self, step: int) -> Path:
        return self.emb_path / shard_name(self.rank, step, self.batch_size)

    def is_done(self, step: int) -> bool:
        return self.path_of(step).is_file()

    def add(self, step: int, embeddings: torch.Tensor | None, batch) -> None:
        rows = self.collecting.setdefault(step, _ShardRows())
        if len(batch.image_paths):
            rows.embeddings.append(embeddings)
            rows.image_paths.extend(batch.image_paths)
            rows.digests.extend(batch.digests)
            rows.facts.extend(batch.facts or [{}] * len(batch.image_paths))
        rows.skipped.extend(batch.skipped)

    def discard(self, step: int) -> int:
        """Drop what a shard collected (its tar could not be read to its end), which stays to do; returns its row count."""
        rows = self.collecting.pop(step, None)
        return len(rows.image_paths) if rows else 0

    def finish(self, step: int) -> Path:
        """Write shard `step` with what it collected (an empty shard records a tar whose samples were all bad)."""
        rows = self.collecting.pop(step, _ShardRows())
        embeddings = torch.cat(rows.embeddings) if rows.embeddings else torch.empty(0, self.embed_dim)
        stats = [self.stat_of.get(path) for path in rows.image_paths]
        fields = [
            {**(stat_fields(stat) if self.file_facts else {}), **(facts or {}), **self.fields_of.get(path, {})}
            for path, stat, facts in zip(rows.image_paths, stats, rows.facts)
        ]
        path = write_shard(self.path_of(step), rows.image_paths, embeddings, rows.skipped, stats, rows.digests,
                           fields, tar=self.tar_of_step.get(step))
        self.written.append(path)
        return path
