"""What one encoding run does to a folder: the update that encodes new and changed images and drops what is gone."""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.encoding.reader import partition
from clipsearch.store import (
    Catalog,
    file_digest,
    file_stat,
    parse_shard_name,
    read_catalog,
    read_updates,
    shard_name,
)

# Files hashed at once by --recheck_content: hashlib releases the GIL, so reads overlap. 7000 Flickr8k
# JPEGs (81 MB) evicted from the page cache hash in 0.97 s with 8 threads against 1.30 s with one
# (0.61 against 0.51 s when cached, on 2 busy cores).
HASH_THREADS = 8


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
    tars: bool = False  # each entry of `to_encode` is a webdataset tar, encoded whole into a shard of its own

    @property
    def entries_per_shard(self) -> int:
        return 1 if self.tars else self.layout.shard_size

    def rank_paths(self, rank: int) -> list[str]:
        return partition(self.to_encode, rank, self.layout.world_size)

    def rank_shards(self, rank: int) -> list[tuple[int, int, int]]:
        """(step, start, length) of each of this rank's shards within its paths (or tars)."""
        count, size = len(self.rank_paths(rank)), self.entries_per_shard
        first = self.record["first_step"]
        return [(first + number, start, min(size, count - start)) for number, start in enumerate(range(0, count, size))]


def _digest_or_none(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:  # gone or unreadable since it was listed: encoding it reports why
        return None


@dataclass
class ContentRecheck:
    """Finds files rewritten under the same size and mtime (a copy that keeps mtime, `touch -r`).

    Opt-in (`--recheck_content`): it reads the bytes of every file whose stat looks unchanged.
    Digests are kept for the run, so the plans compared on a resume hash each file once.
    """

    digests: dict[str, str | None] = field(default_factory=dict)

    def changed(self, catalog: Catalog, same_stat: list[str]) -> list[str]:
        """Of `same_stat` (rows whose size and mtime match), those whose bytes differ from the stored digest.

        A row stored without a digest cannot be checked, so it counts as changed: encoding it again
        stores one, and the next recheck can tell.
        """
        to_hash = [path for path in same_stat if path not in self.digests and catalog.digest_of(path) is not None]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            self.digests.update(zip(to_hash, pool.map(_digest_or_none, to_hash)))
        return [
            path
            for path in same_stat
            if catalog.digest_of(path) is None or self.digests[path] != catalog.digest_of(path)
        ]


def same_version(stored: tuple | None, stat: tuple) -> bool:
    """Whether a stored row is the file as it is now: same size and mtime, and, where both record one, the
    same digest of its table fields. Rows stored before fields were (two numbers) keep their place."""
    if stored is None:
        return False
    return tuple(stored) == tuple(stat) or (len(stored) == 2 and tuple(stored) == tuple(stat[:2]))


def plan_against(
    catalog: Catalog,
    number: int,
    first_step: int,
    stat_of: dict,
    layout: Layout,
    recheck: ContentRecheck | None = None,
    tars: bool = False,
) -> Update:
    """Encode what the catalog lacks or holds with another size or mtime; drop what is gone or changed.

    Size and mtime (in ns) are the change test, as rclip and make use: reading every file's bytes
    on each update would cost as much I/O as decoding them. `recheck` adds the bytes of files whose
    stat matches (the record then counts them). Skipped images are retried each update.

    With `tars`, the entries are webdataset tars and their versions (`tars.tar_version`): a new or
    changed tar is encoded whole, a tar left out of the listing is removed with its rows, and a tar
    that cannot be reached now (version None) keeps the rows it has, so a storage outage never
    empties a collection.
    """
    if tars:
        known, stored_stat = catalog.tars, catalog.tar_version
        stat_of = {tar: stored_stat(tar) if stat is None and tar in known else stat for tar, stat in stat_of.items()}
    else:
        known, stored_stat = catalog.rows, catalog.stat_of
    same_stat = [
        path
        for path, stat in stat_of.items()
        if stat is not None and path in known and same_version(stored_stat(path), stat)
    ]
    changed_content = recheck.changed(catalog, same_stat) if recheck is not None else []
    unchanged = set(same_stat).difference(changed_content)
    to_encode = [path for path in stat_of if path not in unchanged]
    encoding = set(to_encode)
    # A tar's skipped samples go with its rows; an image folder's skipped files are entries of their own.
    removed = sorted(path for path in (*known, *(() if tars else catalog.skipped))
                     if path not in stat_of or path in encoding)
    per_shard = 1 if tars else layout.shard_size
    shard_names = []
    for rank in range(layout.world_size):
        shard_count = math.ceil(len(partition(to_encode, rank, layout.world_size)) / per_shard)
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
        **({"source": "tars", "tars": len(to_encode)} if tars else {"images": len(to_encode)}),
        "shards": shard_names,
        "removed": removed,
    }
    if recheck is not None:  # reported, not planned: the plan is the same whoever found the change
        record["content_recheck"] = {"rechecked": len(same_stat), "changed": len(changed_content)}
    return Update(number, record, to_encode, {path: stat_of[path] for path in to_encode}, layout, tars)


def _next_first_step(updates: list[dict]) -> int:
    steps = [parse_shard_name(name)[1] for update in updates for name in update["shards"]]
    return max([*(step + 1 for step in steps), *(update["first_step"] for update in updates)], default=0)


def plan_update(
    emb_path: str | os.PathLike, image_paths: list[str], layout: Layout, overwrite: bool, recheck_content: bool = False,
    stat_of: dict[str, tuple | None] | None = None, tars: bool = False,
) -> Update:
    """The update this run works on: the folder's latest one if it planned exactly this (a resume),
    else a new one against everything before.

    Every rank computes the same plan from the same files, so ranks agree without talking; a rank
    that starts after another wrote the new record finds it as the latest and joins it. `stat_of`
    gives each row's change test when it is not its file's (size, mtime_ns) (table fields, captions). With
    `recheck_content` every rank hashes the files itself (ranks on one machine mostly read them
    from the page cache the first rank filled). With `tars`, `image_paths` are tars and `stat_of`
    their versions (see `plan_against`).
    """
    if stat_of is None:
        stat_of = {path: file_stat(path) for path in image_paths}
    emb_path = Path(emb_path)
    updates = [] if overwrite else read_updates(emb_path)
    if not updates:  # everything is encoded: there are no stored digests to recheck against
        return plan_against(Catalog(), 0, 0, stat_of, layout, tars=tars)
    recheck = ContentRecheck() if recheck_content else None
    latest = updates[-1]
    before = read_catalog(emb_path, upto=latest["update"])
    again = plan_against(before, latest["update"], latest["first_step"], stat_of, layout, recheck, tars)
    resumable = again.record["plan"] == latest["plan"]
    if resumable and recheck is None:
        return again
    before.add_update(emb_path, latest)
    fresh = plan_against(before, latest["update"] + 1, _next_first_step(updates), stat_of, layout, recheck, tars)
    if not resumable:
        return fresh
    # Stats are part of a plan, contents are not: a file rewritten under its stat after the latest
    # update encoded it leaves that update's plan as it was, and resuming it would keep the stale row.
    found = fresh.record["content_recheck"]
    if found["changed"]:
        return fresh
    again.record["content_recheck"] = found  # what this run found against the rows the folder holds now
    return again
