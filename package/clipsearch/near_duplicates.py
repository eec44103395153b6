"""Near-duplicate images: every pair of rows above a cosine threshold, found exactly or through a faiss index's range search, joined into groups."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipsearch.errors import UserError

# Up to this many rows every pair is scored (one matrix product per block, N^2/2 dot products: 50k x 512
# takes about a minute on 2 cores); above it, a faiss index's range search proposes the pairs.
EXACT_MAX_ROWS = 50_000
QUERY_BLOCK = 2048
COLUMN_BLOCK = 16_384
# An index's quantised codes (SQ8, PQ) misjudge a cosine by up to a few hundredths: range search asks
# for pairs this much below the threshold, and every pair it proposes is then scored exactly.
RANGE_MARGIN = 0.05
# Lists an IVF index probes per row at least: near-duplicates lie far closer than search's neighbours,
# so few lists find them (benchmarks/bench_duplicates.py measures the pairs missed against exact).
DUPLICATE_NPROBE = 4
REPORT_FORMAT = 1


class DuplicatesError(UserError, ValueError):
    """A threshold outside (0, 1], or a report that belongs to other rows."""


@dataclass
class DuplicateGroup:
    rows: list[int]  # the first is the copy to keep: most pixels, then the largest file
    min_cosine: float  # the weakest of the pairs that joined it (one pair's copies may be less alike)
    max_cosine: float


@dataclass
class DuplicateReport:
    threshold: float
    method: str
    rows: int  # rows compared
    pairs: int
    groups: list[DuplicateGroup] = field(default_factory=list)
    seconds: float = 0.0


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and 0 < threshold <= 1):
        raise DuplicatesError(f"the threshold is a cosine in (0, 1], got {threshold!r}")
    return float(threshold)


def exact_pairs(embeddings: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows i, rows j, cosines) of every pair i < j of unit rows [n, d] whose cosine is at least `threshold`.

    Blocks of rows against the rows after them, so memory stays at QUERY_BLOCK x COLUMN_BLOCK scores.
    """
    count = embeddings.shape[0]
    found_i, found_j, found_s = [], [], []
    for start in range(0, count, QUERY_BLOCK):
        block = embeddings[start : start + QUERY_BLOCK].float()
        for column in range(start, count, COLUMN_BLOCK):
            scores = block @ embeddings[column : column + COLUMN_BLOCK].float().T
            i, j = torch.nonzero(scores >= threshold, as_tuple=True)
            rows_i, rows_j = i + start, j + column
            keep = rows_j > rows_i
            found_i.append(rows_i[keep])
            found_j.append(rows_j[keep])
            found_s.append(scores[i[keep], j[keep]])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return (torch.cat(found_i).numpy(), torch.cat(found_j).numpy(), torch.cat(found_s).numpy())


def index_pairs(index, embeddings: torch.Tensor, threshold: float, nprobe: int = DUPLICATE_NPROBE,
                progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`exact_pairs` through an index (index.FaissIndex over the same rows): each row's range search
    proposes pairs above threshold - RANGE_MARGIN, which are scored exactly from `embeddings`.

    A pair is found from either of its rows, so one missed probe rarely loses it.
    """
    exact_codes = index.kind in ("flat", "ivf", "hnsw")
    radius = threshold - (0.0 if exact_codes else RANGE_MARGIN)
    # The pairs lie far closer than a query's neighbours, so the index's own nprobe (tuned for text queries)
    # would scan many more lists than they need.
    probes = nprobe
    count = embeddings.shape[0]
    found_i, found_j = [], []
    for start in range(0, count, QUERY_BLOCK):
        queries = embeddings[start : start + QUERY_BLOCK].float().numpy()
        lims, _, rows = index.range_search(queries, radius, probes)
        own = np.repeat(np.arange(start, start + len(queries)), np.diff(lims).astype(np.int64))
        keep = rows != own
        found_i.append(np.minimum(own[keep], rows[keep]))
        found_j.append(np.maximum(own[keep], rows[keep]))
        if progress is not None:
            progress(min(count, start + QUERY_BLOCK))
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    pairs = np.unique(np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1), axis=0)
    scores = pair_cosines(embeddings, pairs[:, 0], pairs[:, 1])
    keep = scores >= threshold
    return pairs[keep, 0], pairs[keep, 1], scores[keep]


def pair_cosines(embeddings: torch.Tensor, rows_i: np.ndarray, rows_j: np.ndarray, block: int = 65_536) -> np.ndarray:
    """The exact cosine of each pair (rows_i[k], rows_j[k]) of unit rows."""
    scores = np.empty(len(rows_i), dtype=np.float32)
    for start in range(0, len(rows_i), block):
        left = embeddings[torch.from_numpy(rows_i[start : start + block])].float()
        right = embeddings[torch.from_numpy(rows_j[start : start + block])].float()
        scores[start : start + block] = (left * right).sum(dim=1).numpy()
    return scores


def connected_groups(count: int, rows_i: np.ndarray, rows_j: np.ndarray) -> list[list[int]]:
    """The connected components of the pairs' graph with two or more rows, each sorted (union-find)."""
    parent = np.arange(count)

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    for i, j in zip(rows_i.tolist(), rows_j.tolist()):
        first, second = root(i), root(j)
        if first != second:
            parent[max(first, second)] = min(first, second)
    members: dict[int, list[int]] = {}
    for row in sorted(set(rows_i.tolist()) | set(rows_j.tolist())):
        members.setdefault(root(row), []).append(row)
    return list(members.values())


def find_duplicates(embeddings: torch.Tensor, threshold: float, rows: np.ndarray | None = None, index=None,
                    exact: bool | None = None, nprobe: int = DUPLICATE_NPROBE, keep_order=None,
                    progress=None) -> DuplicateReport:
    """Groups of rows (of `rows`, else all) whose embeddings are at least `threshold` alike, directly or
    through a chain of such pairs.

    Exact (every pair scored) up to EXACT_MAX_ROWS rows or with `exact`; else through `index` (its range
    search over all rows, pairs outside `rows` dropped), which must be given. `keep_order(rows)` sorts a
    group with the copy to keep first (default: by row).
    """
    threshold = check_threshold(threshold)
    started = time.perf_counter()
    count = embeddings.shape[0] if rows is None else len(rows)
    use_exact = count <= EXACT_MAX_ROWS if exact is None else exact
    if use_exact:
        subset = embeddings if rows is None else embeddings[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
        rows_i, rows_j, scores = exact_pairs(subset, threshold)
        if rows is not None:
            rows_i, rows_j = np.asarray(rows)[rows_i], np.asarray(rows)[rows_j]
        method = "exact"
    else:
        if index is None:
            raise DuplicatesError(f"{count:,} rows are too many to compare every pair; give an index (--index_path)")
        rows_i, rows_j, scores = index_pairs(index, embeddings, threshold, nprobe, progress)
        if rows is not None:
            kept = np.zeros(embeddings.shape[0], dtype=bool)
            kept[np.asarray(rows, dtype=np.int64)] = True
            inside = kept[rows_i] & kept[rows_j]
            rows_i, rows_j, scores = rows_i[inside], rows_j[inside], scores[inside]
        method = f"index ({index.info.get('factory', index.kind)}, range search, nprobe {nprobe})"
    groups = []
    by_root: dict[int, list[float]] = {}
    components = connected_groups(embeddings.shape[0], rows_i, rows_j)
    group_of = {row: number for number, members in enumerate(components) for row in members}
    for i, score in zip(rows_i.tolist(), scores.tolist()):
        by_root.setdefault(group_of[i], []).append(score)
    for number, members in enumerate(components):
        ordered = keep_order(members) if keep_order is not None else members
        cosines = by_root[number]
        groups.append(DuplicateGroup(list(ordered), round(min(cosines), 6), round(max(cosines), 6)))
    groups.sort(key=lambda group: (-len(group.rows), min(group.rows)))
    return DuplicateReport(threshold, method, count, len(rows_i), groups, round(time.perf_counter() - started, 3))


def report_json(report: DuplicateReport, paths: Sequence[str], order_fingerprint: str, extra: dict | None = None,
                sheets: dict[int, str] | None = None) -> dict:
    """The report as JSON: groups with ids and paths, the rows' identity (for folding them in search) and what made it."""
    from clipsearch.images import display_path

    groups = []
    for number, group in enumerate(report.groups, start=1):
        entry = {"group": number, "size": len(group.rows), "min_cosine": group.min_cosine,
                 "max_cosine": group.max_cosine, "ids": group.rows,
                 "paths": [display_path(paths[row]) for row in group.rows]}
        if sheets is not None:
            entry["sheet"] = sheets.get(number)
        groups.append(entry)
    summary = {key: value for key, value in asdict(report).items() if key != "groups"}
    return {"format": REPORT_FORMAT, **(extra or {}), **summary, "order_fingerprint": order_fingerprint,
            "group_count": len(groups), "images_in_groups": sum(group["size"] for group in groups), "groups": groups}


def groups_from_report(report_path: str | os.PathLike, order_fingerprint: str) -> list[list[int]]:
    """The groups a saved report (duplicates --json's file) lists, refused when it was made for other rows."""
    try:
        report = json.loads(Path(report_path).read_text())
        groups = [list(map(int, group["ids"])) for group in report["groups"]]
        made_for = report["order_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DuplicatesError(f"{report_path} is not a duplicates report ({type(error).__name__}); make one with "
                              "./clipsearch duplicates --emb_path <folder>") from None
    if made_for != order_fingerprint:
        raise DuplicatesError(f"{report_path} was made for other rows than the folder holds now; run "
                              "./clipsearch duplicates again")
    return groups


def merge_groups(count: int, *group_lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """Groups that share a row joined into one (exact-bytes groups and near-duplicate groups together)."""
    rows_i, rows_j = [], []
    for groups in group_lists:
        for group in groups:
            rows_i += [group[0]] * (len(group) - 1)
            rows_j += list(group[1:])
    return connected_groups(count, np.asarray(rows_i, dtype=np.int64), np.asarray(rows_j, dtype=np.int64))
