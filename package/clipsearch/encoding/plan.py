"""What one encoding run does to a folder: the update that encodes new and changed images and drops what is gone."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from clipsearch.encoding.reader import partition
from clipsearch.store import Catalog, file_stat, parse_shard_name, read_catalog, read_updates, shard_name


@dataclass(frozen=True)
class Layout:
    """Settings that fix shard names and contents: ranks resuming an update must share them."""

    world_size: int
    batch_size: int
    shard_size: int


@dataclass
class Update:
    number: int
    record: dict  # what update-<number>.json holds
    to_encode: list[str]
    stat_of: dict[str, tuple[int, int] | None]
    layout: Layout

    def rank_paths(self, rank: int) -> list[str]:
        return partition(self.to_encode, rank, self.layout.world_size)

    def rank_shards(self, rank: int) -> list[tuple[int, int, int]]:
        """(step, start, length) of each of this rank's shards within its paths."""
        count, size = len(self.rank_paths(rank)), self.layout.shard_size
        first = self.record["first_step"]
        return [(first + number, start, min(size, count - start)) for number, start in enumerate(range(0, count, size))]


def plan_against(catalog: Catalog, number: int, first_step: int, stat_of: dict, layout: Layout) -> Update:
    """Encode what the catalog lacks or holds with another size or mtime; drop what is gone or changed.

    Size and mtime (in ns) are the change test, as rclip and make use: reading every file's bytes
    on each update would cost as much I/O as decoding them. Skipped images are retried each update.
    """
    to_encode = [
        path
        for path, stat in stat_of.items()
        if stat is None or path not in catalog.rows or catalog.stat_of(path) != stat
    ]
    encoding = set(to_encode)
    removed = sorted(path for path in (*catalog.rows, *catalog.skipped) if path not in stat_of or path in encoding)
    shard_names = []
    for rank in range(layout.world_size):
        shard_count = math.ceil(len(partition(to_encode, rank, layout.world_size)) / layout.shard_size)
        shard_names += [shard_name(rank, first_step + step, layout.batch_size) for step in range(shard_count)]
    plan = json.dumps(
        [number, first_step, vars(layout), [[path, stat_of[path]] for path in to_encode], removed],
        ensure_ascii=True,
    )
    record = {
        "update": number,
        "plan": hashlib.sha256(plan.encode("utf-8", errors="surrogateescape")).hexdigest()[:16],
        **vars(layout),
        "first_step": first_step,
        "images": len(to_encode),
        "shards": shard_names,
        "removed": removed,
    }
    return Update(number, record, to_encode, {path: stat_of[path] for path in to_encode}, layout)


def _next_first_step(updates: list[dict]) -> int:
    steps = [parse_shard_name(name)[1] for update in updates for name in update["shards"]]
    return max([*(step + 1 for step in steps), *(update["first_step"] for update in updates)], default=0)


def plan_update(emb_path: str | os.PathLike, image_paths: list[str], layout: Layout, overwrite: bool) -> Update:
    """The update this run works on: the folder's latest one if it planned exactly this (a resume),
    else a new one against everything before.

    Every rank computes the same plan from the same files, so ranks agree without talking; a rank
    that starts after another wrote the new record finds it as the latest and joins it.
    """
    stat_of = {path: file_stat(path) for path in image_paths}
    if overwrite:
        return plan_against(Catalog(), 0, 0, stat_of, layout)
    emb_path = Path(emb_path)
    updates = read_updates(emb_path)
    if not updates:
        return plan_against(Catalog(), 0, 0, stat_of, layout)
    latest = updates[-1]
    before = read_catalog(emb_path, upto=latest["update"])
    again = plan_against(before, latest["update"], latest["first_step"], stat_of, layout)
    if again.record["plan"] == latest["plan"]:
        return again
    before.add_update(emb_path, latest)
    return plan_against(before, latest["update"] + 1, _next_first_step(updates), stat_of, layout)
