"""Top-k search over a collection's embeddings: exact by default, through an index object when one is given."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipsearch.errors import UserError
from clipsearch.fields import Condition
from clipsearch.metadata import MetadataTable, PathColumn, RowSet, empty_table
from clipsearch.query_terms import EMBEDDING, IMAGE, ROW, TEXT, Term, TermError
from clipsearch.score_kernels import NativeScorer, panel_rows, panel_scores, to_panels
from clipsearch.store import (
    MODEL_FILE,
    ROWS_CAPTIONS,
    ROWS_IMAGES,
    caption_row_image,
    describe_model,
    file_versions,
    folder_inputs,
    load_collection,
    model_source,
    normalise_rows,
    order_fingerprint,
    read_json,
    rows_kind,
    served_update,
    update_in_progress,
)

logger = logging.getLogger(__name__)

# Scores are made and reduced one block of rows at a time: a block's [rows, queries] scores (16 MB)
# stay in the CPU's last-level cache while the top-k reads them, and no query batch ever allocates
# (and page-faults in) a score matrix over the whole collection. Holding 64 queries' scores over
# 1M rows at once took 256 MB, whose first touch, and a top-k over it by torch's threads while
# numpy's BLAS threads still spun from the product, cost 0.3 s of a 0.88 s search (issue 32).
DEFAULT_MAX_SCORE_BYTES = 16 * 2**20
# Rows of a block that compete as one group in its top-k: the best k groups by their largest
# score hold the block's best k rows, so only k groups' rows are read again (see _block_candidates).
TOP_K_GROUP = 16
# Once each query holds k scores, a block's groups whose maxima beat its k-th are its candidates
# while no query has more than this many times k of them (else the block's best k groups are ranked).
BEATING_GROUPS_FACTOR = 4
# Consecutive rows whose maxima the native kernels return with several queries' scores (see
# score_blocks): the block top-k then reads the scores of k groups only, never the whole block.
# Larger groups mean fewer to partition and more rows to read again: at 64, 1M rows x 64 queries
# partition 1,024 groups a 64k-row block and gather 640 rows a query.
KERNEL_GROUP_ROWS = 64
# Rows of an fp16 collection widened to fp32 at a time for several queries: 8 MB at 512-d.
UPCAST_SLAB_ROWS = 4096
# Without the native kernels, one fp16 query is scored by torch's fp16 matrix-vector product, whose
# scores are rounded to fp16; this many times top_k candidates (plus a few) are then scored again in fp32.
FP16_CANDIDATE_FACTOR = 2
FP16_EXTRA_CANDIDATES = 16
# With per-row biases (querybank) an index's ranking is not the biased one, so it is asked for
# max(BIAS_CANDIDATE_FACTOR * top_k, BIAS_MIN_CANDIDATES) candidates, which the biases re-rank. On
# Flickr8k dev the biases spread over 0.2 of a cosine (std 0.03); the biased top-1, 5, 10 and 25 of
# every caption lay inside that many plain-cosine candidates, but 2.5% of top-1s lay outside 4.
BIAS_CANDIDATE_FACTOR = 8
BIAS_MIN_CANDIDATES = 64
# A filter that keeps at most SUBSET_MIN_ROWS rows is answered by gathering them and scoring them
# alone: exact, and cheaper than any scan. Without an index, so is one that keeps at most
# SUBSET_FRACTION of the collection: gathering a row costs more than reading it in a scan, but far
# fewer rows are read (benchmarks/bench_filters.py). Through an index, larger filters go to faiss,
# which skips the other rows for less than that.
SUBSET_FRACTION = 0.02
SUBSET_MIN_ROWS = 4096

__all__ = ["CollectionSource", "EmbeddingMismatchError", "Hit", "SearchEngine", "Searcher", "normalise_rows",
           "order_fingerprint"]


class EmbeddingMismatchError(UserError, ValueError):
    """Embeddings and query model (or index) do not belong together."""


@dataclass(frozen=True)
class Hit:
    id: int  # row in the collection (stable for a loaded collection)
    path: str
    score: float
    duplicates: tuple[str, ...] = ()  # other paths with the same bytes, when duplicates are folded
    fields: dict = field(default_factory=dict, compare=False)  # the row's caption, url, file facts... (engine results)


class Searcher:
    """Pure search: unit-length embeddings in, ranked hits out. Scores are cosine similarities.

    The collection is scored a block of rows at a time, each block reduced to its best rows while
    it is in cache, by one library per layout so that two thread pools never take turns:

    - fp32 collections are stored in panels of 16 rows, element by element ([ceil(count / 16),
      dim, 16], `score_kernels.to_panels`), and scored by the native kernels of `score_kernels`:
      one query reads the panels at the speed of a plain read, and several are multiplied with the
      rows where they lie, with no packing, at the rate of a square fp32 product (OpenBLAS's
      product with 64 queries, which packs every block first, ran 1.3 times as long). The block is
      written query-major (a transposed view). Where the kernels cannot run, torch's batched product;
    - fp16 collections stay row-major (a memory-mapped store is searched in place) and are scored
      by the native kernels of `score_kernels` (F16C widening fused with the multiply-adds: one
      query at the speed of a plain read of the half-size matrix, several at the rate of a square
      fp32 product). Where those cannot run, torch: one query by ATen's fp16 matrix-vector product
      (scores rounded to fp16, so its candidates are rescored), several by widening slabs of rows
      to fp32 for MKL's matrix product (CPU BLAS has no fast fp16 kernel).

    With several queries the native kernels also return each group of rows' maxima, so the block
    top-k reads only the best groups' scores. It runs in numpy on one thread (`_RunningTopK`).
    """

    def __init__(
        self,
        paths: Sequence[str],
        embeddings: torch.Tensor,
        index=None,
        *,
        assume_normalised: bool = False,
        max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
        duplicates: list[list[int]] | None = None,
        order: str | None = None,
    ):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be a [count, dim] matrix, got shape {tuple(embeddings.shape)}")
        if len(paths) != embeddings.shape[0]:
            raise ValueError(f"{len(paths)} paths but {embeddings.shape[0]} embeddings")
        # A store's memory-mapped paths are kept as they are: a list of them would be 1.64 GB at 20M rows.
        self.paths = paths if isinstance(paths, PathColumn) else list(paths)
        if not (assume_normalised and embeddings.device.type == "cpu"):
            embeddings = normalise_rows(embeddings.cpu())
        self.count = embeddings.shape[0]
        self.panelled = embeddings.dtype == torch.float32
        # `storage` is fp32 panels [ceil(count / 16), dim, 16], or fp16 rows [count, dim]; contiguous.
        self.storage = to_panels(embeddings) if self.panelled else embeddings.contiguous()
        self.max_score_bytes = int(max_score_bytes)
        self.index = index
        if index is not None:
            self._check_index(index, order)
        # Folding: every row of a duplicate group answers as the group's first row, once.
        self.group_members = {rows[0]: list(rows) for rows in duplicates or []}
        self.group_of = {row: rows[0] for rows in duplicates or [] for row in rows}

    def _check_index(self, index, order: str | None) -> None:
        """Refuse an index of other rows; `order`, when the caller has it (a store records it), is
        the rows' order_fingerprint, which spares hashing every path again."""
        if index.count != len(self):
            raise EmbeddingMismatchError(
                f"the index holds {index.count} vectors but the collection has {len(self)}; rebuild it with "
                "./clipsearch index --emb_path <folder>"
            )
        expected = order or order_fingerprint(self.paths, self.dim)
        if getattr(index, "order_fingerprint", expected) != expected:
            raise EmbeddingMismatchError(
                "the index was built on other embeddings (or another row order) than these shards; rebuild it "
                "with ./clipsearch index --emb_path <folder>"
            )

    def __len__(self) -> int:
        return self.count

    @property
    def dim(self) -> int:
        return int(self.storage.shape[1])

    @property
    def embeddings(self) -> torch.Tensor:
        """The collection as rows [count, dim]: the storage itself for fp16, a copy of fp32's panels
        (`vectors` gathers a few rows)."""
        if not self.panelled:
            return self.storage
        return self.storage.transpose(1, 2).reshape(-1, self.dim)[: self.count]

    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (ids) of the collection, [len(rows), dim], in the storage's dtype."""
        return panel_rows(self.storage, rows) if self.panelled else self.storage.index_select(0, rows)

    def scores(self, queries: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Inner products [q, end - start] of unit-length `queries` with rows start..end, in fp32."""
        end = len(self) if end is None else end
        out = torch.empty(queries.shape[0], end - start)
        for first, block, _ in self.score_blocks(queries, start, end):
            out[:, first - start : first - start + block.shape[0]] = torch.from_numpy(block).T
        return out

    def score_blocks(self, queries: torch.Tensor, start: int = 0, end: int | None = None,
                     bias: torch.Tensor | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """The scores of unit-length `queries` [q, d] against rows start..end, one block of rows at a
        time: (first row, fp32 array [rows, q], plus `bias` [count] of those rows when given, and
        the block's group maxima or None). The block may be a transposed view. The native kernels
        give the maxima of several unbiased queries as they score: [ceil(rows / KERNEL_GROUP_ROWS),
        q], each query's largest score over every KERNEL_GROUP_ROWS consecutive rows of the block.

        The arrays are reused for the next block: read them before asking for the next. One query
        against an fp16 collection gives fp16-rounded scores where the native kernels cannot run
        (see `exact_top_k`).
        """
        end = len(self) if end is None else end
        query_count = queries.shape[0]
        block_rows = max(1, min(self.max_score_bytes // (4 * query_count), end - start))
        if block_rows > KERNEL_GROUP_ROWS:  # whole groups (and panels) a block
            block_rows -= block_rows % KERNEL_GROUP_ROWS
        bias_values = None if bias is None else bias.detach().float().cpu().numpy()
        queries = queries.float().contiguous()
        native = NativeScorer.create(queries, self.storage)
        # Several queries against panels are written query-major (the kernel's vectors run along
        # the rows); the block is a transposed view.
        query_major = self.panelled and query_count > 1
        buffer = np.empty((query_count, block_rows) if query_major else (block_rows, query_count), dtype=np.float32)
        maxima_buffer = None
        if native is not None and query_count > 1 and bias is None:
            maxima_buffer = np.empty((-(-block_rows // KERNEL_GROUP_ROWS), query_count), dtype=np.float32)
        if not self.panelled:
            slab = torch.empty(min(UPCAST_SLAB_ROWS, block_rows), self.dim) if query_count > 1 and native is None else None
            half_query = queries[0].to(self.storage.dtype)
        for first in range(start, end, block_rows):
            last = min(end, first + block_rows)
            block = buffer[:, : last - first].T if query_major else buffer[: last - first]
            scored = block.T if query_major else block  # the orientation the kernel writes
            maxima = None
            if maxima_buffer is not None:
                maxima = maxima_buffer[: -(-(last - first) // KERNEL_GROUP_ROWS)]
                native(first, last, scored, maxima, KERNEL_GROUP_ROWS)
            elif native is not None:
                native(first, last, scored)
            elif self.panelled:
                torch.from_numpy(block.T).copy_(panel_scores(self.storage, queries, first, last))
            elif query_count == 1:
                torch.from_numpy(block).view(-1).copy_(torch.mv(self.storage[first:last], half_query))
            else:
                # ATen's fp16 matrix product is slow on CPUs: widen a slab, multiply in fp32 (MKL).
                scores = torch.from_numpy(block)
                for slab_first in range(first, last, slab.shape[0]):
                    rows = self.storage[slab_first : min(last, slab_first + slab.shape[0])]
                    wide = slab[: rows.shape[0]]
                    wide.copy_(rows)
                    torch.mm(wide, queries.T, out=scores[slab_first - first : slab_first - first + rows.shape[0]])
            if bias_values is not None:
                block += bias_values[first:last, None]
            yield first, block, maxima

    @classmethod
    def from_collection(cls, collection, index=None, *, fold_duplicates: bool = False, **searcher_options) -> Searcher:
        """A searcher over a loaded `store.Collection` (its rows are unit length already)."""
        duplicates = collection.duplicate_groups() if fold_duplicates else None
        return cls(collection.paths, collection.embeddings, index, assume_normalised=True, duplicates=duplicates,
                    order=collection.order_fingerprint if index is not None else None, **searcher_options)

    def search(self, queries: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
               allowed: RowSet | None = None) -> list[list[Hit]]:
        """The `top_k` best rows for each query of `queries` [q, d] (or one query [d]), best first.

        `bias` [count], when given, is added to every query's cosine with each row (querybank
        normalisation): hits are ranked and scored by cosine plus bias. `allowed` (a filter's rows,
        metadata.RowSet) limits the answer to those rows: exactly the best of them, without an
        index; through one, the best the index finds among them, filled to `top_k` whenever that
        many pass.
        """
        if queries.ndim == 1:
            queries = queries.unsqueeze(0)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise EmbeddingMismatchError(
                f"queries of shape {tuple(queries.shape)} do not match {self.dim}-d collection embeddings"
            )
        if allowed is not None and allowed.total != len(self):
            raise ValueError(f"a filter over {allowed.total} rows cannot apply to a collection of {len(self)}")
        limit = len(self) if allowed is None else allowed.count
        top_k = min(int(top_k), limit)
        if top_k <= 0 or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
        queries = F.normalize(queries.detach().float().cpu(), dim=-1)
        candidates = top_k
        while True:
            scores, ids = self.top_k_rows(queries, candidates, bias, allowed)
            hits = [
                self._fold(query_scores, query_ids, top_k) for query_scores, query_ids in zip(scores.tolist(), ids.tolist())
            ]
            # Folded duplicates take candidates' places: ask for more until every query has top_k.
            if not self.group_of or candidates >= limit or all(len(found) >= top_k for found in hits):
                return hits
            candidates = min(limit, 2 * candidates)

    def top_k_rows(self, queries: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
                   allowed: RowSet | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and rows of unit-length `queries`, from the index when there is one, else exact;
        places that no row filled are -1."""
        if allowed is not None:
            return self.filtered_top_k(queries, top_k, bias, allowed)
        if self.index is None:
            return self.exact_top_k(queries, top_k, bias)
        candidates = top_k if bias is None else min(len(self), max(BIAS_CANDIDATE_FACTOR * top_k, BIAS_MIN_CANDIDATES))
        found = self.index.search(queries.numpy(), candidates)
        return _with_bias(*(torch.as_tensor(part) for part in found), bias, top_k)

    def filtered_top_k(self, queries: torch.Tensor, top_k: int, bias: torch.Tensor | None,
                       allowed: RowSet) -> tuple[torch.Tensor, torch.Tensor]:
        """The best `top_k` of the rows `allowed` passes.

        A small share of the collection is gathered and scored alone. Otherwise exact search adds
        -inf to the scores of the other rows, and an index skips them as it scans (faiss's ID
        selector, with its probes widened by the share kept); a query the index leaves short of
        `top_k` rows, when that many pass, is answered exactly.
        """
        gather_up_to = SUBSET_MIN_ROWS if self.index is not None else max(SUBSET_MIN_ROWS, SUBSET_FRACTION * len(self))
        if allowed.count <= gather_up_to:
            return self.subset_top_k(queries, top_k, allowed.rows, bias)
        if self.index is None:
            return _without_excluded(*self.exact_top_k(queries, top_k, allowed.bias if bias is None else bias + allowed.bias))
        candidates = top_k if bias is None else min(allowed.count, max(BIAS_CANDIDATE_FACTOR * top_k, BIAS_MIN_CANDIDATES))
        found = self.index.search_among(queries.numpy(), candidates, allowed.bitmap, allowed.fraction)
        scores, ids = _with_bias(*(torch.as_tensor(part) for part in found), bias, top_k)
        short = ((ids >= 0).sum(dim=1) < min(top_k, allowed.count)).nonzero().flatten()
        if len(short):
            masked = allowed.bias if bias is None else bias + allowed.bias
            exact_scores, exact_ids = _without_excluded(*self.exact_top_k(queries[short], top_k, masked))
            scores, ids = _pad(scores, top_k), _pad(ids, top_k, -1)
            scores[short], ids[short] = exact_scores.to(scores.dtype), exact_ids
        return scores, ids

    def subset_top_k(self, queries: torch.Tensor, top_k: int, rows: torch.Tensor,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact top-k among `rows` (ascending row ids), scored from a gathered copy of just those rows."""
        scores = queries.float() @ self.vectors(rows).float().T
        if bias is not None:
            scores += bias[rows]
        best_scores, best = scores.topk(min(top_k, len(rows)), dim=1)
        return best_scores, rows[best]

    def _fold(self, scores: list[float], rows: list[int], top_k: int) -> list[Hit]:
        hits, seen = [], set()
        for score, row in zip(scores, rows):
            if row < 0:  # an index could not fill this place
                continue
            group = self.group_of.get(row, row)
            if group in seen:
                continue
            seen.add(group)
            others = tuple(self.paths[member] for member in self.group_members.get(group, ()) if member != row)
            hits.append(Hit(int(row), self.paths[int(row)], float(score), others))
            if len(hits) == top_k:
                break
        return hits

    def exact_top_k(self, queries: torch.Tensor, top_k: int,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [q, top_k] and rows of the exact top-k by inner product (plus `bias` [count] when
        given), best first; memory for scores stays under `max_score_bytes`."""
        top_k = min(top_k, len(self))
        if top_k <= 0:
            return torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
        rescore = not self.panelled and queries.shape[0] == 1 and not NativeScorer.serves(self.storage)
        # fp16-rounded scores may swap rows closer than the rounding: take a few more, then rescore them.
        candidates = min(len(self), FP16_CANDIDATE_FACTOR * top_k + FP16_EXTRA_CANDIDATES) if rescore else top_k
        best = _RunningTopK(candidates, queries.shape[0])
        for first, block, maxima in self.score_blocks(queries, bias=bias):
            best.add(block, first, maxima)
        scores, rows = best.result()
        if rescore:
            exact = self.vectors(rows[0]).float() @ queries[0].float()
            if bias is not None:
                exact += bias[rows[0]].float()
            order = exact.topk(top_k).indices
            return exact[order][None], rows[:, order]
        return scores, rows


class _RunningTopK:
    """The best `k` scores of each query, and their rows, from blocks of scores [rows, queries] (numpy).

    One thread does it: between the blocks' matrix products, torch's threads would only wake to
    contend with the scoring threads, or still spin from their own product. Kept per
    query ([queries, k]), so every partition runs along contiguous memory.
    """

    def __init__(self, k: int, query_count: int):
        self.k = k
        self.scores = np.empty((query_count, 0), dtype=np.float32)
        self.rows = np.empty((query_count, 0), dtype=np.int64)

    def add(self, block: np.ndarray, first_row: int, group_maxima: np.ndarray | None = None) -> None:
        # Once a query holds k scores, a row must beat its k-th to enter: after the first blocks,
        # few groups of a block do, and only theirs are read again.
        full = self.scores.shape[1] == self.k
        threshold = self.scores.min(axis=1) if full else None
        scores, rows = _block_candidates(block, self.k, group_maxima, threshold)
        if full:
            # Only the candidates that beat the k-th score enter the merge. Without this the merge
            # partitions whole groups padded with -inf, and numpy's introselect slows several-fold
            # on many equal values (5.8 ms for [64, 1,610]; 0.3 for [64, 640] without them).
            keep, padding = _left_aligned(scores > threshold[:, None])
            scores, rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
            scores[padding] = -np.inf
        if scores.shape[1] == 0:
            return
        scores = np.concatenate([self.scores, scores], axis=1)
        rows = np.concatenate([self.rows, rows + first_row], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(scores, scores.shape[1] - self.k, axis=1)[:, -self.k :]
            scores, rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
        self.scores, self.rows = scores, rows

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and rows [queries, k], best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        scores, rows = np.take_along_axis(self.scores, order, 1), np.take_along_axis(self.rows, order, 1)
        return torch.from_numpy(scores), torch.from_numpy(rows)


def _block_candidates(block: np.ndarray, k: int, group_maxima: np.ndarray | None = None,
                      threshold: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `block` [rows, queries] among which each query's best k lie: scores and block rows, [queries, m].

    The rows form groups, and a query's best k rows lie in its k groups with the largest maxima,
    since a group outside them is beaten k times over. Only those groups' rows are read again.
    Given `group_maxima` (the native kernels' maxima of KERNEL_GROUP_ROWS consecutive rows), the
    groups are those; otherwise groups of TOP_K_GROUP (row j with rows j + g, j + 2g, ...: whole
    slices, so the maxima are one vectorised pass over the block). Given `threshold` [queries]
    (each query's k-th best score so far), only groups whose maximum beats it can matter: where
    no query has more than BEATING_GROUPS_FACTOR x k of those, they are the candidates (padded
    with -inf scores), which spares ranking every group.
    """
    rows, queries = block.shape
    size = TOP_K_GROUP if group_maxima is None else KERNEL_GROUP_ROWS
    groups = rows // size  # whole groups; the rows after them are always candidates
    if groups <= 2 * k:  # a small block: every row is a candidate
        return np.ascontiguousarray(block.T), np.broadcast_to(np.arange(rows), (queries, rows)).copy()
    if group_maxima is not None:
        maxima = np.ascontiguousarray(group_maxima[:groups].T)  # [queries, groups]
    elif block.T.flags.c_contiguous:  # a query-major block: reduce along its rows without copying it
        maxima = block.T[:, : groups * size].reshape(queries, size, groups).max(axis=1)
    else:
        maxima = np.ascontiguousarray(block[: groups * size].reshape(size, groups, queries).max(axis=0).T)
    padded = None
    if threshold is not None:
        beating = maxima > threshold[:, None]
        if np.count_nonzero(beating, axis=1).max() <= BEATING_GROUPS_FACTOR * k:
            best_groups, padded = _left_aligned(beating)
    if padded is None:
        best_groups = np.argpartition(maxima, groups - k, axis=1)[:, -k:]  # [queries, k]
    if group_maxima is None:
        candidate_rows = best_groups[:, :, None] + groups * np.arange(size)
    else:
        candidate_rows = best_groups[:, :, None] * size + np.arange(size)
    candidate_rows = candidate_rows.reshape(queries, -1)
    tail = np.broadcast_to(np.arange(groups * size, rows), (queries, rows - groups * size))
    candidate_rows = np.concatenate([candidate_rows, tail], axis=1)
    scores = block[candidate_rows, np.arange(queries)[:, None]]
    if padded is not None:
        scores[:, : padded.shape[1] * size][np.repeat(padded, size, axis=1)] = -np.inf
    return scores, candidate_rows


def _left_aligned(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The columns of each row's True entries of `mask` [rows, columns], left-aligned in [rows,
    widest] and padded with column 0, and where that padding is (a bool mask of the same shape)."""
    counts = np.count_nonzero(mask, axis=1)
    row_of, column_of = np.divmod(np.flatnonzero(mask), mask.shape[1])  # 2-d nonzero is 10x slower
    widest = int(counts.max()) if len(counts) else 0
    columns = np.zeros((mask.shape[0], widest), dtype=np.int64)
    place = np.arange(len(row_of)) - np.repeat(np.cumsum(counts) - counts, counts)
    columns[row_of, place] = column_of
    return columns, np.arange(widest) >= counts[:, None]


def image_file(path: str, kind: str = ROWS_IMAGES) -> str:
    """The image file a row of `path` shows: the path itself, or for a caption row its image."""
    return caption_row_image(path) if kind == ROWS_CAPTIONS else path


def _with_bias(scores: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None,
               top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An index's candidates re-ranked by score plus `bias`, the best `top_k`; places it could not fill (-1) stay last."""
    if bias is None:
        return scores, ids
    scores = torch.where(ids >= 0, scores.float() + bias[ids.clamp(min=0)], torch.finfo(torch.float32).min)
    scores, order = scores.topk(min(top_k, scores.shape[1]), dim=1)
    return scores, ids.gather(1, order)


def _without_excluded(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Places a filter's -inf filled (fewer rows passed than were asked for) marked -1, as an index marks them."""
    return scores, torch.where(torch.isneginf(scores), -1, ids)


def _pad(values: torch.Tensor, width: int, fill: float = float("-inf")) -> torch.Tensor:
    """`values` [q, n] widened to [q, width] with `fill`, so rows answered exactly fit beside the index's."""
    if values.shape[1] >= width:
        return values.clone()
    padding = torch.full((values.shape[0], width - values.shape[1]), fill, dtype=values.dtype)
    return torch.cat([values, padding], dim=1)


def check_encoded_with(encoded_with_model: dict, load_model: str | os.PathLike, fingerprint: str,
                       emb_path: str | os.PathLike) -> None:
    """Refuse embeddings whose recorded model (model.json) is not the query model."""
    encoded_with = encoded_with_model.get("fingerprint")
    if encoded_with is not None and encoded_with != fingerprint:
        query_model = {**model_source(load_model), "fingerprint": fingerprint}
        raise EmbeddingMismatchError(
            f"{emb_path} was encoded with another model, {describe_model(encoded_with_model)}, than the query "
            f"model, {describe_model(query_model)}; re-encode with the query model, or search with the model "
            "that encoded them."
        )


@dataclass(frozen=True)
class CollectionSource:
    """Where an engine's collection comes from and how it is held, so it can be loaded again after an update."""

    emb_path: str
    index_path: str | None = None
    dtype: torch.dtype = torch.float32
    fold_duplicates: bool | str = False  # True: same bytes; a duplicates report's path: its groups too
    mapped: bool = False
    querybank: bool = False


def source_signature(source: CollectionSource) -> tuple:
    """The versions of every file an engine over `source` reads: shards, records, querybank and index.

    Equal signatures mean the engine would load the same collection again.
    """
    emb_path = Path(source.emb_path)
    extra = [emb_path / "querybank.pt"] if source.querybank else []  # querybank.QUERYBANK_FILE, without its import
    if source.index_path is not None:
        index_path = Path(source.index_path)
        index_file = index_path / "index.faiss" if index_path.is_dir() else index_path  # index.resolve_index_path
        extra += [index_file, index_file.with_suffix(".json")]
    if isinstance(source.fold_duplicates, str):
        extra.append(Path(source.fold_duplicates))
    return tuple(folder_inputs(emb_path)), tuple(file_versions(extra))


class SearchEngine:
    """A model bundle to embed queries, and a Searcher over a collection embedded by the same model.

    With a `querybank` (querybank.py), text queries rank by cosine plus each image's querybank
    bias; image queries keep the plain cosine, since the bank holds captions, not images. An
    engine made by `from_files` knows its `source` and the `update` of the folder it holds, and
    `reload` makes a new engine over the folder as it is now, sharing the model.
    """

    def __init__(self, bundle, searcher: Searcher, querybank=None, fields: MetadataTable | None = None,
                 rows_kind: str = ROWS_IMAGES):
        if bundle.embed_dim != searcher.dim:
            raise EmbeddingMismatchError(
                f"the query model makes {bundle.embed_dim}-d embeddings but the collection holds "
                f"{searcher.dim}-d embeddings"
            )
        if querybank is not None and querybank.bias.shape != (len(searcher),):
            raise EmbeddingMismatchError(f"the querybank holds {querybank.bias.numel()} biases for {len(searcher)} images")
        if fields is not None and len(fields) != len(searcher):
            raise EmbeddingMismatchError(f"fields for {len(fields)} rows but the collection has {len(searcher)}")
        self.bundle = bundle
        self.searcher = searcher
        self.querybank = querybank
        self.fields = fields if fields is not None else empty_table(searcher.paths)
        self.rows_kind = rows_kind  # "images", or "captions" for a folder of encode --captions
        self.bundle.model.eval()
        self.source: CollectionSource | None = None
        self.signature: tuple | None = None  # source_signature(source) when the collection was loaded
        self.update: int | None = None  # the folder's update this engine holds (store.served_update)
        self.complete = True  # False when that update's encoding run had not finished
        self._model_identity: tuple[str, str] | None = None  # (--load_model as given, fingerprint)
        self._rows_by_path: dict[str, int] | None = None

    @classmethod
    def from_files(
        cls,
        load_model: str | os.PathLike,
        emb_path: str | os.PathLike,
        index_path: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        fold_duplicates: bool | str | os.PathLike = False,
        mapped: bool = False,
        querybank: bool = False,
    ) -> SearchEngine:
        """The query model and the folder's current collection; refuses embeddings of another model.

        `mapped` searches the folder's consolidated fp16 matrix (`mmap_store`, built on first use and
        rebuilt when the shards change) memory-mapped, so a large collection is never read into
        memory first: pages load as the scoring touches them. `querybank` ranks text queries with
        the folder's querybank biases (./clipsearch querybank), refused when they were
        computed for other rows or another model. `fold_duplicates` answers images with the same
        bytes as one hit; given the path of a report of ./clipsearch duplicates, its groups of
        near-duplicates too.
        """
        from clipsearch.checkpoint import model_fingerprint
        from clipsearch.models.released import load_model as load_any_model

        if mapped and fold_duplicates is True:
            raise UserError("folding exact duplicates needs the shards' digests: leave out --mmap, or fold by a "
                            "report of ./clipsearch duplicates")
        if fold_duplicates not in (True, False):
            fold_duplicates = str(fold_duplicates)
        bundle = load_any_model(load_model)
        source = CollectionSource(str(emb_path), None if index_path is None else str(index_path), dtype,
                                  fold_duplicates, mapped, querybank)
        return cls._over(bundle, source, (str(load_model), model_fingerprint(bundle)))

    @classmethod
    def _over(cls, bundle, source: CollectionSource, model_identity: tuple[str, str]) -> SearchEngine:
        """An engine with `bundle` over the source's collection as the folder holds it now."""
        load_model, fingerprint = model_identity
        emb_path = source.emb_path
        # Read before the collection: an update landing meanwhile then shows as a change, never hides.
        signature, update, complete = source_signature(source), served_update(emb_path), not update_in_progress(emb_path)
        if source.mapped:
            from clipsearch.mmap_store import consolidate

            collection = consolidate(emb_path)  # paths and fields memory-mapped with the matrix: no shard is read
            encoded_with_model = read_json(Path(emb_path) / MODEL_FILE) or {}
            fields = collection.fields
        else:
            collection = load_collection(emb_path, dtype=source.dtype)
            encoded_with_model = collection.model
            fields = collection.fields
        check_encoded_with(encoded_with_model, load_model, fingerprint, emb_path)
        if collection.dim != bundle.embed_dim:
            raise EmbeddingMismatchError(
                f"query model {load_model}: embeddings in {emb_path} are {collection.dim}-d but the query model "
                f"makes {bundle.embed_dim}-d embeddings"
            )
        index = None
        if source.index_path is not None:
            from clipsearch.index import load_index  # one way only: the index never imports search

            index = load_index(source.index_path)
        bank = None
        if source.querybank:
            from clipsearch.querybank import QueryBank

            bank = QueryBank.load(emb_path, collection.order_fingerprint, len(collection.paths), fingerprint)
        duplicates = None
        if source.fold_duplicates:
            duplicates = [] if source.mapped else collection.duplicate_groups()
            if isinstance(source.fold_duplicates, str):
                from clipsearch.near_duplicates import groups_from_report, merge_groups

                near = groups_from_report(source.fold_duplicates, collection.order_fingerprint)
                duplicates = merge_groups(len(collection.paths), duplicates, near)
        searcher = Searcher(collection.paths, collection.embeddings, index, assume_normalised=True, duplicates=duplicates,
                            order=collection.order_fingerprint if index is not None else None)
        engine = cls(bundle, searcher, bank, fields, rows_kind(encoded_with_model))
        engine.source, engine.signature, engine._model_identity = source, signature, model_identity
        engine.update, engine.complete = update, complete
        return engine

    def reload(self) -> SearchEngine:
        """A new engine over the folder as it is now, with this engine's model; this one is left as it was."""
        if self.source is None or self._model_identity is None:
            raise ValueError("this engine was not loaded from an embedding folder, so it cannot be reloaded")
        return self._over(self.bundle, self.source, self._model_identity)

    def row_of(self, path: str) -> int | None:
        """The collection row holding `path`, or None (the lookup table is built on first use; a store's
        mapped paths are scanned instead, so that no table of every path is ever held)."""
        if isinstance(self.searcher.paths, PathColumn):
            try:
                return self.searcher.paths.index(path)
            except ValueError:
                return None
        if self._rows_by_path is None:
            self._rows_by_path = {image_path: row for row, image_path in enumerate(self.searcher.paths)}
        return self._rows_by_path.get(path)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return F.normalize(self.bundle.model.encode_text(self.bundle.tokenizer(list(texts))).float(), dim=-1)

    def encode_images(self, images: list) -> torch.Tensor:
        from clipsearch.models import embed_images  # the model families load only when a model does

        pixels = torch.stack([self.bundle.eval_transform(image.convert("RGB")) for image in images])
        with torch.inference_mode():
            return F.normalize(embed_images(self.bundle.model, pixels, self.bundle.image_views), dim=-1)

    def embed_terms(self, terms: Sequence[Term]) -> torch.Tensor:
        """One unit-length query [d] from weighted terms: each term embedded and normalised, the weighted
        sum normalised again. A TermError when there are none or they cancel out."""
        if not terms:
            raise TermError("a query needs at least one term")
        parts = torch.empty(len(terms), self.searcher.dim)
        by_kind: dict[str, list[int]] = {}
        for position, term in enumerate(terms):
            by_kind.setdefault(term.kind, []).append(position)
        for kind, positions in by_kind.items():
            values = [terms[position].value for position in positions]
            if kind == TEXT:
                parts[positions] = self.encode_texts(values)
            elif kind == IMAGE:
                parts[positions] = self.encode_images(values)
            elif kind == ROW:
                rows = torch.tensor([self._checked_row(value) for value in values])
                parts[positions] = self.searcher.vectors(rows).float()
            elif kind == EMBEDDING:
                parts[positions] = torch.stack([torch.as_tensor(value, dtype=torch.float32).reshape(-1) for value in values])
            else:
                raise TermError(f"unknown kind of term {kind!r}")
        weights = torch.tensor([float(term.weight) for term in terms])
        combined = (weights[:, None] * F.normalize(parts, dim=-1)).sum(dim=0)
        if combined.norm() < 1e-6:
            raise TermError("the terms cancel out: their weighted sum is zero")
        return F.normalize(combined, dim=0)

    def _checked_row(self, row: object) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(self.searcher):
            raise TermError(f"no collection item {row!r} (the collection holds {len(self.searcher)})")
        return row

    def rows_where(self, where: Sequence[str | Condition] = ()) -> RowSet | None:
        """The rows passing every condition of `where` (FIELD OP VALUE), or None for no conditions; a
        FilterError for bad syntax, a field the collection lacks or a value of the wrong kind."""
        return self.fields.select(where)

    def search(self, terms: Sequence[Term], top_k: int, where: Sequence[str | Condition] = (), offset: int = 0,
               exclude: Sequence[int] = ()) -> list[Hit]:
        """The hits of one combined query, ranks offset+1 .. offset+top_k, among the rows `where` keeps, with
        their fields. Text-only queries take the querybank's biases (the bank holds captions); rows in
        `exclude` are left out (an item is not its own "similar")."""
        text = all(term.kind == TEXT for term in terms)
        return self.search_embedding(self.embed_terms(terms), top_k, where, offset, text, exclude)

    def search_embedding(self, query: torch.Tensor, top_k: int, where: Sequence[str | Condition] = (),
                         offset: int = 0, text: bool = False, exclude: Sequence[int] = ()) -> list[Hit]:
        """`search` for a query already embedded ([d], unit length); `text` says it is text alone, which
        the querybank's biases are for."""
        bias = self.querybank.bias if self.querybank is not None and text else None
        return self._ranked(query.reshape(1, -1), top_k, where, offset, bias, exclude)[0]

    def _ranked(self, queries: torch.Tensor, top_k: int, where, offset: int, bias, exclude=()) -> list[list[Hit]]:
        allowed = self.rows_where(where)
        wanted = int(offset) + int(top_k) + len(exclude)
        found = self.searcher.search(queries, wanted, bias, allowed)
        left_out = set(exclude)
        return [self.with_fields([hit for hit in hits if hit.id not in left_out][offset : offset + top_k])
                for hits in found]

    def with_fields(self, hits: list[Hit]) -> list[Hit]:
        return [replace(hit, fields=self.fields.row(hit.id)) for hit in hits]

    def search_text(self, texts: list[str], top_k: int, where: Sequence[str | Condition] = (),
                    offset: int = 0) -> list[list[Hit]]:
        """One list of hits per text, each a query of its own."""
        if not texts:
            return []
        bias = self.querybank.bias if self.querybank is not None else None
        return self._ranked(self.encode_texts(texts), top_k, where, offset, bias)

    def search_image(self, images: list, top_k: int, where: Sequence[str | Condition] = (),
                     offset: int = 0) -> list[list[Hit]]:
        """One list of hits per PIL image, each a query of its own."""
        if not images:
            return []
        return self._ranked(self.encode_images(images), top_k, where, offset, None)

    def similar(self, row: int, top_k: int, where: Sequence[str | Condition] = (), offset: int = 0) -> list[Hit]:
        """The items most like collection item `row`, from its stored embedding (no model call), itself left out."""
        return self.search([Term(ROW, row)], top_k, where, offset, exclude=[self._checked_row(row)])

    def path_of(self, hit_id: int) -> str:
        return self.searcher.paths[hit_id]

    def image_of(self, hit_id: int) -> str:
        """The image file a row shows: the row's own path, or for a caption its image's."""
        return image_file(self.searcher.paths[hit_id], self.rows_kind)
