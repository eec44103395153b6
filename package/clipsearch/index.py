"""faiss index over an embedding folder, chosen to fit a memory budget, built in memory or in parts on disk, with its recall measured at build time."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipsearch.durable import atomic_write, write_json
from clipsearch.errors import UserError
from clipsearch.store import read_json

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
KINDS = ("auto", "flat", "ivf", "ivf_sq8", "ivf_pq", "ivf_pq_fast", "hnsw")
IVF_KINDS = ("ivf", "ivf_sq8", "ivf_pq", "ivf_pq_fast")
# Layouts whose codes rank too coarsely on their own: they re-score candidates from the fp16 store.
RERANKING_KINDS = ("ivf_pq", "ivf_pq_fast")
# ivf_pq_fast: faiss's 4-bit PQ "fast scan" (codes of dim/2 bytes, scored sixteen at a time from
# tables held in SIMD registers), re-ranked exactly. At 5M x 512 CLIP-like vectors its scan ran 17
# times faster a code byte than IVF-SQ8's, and text queries reached recall 0.966 at 5.6 ms where
# SQ8 needed 22.9 ms, in a quarter of the memory (BENCHMARKS.md). "auto" picks it from this many
# rows when the build can re-rank from the store; below, every layout answers in milliseconds and
# SQ8 needs no store reads.
FAST_SCAN_FROM = 1_000_000
# Below FLAT_BELOW vectors an exact scan takes milliseconds, so an approximate index buys nothing.
FLAT_BELOW = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
# faiss warns below 39 training points per centroid; 64 keeps k-means (the build's slowest step
# with the add) to about 4 minutes for 4096 lists on one core.
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 64
KMEANS_ITERATIONS = 10
# faiss's advice is an HNSW coarse quantizer once lists number tens of thousands: assigning a
# vector then costs a graph walk instead of a scan of every centroid. But a text query lies outside
# the images' cone, where the walk misses the centroids nearest it: at 5M CLIP-like vectors,
# IVF16384_HNSW32,SQ8 stopped at text recall 0.863 whatever nprobe, and the same lists under a flat
# quantizer reached 0.947 at nprobe 512 and still rose. A flat scan of 65,536 centroids reads 128 MB
# a query (about 6 ms here), so the graph waits until then.
HNSW_QUANTIZER_FROM = 65_536
ADD_ROWS = 65_536
# Bytes per vector that faiss's inverted lists add to each code: the 64-bit row id.
ID_BYTES = 8
# Leave this share of the budget for what the estimate leaves out (allocator slack, list headroom).
BUDGET_MARGIN = 0.9
# A build may always use this much for its sample and chunks, whatever the index's budget: the
# interpreter with torch and faiss loaded takes more than that already.
MIN_BUILD_MEMORY = 256 * 2**20
# What a build process holds before any index work, counted in its --max_memory: the interpreter
# with torch, faiss and numpy imported and the store opened took 370 MB of anonymous memory here.
PROCESS_BYTES = 512 * 2**20
# faiss grows an inverted list by doubling it (a std::vector), and the blocks left behind stay with
# the allocator: a part's lists take more than their bytes before they are written out. At 20M x
# 512 (IVF8192,PQ128, 10M rows a rank in one part) each rank peaked at 4.15 GB of its own; less
# the process (0.37 GB) and the chunk's temporaries (0.4 GB), that is 2.5 times the lists' 1.36 GB.
# Counted at 3x, the same build wrote parts of 0.97 GB and peaked at 3.66 GB a rank (about 3x):
# BUDGET_MARGIN is what keeps it under.
LIST_GROWTH = 3
# PQ codes keep too little to rank the true top 10 first, so IVF-PQ re-scores top_k * depth
# candidates exactly from the memory-mapped fp16 store. A text query lies far from every image
# (cosine 0.3 to its own), and its true top 10 can sit deep in the PQ order: a 60k-row, 10 MB
# index stopped at recall 0.83 on text queries with every list scanned at depth 10. So the depth
# is tuned with nprobe, from these (benchmarks/bench_index.py).
RERANK_FACTORS = (10, 20, 40, 80, 160)
RERANK_FACTOR = RERANK_FACTORS[0]
# What re-scoring one candidate costs, in bytes of codes scanned for the same time: a random
# 1 KB row read from the mapped store (in the page cache) and a 512-d dot product. On 200k x 512,
# IVF1024,PQ256, one query at a time on 2 cores: 1.5 ns a code byte, 3.6 to 4 us a re-scored row.
# Weighs nprobe against re-rank depth when the tuning picks the cheapest setting.
RERANK_ROW_COST = 2_500
# What a byte of fast-scan codes costs against a byte of PQ or SQ8 codes: 5M x 512, IVF4096,
# PQ256x4fs, one query on 2 cores, 0.085 ns a code byte against about 1.5.
FAST_SCAN_BYTE_COST = 0.06
TARGET_RECALL = 0.95
# The tuning queries are a sample of what users will send, so a setting must reach the target with
# this margin: its recall less 1.645 standard errors of the per-query mean (one-sided 95%). Without
# it, 20M rows tuned to 0.951 on 500 queries measured 0.946 on 1,000 others.
RECALL_CONFIDENCE_Z = 1.645
# A doubling of nprobe that adds less recall than this (at the deepest re-rank) means the codes
# limit recall: the tuning stops there.
RECALL_PLATEAU = 0.002
# Captions of everyday photos (written for this project) that stand in for a collection's own when
# it has none: text queries in the text cone, which is what the tuning needs.
GENERIC_CAPTIONS = Path(__file__).with_name("generic_captions.txt")
RECALL_QUERIES = 500
TOP_K = 10
# An index built in parts keeps them here, beside the index file, until they are merged.
PARTS_SUFFIX = ".parts"
IVFDATA_SUFFIX = ".ivfdata"
# How long one rank waits for another (rank 0's training, the other ranks' parts).
WAIT_SECONDS = 6 * 3600
POLL_SECONDS = 0.5


class IndexMismatchError(UserError, ValueError):
    """An index file and its record do not belong together."""


def default_nlist(count: int) -> int:
    """About 2 * sqrt(N) lists as a power of two, never so many that a list gets too few training points."""
    wanted = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(count))))
    return max(1, min(wanted, count // MIN_POINTS_PER_LIST))


@dataclass(frozen=True)
class Plan:
    """An index layout and the memory it will take."""

    kind: str
    nlist: int = 0
    pq_m: int = 0  # PQ sub-quantizers (bytes per code)
    estimated_bytes: int = 0

    @property
    def factory(self) -> str:
        """The layout in faiss's index_factory language, for the record."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{HNSW_M},Flat"
        quantizer = f"IVF{self.nlist}" + (f"_HNSW{HNSW_M}" if self.nlist >= HNSW_QUANTIZER_FROM else "")
        codes = {"ivf": "Flat", "ivf_sq8": "SQ8", "ivf_pq": f"PQ{self.pq_m}", "ivf_pq_fast": f"PQ{self.pq_m}x4fs"}[self.kind]
        return f"{quantizer},{codes}"


def code_bytes(kind: str, dim: int, pq_m: int = 0) -> int:
    """Bytes of one vector's code in an inverted list, without its id."""
    return {"ivf": dim * 4, "ivf_sq8": dim, "ivf_pq": pq_m, "ivf_pq_fast": (pq_m + 1) // 2}[kind]


def resident_bytes(kind: str, dim: int, nlist: int, pq_m: int = 0) -> int:
    """What an IVF index holds besides its lists: centroids (and their HNSW graph) and codebooks."""
    centroids = nlist * dim * 4 + (nlist * HNSW_M * 2 * 4 if nlist >= HNSW_QUANTIZER_FROM else 0)
    return centroids + {"ivf": 0, "ivf_sq8": dim * 2 * 4, "ivf_pq": 256 * dim * 4, "ivf_pq_fast": 16 * dim * 4}[kind]


def estimate_bytes(kind: str, count: int, dim: int, nlist: int = 0, pq_m: int = 0) -> int:
    """Resident size of an index: codes and ids per vector, plus centroids and codebooks."""
    if kind == "flat":
        return count * dim * 4
    if kind == "hnsw":
        return count * (dim * 4 + HNSW_M * 2 * 4)  # vectors and about 2M neighbour links of 4 bytes
    return count * (code_bytes(kind, dim, pq_m) + ID_BYTES) + resident_bytes(kind, dim, nlist, pq_m)


def plan_index(count: int, dim: int, max_memory: int | None = None, kind: str = "auto", nlist: int | None = None,
               ivf_only: bool = False, reranks: bool = False) -> Plan:
    """The most accurate layout that fits `max_memory` bytes.

    In order of preference: flat (small collections), IVF with full vectors, IVF with 8-bit scalar
    codes (d bytes a vector, recall within a point of full vectors), then IVF-PQ with the most
    sub-quantizers that fit (d/2 ... 8 bytes a vector; its ranking is repaired by the exact re-rank).
    `ivf_only`: an index built in parts has inverted lists, so no flat or HNSW layout, and no
    fast-scan codes (faiss keeps those in blocks its on-disk lists cannot hold). With `reranks` (the
    build can re-score from the store), collections of FAST_SCAN_FROM rows or more get fast-scan
    PQ first: about as accurate after the re-rank, and several times faster.
    """
    budget = math.inf if max_memory is None else max_memory * BUDGET_MARGIN
    lists = min(nlist or default_nlist(count), count)
    pq_choices = [m for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32, 8) if m >= 1 and dim % m == 0]
    fast_choices = [m for m in pq_choices if m % 2 == 0]  # fast scan pairs its 4-bit sub-quantizers
    if kind in ("flat", "hnsw", "ivf_pq_fast") and ivf_only:
        raise ValueError(f"an index built in parts has on-disk inverted lists: --kind {kind} cannot; "
                         "use auto, ivf, ivf_sq8 or ivf_pq")
    if kind == "auto":
        small = count < FLAT_BELOW and not ivf_only
        candidates = [Plan("flat", estimated_bytes=estimate_bytes("flat", count, dim))] if small else []
        if reranks and count >= FAST_SCAN_FROM and not ivf_only and fast_choices:
            candidates += [Plan("ivf_pq_fast", lists, fast_choices[0],
                                estimate_bytes("ivf_pq_fast", count, dim, lists, fast_choices[0]))]
        candidates += [Plan(name, lists, 0, estimate_bytes(name, count, dim, lists)) for name in ("ivf", "ivf_sq8")]
        candidates += [Plan("ivf_pq", lists, m, estimate_bytes("ivf_pq", count, dim, lists, m)) for m in pq_choices]
    elif kind in ("ivf_pq", "ivf_pq_fast"):
        choices = pq_choices if kind == "ivf_pq" else fast_choices
        candidates = [Plan(kind, lists, m, estimate_bytes(kind, count, dim, lists, m)) for m in choices]
    elif kind in KINDS:
        candidates = [Plan(kind, lists if kind.startswith("ivf") else 0, 0, estimate_bytes(kind, count, dim, lists))]
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    for plan in candidates:
        if plan.estimated_bytes <= budget:
            return plan
    smallest = min(candidates, key=lambda plan: plan.estimated_bytes)
    raise ValueError(
        f"no {kind} index of {count:,} x {dim} vectors fits {max_memory / 2**20:,.2f} MB; the smallest "
        f"({smallest.factory}) needs about {smallest.estimated_bytes / BUDGET_MARGIN / 2**20:,.2f} MB: raise --max_memory"
    )


@dataclass(frozen=True)
class BuildMemory:
    """How a build stays within its budget: rows it trains on, rows it adds at a time, list bytes a part holds."""

    train_rows: int
    chunk_rows: int
    part_bytes: float  # math.inf: one part per rank


def chunk_rows_within(budget: float, dim: int) -> int:
    """Rows added at a time: fp32 rows and faiss's temporaries for them (about 3 copies) in 1/8 of the budget."""
    return int(min(ADD_ROWS, max(1_024, budget / 8 / (3 * dim * 4))))


def training_bytes(train_rows: int, dim: int) -> int:
    """The training sample as read (fp16) and in fp32, and faiss's residuals of it (for the codebooks)."""
    return 3 * train_rows * dim * 4


def work_budget(max_memory: int | None) -> float:
    """Bytes a build process may use for its index work: `max_memory` with its margin, less the
    process itself (PROCESS_BYTES), never below MIN_BUILD_MEMORY."""
    if max_memory is None:
        return math.inf
    return max(max_memory * BUDGET_MARGIN - PROCESS_BYTES, MIN_BUILD_MEMORY)


def build_memory(plan: Plan, count: int, dim: int, max_memory: int | None, held_out: int = 0,
                 in_parts: bool = False) -> BuildMemory:
    """The sample, chunk and part sizes that keep one build process within `max_memory`.

    The process itself takes PROCESS_BYTES of it. In memory, the index the plan sized to the budget
    is held whole, and the training sample comes on top. In parts, a process holds the resident
    structures and, in turn, the training sample (rank 0), then the chunk being added and one
    part's lists, at up to LIST_GROWTH times their bytes: the sample shrinks (never below faiss's
    39 rows a list) and the parts get smaller to fit. Below MIN_BUILD_MEMORY the work budget is
    that: the interpreter alone takes more than a tiny budget.
    """
    wanted = min(max(count - held_out, 1), plan.nlist * TRAIN_POINTS_PER_LIST) if plan.kind in IVF_KINDS else 0
    budget = work_budget(max_memory)
    chunk_rows = chunk_rows_within(budget, dim)
    if max_memory is None or not in_parts:
        return BuildMemory(wanted, chunk_rows, math.inf)
    resident = resident_bytes(plan.kind, dim, plan.nlist, plan.pq_m)
    for_training = budget - resident
    for_lists = (budget - resident - 3 * chunk_rows * dim * 4) / LIST_GROWTH
    least = min(wanted, plan.nlist * MIN_POINTS_PER_LIST)
    smallest_part = (plan.nlist + chunk_rows) * (code_bytes(plan.kind, dim, plan.pq_m) + ID_BYTES)
    if for_training < training_bytes(least, dim) or for_lists < smallest_part:
        needed = (resident + max(training_bytes(least, dim), 3 * chunk_rows * dim * 4 + LIST_GROWTH * smallest_part)
                  + PROCESS_BYTES) / BUDGET_MARGIN
        raise ValueError(
            f"building a {plan.factory} index of {count:,} x {dim} vectors in parts needs at least {needed / 2**20:,.1f} MB "
            f"(the process, its {plan.nlist:,} centroids and codebooks, and {least:,} training rows); --max_memory "
            f"{max_memory / 2**20:,.1f} MB is too small: raise it, or lower --nlist"
        )
    train_rows = int(min(wanted, for_training // (3 * dim * 4)))
    return BuildMemory(train_rows, chunk_rows, for_lists)


def in_memory_build_fits(plan: Plan, count: int, dim: int, max_memory: int | None) -> bool:
    """Whether a build that holds the whole index, plus its training sample, stays within `max_memory`."""
    if max_memory is None or plan.kind not in IVF_KINDS:
        return True
    memory = build_memory(plan, count, dim, max_memory)
    peak = plan.estimated_bytes + training_bytes(memory.train_rows, dim) + 3 * memory.chunk_rows * dim * 4
    return peak <= work_budget(max_memory)


class FaissIndex:
    """A faiss index with the facts needed to trust it: layout, parameters, measured recall, and the row order it was built on.

    An IVF-PQ index re-scores its candidates exactly from `rerank_rows` (the memory-mapped fp16
    store) when it has them.
    """

    def __init__(self, index, info: dict, rerank_rows: Callable[[np.ndarray], np.ndarray] | None = None):
        self.index = index
        self.info = info
        self.rerank_rows = rerank_rows
        self.configure()

    def configure(self) -> None:
        import faiss

        params = self.info["params"]
        if self.kind.startswith("ivf"):
            faiss.extract_index_ivf(self.index).nprobe = int(params["nprobe"])
            if params.get("quantizer_ef_search"):
                faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer).hnsw.efSearch = int(
                    params["quantizer_ef_search"]
                )

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def order_fingerprint(self) -> str:
        return self.info["order_fingerprint"]

    @property
    def reranks(self) -> bool:
        return self.rerank_rows is not None and bool(self.info["params"].get("rerank_factor"))

    def set_nprobe(self, nprobe: int, rerank_factor: int | None = None) -> None:
        self.info["params"]["nprobe"] = int(nprobe)
        if rerank_factor is not None:
            self.info["params"]["rerank_factor"] = int(rerank_factor)
        self.configure()

    def _faiss_search(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self.kind in IVF_KINDS:
            # faiss splits a batch over its threads by query; fewer queries than threads are split
            # by inverted list instead, or one core scans every list alone (200k x 512, IVF1024,SQ8,
            # nprobe 128, one query on 2 cores: 1.4 ms against 2.45 ms, same answers).
            faiss.extract_index_ivf(self.index).parallel_mode = 1 if len(queries) < faiss.omp_get_max_threads() else 0
        return self.index.search(queries, int(count))

    def candidates(self, queries: np.ndarray, count: int) -> np.ndarray:
        """Row ids of the index's own best `count` answers (before any re-rank), best first."""
        return self._faiss_search(np.ascontiguousarray(queries, dtype=np.float32), count)[1]

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product scores and row ids, best first; rows faiss could not fill are -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "hnsw":
            # HNSW needs at least top_k candidates in its beam to return top_k results.
            self.index.hnsw.efSearch = max(int(self.info["params"]["ef_search"]), int(top_k))
        if not self.reranks:
            return self._faiss_search(queries, top_k)
        candidates = self.candidates(queries, int(top_k) * int(self.info["params"]["rerank_factor"]))
        return rerank(queries, candidates, self.rerank_rows, int(top_k))

    def search_among(self, queries: np.ndarray, top_k: int, bitmap: np.ndarray, kept: float) -> tuple[np.ndarray, np.ndarray]:
        """`search` over only the rows whose bit is set in `bitmap` (row i at bit i % 8 of byte i // 8).

        faiss skips the other rows as it scans (IDSelectorBitmap). So that about as many passing
        rows are read as an unfiltered search reads rows, an IVF index probes nprobe / `kept` lists
        (at most all of them) and an HNSW graph widens its beam alike; at every list an IVF-Flat
        index is exact over the rows that pass.
        """
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        bitmap = np.ascontiguousarray(bitmap, dtype=np.uint8)
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # reads `bitmap`, which outlives it
        widen = 1.0 / max(kept, 1e-9)
        params = self.info["params"]
        if self.kind.startswith("ivf"):
            nlist = int(faiss.extract_index_ivf(self.index).nlist)
            search_params = faiss.SearchParametersIVF(sel=selector, nprobe=min(nlist, math.ceil(int(params["nprobe"]) * widen)))
            if params.get("quantizer_ef_search"):
                quantizer_params = faiss.SearchParametersHNSW(efSearch=int(params["quantizer_ef_search"]))
                search_params.quantizer_params = quantizer_params
        elif self.kind == "hnsw":
            beam = min(self.count, math.ceil(max(int(params["ef_search"]), int(top_k)) * widen))
            search_params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(beam, int(top_k)))
        else:
            search_params = faiss.SearchParameters(sel=selector)
        wanted = int(top_k) * int(params["rerank_factor"]) if self.reranks else int(top_k)
        scores, rows = self.index.search(queries, wanted, params=search_params)
        if not self.reranks:
            return scores, rows
        return rerank(queries, rows, self.rerank_rows, int(top_k))

    def range_search(self, queries: np.ndarray, radius: float, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row whose inner product with a query is above `radius`, as faiss answers it: (lims,
        scores, rows), the matches of query i at lims[i]:lims[i + 1]. An IVF index probes `nprobe`
        lists (default its own); scores are those of its codes, not re-ranked."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind.startswith("ivf"):
            nlist = int(faiss.extract_index_ivf(self.index).nlist)
            probes = min(nlist, int(nprobe or self.info["params"]["nprobe"]))
            return self.index.range_search(queries, float(radius), params=faiss.SearchParametersIVF(nprobe=probes))
        return self.index.range_search(queries, float(radius))

    def recall_warning(self) -> str | None:
        """One line for search when text queries may get less than the target recall (None when not)."""
        return recall_warning(self.info)

    def save(self, index_path: str | os.PathLike) -> Path:
        """Write the index, then its record (index.json); the record's byte count ties the pair together.

        Each file is replaced atomically, but not both at once: a build stopped between the two
        leaves an index whose record describes another, which `load_index` refuses by its size. An
        index with on-disk lists keeps them in the `.ivfdata` file beside it, which the record
        names, and an earlier index's lists file goes.
        """
        index_path = Path(index_path)
        earlier = (read_json(info_path_of(index_path)) or {}).get("ivfdata")
        _write_index_file(self.index, index_path, size_hint=self.info.get("estimated_bytes"))
        lists_bytes = (index_path.parent / self.info["ivfdata"]).stat().st_size if self.info.get("ivfdata") else 0
        # The file's own size ties it to this record (load_index); index_bytes counts the lists too.
        self.info["index_file_bytes"] = index_path.stat().st_size
        self.info["index_bytes"] = index_path.stat().st_size + lists_bytes
        write_json(info_path_of(index_path), self.info)
        if earlier and earlier != self.info.get("ivfdata"):  # a server still mapping it keeps it until it closes
            (index_path.parent / earlier).unlink(missing_ok=True)
        return index_path


def recall_warning(info: dict) -> str | None:
    """What index.json says about recall on text queries, as one line when it is below target or unknown."""
    if info.get("kind") == "flat":
        return None
    target = float(info.get("target_recall", TARGET_RECALL))
    text_recall = info.get("text_recall_at_10")
    if text_recall is None:
        why = info.get("text_recall_note") or "the index predates text-query tuning"
        return (f"warning: this index's recall on text queries was never measured ({why}); it may miss results "
                f"exact search finds. Rebuild it with ./clipsearch index --load_model <the encoding model>")
    if text_recall < target:
        return (f"warning: this index finds {text_recall:.1%} of the exact top 10 for text queries, below its "
                f"target {target:.0%}; a larger --max_memory (or --nprobe) gives more")
    return None


def rerank(
    queries: np.ndarray, candidates: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray], top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate rows; the best `top_k`, best first."""
    vectors = rows_of(np.maximum(candidates, 0)).astype(np.float32)  # [q, candidates, d]
    scores = np.einsum("qcd,qd->qc", vectors, queries)
    scores[candidates < 0] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    best_scores, best_rows = np.take_along_axis(scores, best, 1), np.take_along_axis(candidates, best, 1)
    best_rows[~np.isfinite(best_scores)] = -1
    return best_scores, best_rows


def info_path_of(index_path: str | os.PathLike) -> Path:
    return Path(index_path).with_suffix(".json")


def resolve_index_path(index_path: str | os.PathLike) -> Path:
    """An index file, or an embedding folder holding index.faiss."""
    index_path = Path(index_path)
    return index_path / INDEX_FILE if index_path.is_dir() else index_path


@contextlib.contextmanager
def _faiss_quiet():
    """Keep faiss's C-level prints about on-disk lists ("resizing ...", "updating ondisk filename ...")
    off stdout, which `search --json` keeps for one JSON object a line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_faiss_index(index_path: str | os.PathLike, mmap: bool = True, on_disk: bool = False):
    """(index, memory_mapped): IVF lists and flat codes are mapped from disk where faiss can, else read.

    On-disk lists (an index built in parts) are always mapped, found beside the index file
    wherever it was moved; faiss's MMAP flag would skip them.
    """
    import faiss

    if on_disk:
        with _faiss_quiet():
            return faiss.read_index(str(index_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY), True
    if mmap:
        try:
            return faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError:  # index types faiss cannot map (e.g. HNSW graphs) are read whole
            pass
    return faiss.read_index(str(index_path)), False


def load_index(index_path: str | os.PathLike, nprobe: int | None = None, mmap: bool = True) -> FaissIndex:
    """Open a saved index memory-mapped; an IVF-PQ index also opens the store beside it for its re-rank."""
    index_path = resolve_index_path(index_path)
    info_path = info_path_of(index_path)
    if not index_path.is_file() or not info_path.is_file():
        raise FileNotFoundError(
            f"no index at {index_path} (with {info_path.name}); build one with "
            "./clipsearch index --emb_path <folder>"
        )
    info = json.loads(info_path.read_text())
    expected_bytes = info.get("index_file_bytes", None if info.get("ivfdata") else info.get("index_bytes"))
    if expected_bytes not in (None, index_path.stat().st_size):
        raise IndexMismatchError(
            f"{index_path} ({index_path.stat().st_size:,} bytes) is not the index {info_path.name} describes "
            f"({expected_bytes:,} bytes): a build stopped between writing the two; rebuild it with "
            f"./clipsearch index --emb_path {index_path.parent}"
        )
    if nprobe is not None:
        info["params"]["nprobe"] = int(nprobe)
    index, mapped = read_faiss_index(index_path, mmap, on_disk=bool(info.get("ivfdata")))
    info["memory_mapped"] = mapped
    rerank_rows = None
    if info["params"].get("rerank_factor"):
        from clipsearch.mmap_store import open_store

        store = open_store(index_path.parent, matrix_only=True)
        if store is not None and store.order_fingerprint == info["order_fingerprint"]:
            rerank_rows = store.rows
        else:
            logger.warning(
                "%s: the consolidated store it re-ranks from is missing or stale; answering from PQ codes alone "
                "(lower recall). Rebuild with ./clipsearch index --emb_path %s",
                index_path,
                index_path.parent,
            )
    return FaissIndex(index, info, rerank_rows)


def _as_float32(rows) -> np.ndarray:
    return np.ascontiguousarray(torch.as_tensor(rows).float().numpy())


def _take(embeddings, rows: np.ndarray):
    return embeddings[torch.from_numpy(rows)] if isinstance(embeddings, torch.Tensor) else embeddings[rows]


def _new_index(plan: Plan, dim: int):
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT
    if plan.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, metric)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    if plan.nlist >= HNSW_QUANTIZER_FROM:
        quantizer = faiss.IndexHNSWFlat(dim, HNSW_M, metric)
        quantizer.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        quantizer = faiss.IndexFlatIP(dim)
    if plan.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, metric)
    elif plan.kind == "ivf_sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, plan.nlist, faiss.ScalarQuantizer.QT_8bit, metric)
    elif plan.kind == "ivf_pq_fast":
        index = faiss.IndexIVFPQFastScan(quantizer, dim, plan.nlist, plan.pq_m, 4, metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_m, 8, metric)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index frees its quantizer
    index.cp.niter = KMEANS_ITERATIONS
    return index


# ---------------------------------------------------------------------------------------------
# Rows: sampling, training, adding (with the exact neighbours of the recall queries on the way)
# ---------------------------------------------------------------------------------------------


def sample_rows(count: int, held_out: int, train: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(held-out query rows, training rows), disjoint, each sorted, drawn without listing all `count` rows."""
    held_out = min(held_out, count)
    drawn = np.random.default_rng(seed).choice(count, size=min(count, held_out + train), replace=False)
    return np.sort(drawn[:held_out]), np.sort(drawn[held_out:])


def train_index(embeddings, plan: Plan, train_rows: np.ndarray):
    """An empty faiss index of the plan's layout, its centroids and codebooks trained on `train_rows`."""
    index = _new_index(plan, int(embeddings.shape[1]))
    if plan.kind in IVF_KINDS:
        if len(train_rows) < plan.nlist:  # tiny collections: train on everything
            train_rows = np.arange(int(embeddings.shape[0]))
        index.train(_as_float32(_take(embeddings, train_rows)))
    return index


def add_rows(index, embeddings, start: int, end: int, chunk_rows: int = ADD_ROWS,
             queries: np.ndarray | None = None, top_k: int = TOP_K,
             flush: Callable[[object], None] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Add rows [start, end) to `index` (None: add nowhere) under their row numbers, a chunk at a time.

    With `queries`, also returns their exact top-k (scores, rows) among these rows, from the same
    reads, so the ground truth of the recall costs no second pass over the collection. `flush(index)`
    is called after each chunk (a part build writes its lists out there once they fill a part).
    """
    import faiss

    heap = faiss.ResultHeap(len(queries), top_k, keep_max=True) if queries is not None else None
    for chunk_start in range(start, end, chunk_rows):
        rows = _as_float32(embeddings[chunk_start : min(end, chunk_start + chunk_rows)])
        if index is not None:
            if faiss.try_extract_index_ivf(index) is not None:
                index.add_with_ids(rows, np.arange(chunk_start, chunk_start + len(rows), dtype=np.int64))
            else:  # flat and HNSW number rows in the order they come, which is row order here
                index.add(rows)
            if flush is not None:
                flush(index)
        if heap is not None:
            scores, found = faiss.knn(queries, rows, top_k, faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, np.where(found >= 0, found + chunk_start, -1))
    if heap is None:
        return None
    heap.finalize()
    return heap.D, heap.I


def exact_neighbours(embeddings, queries: np.ndarray, top_k: int, rows_per_chunk: int = ADD_ROWS) -> np.ndarray:
    """Row ids of the exact top-k by inner product, scanning `embeddings` (any dtype, memory-mapped) in chunks."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return add_rows(None, embeddings, 0, int(embeddings.shape[0]), rows_per_chunk, queries, top_k)[1]


# ---------------------------------------------------------------------------------------------
# Recall: measured on the queries search will get, and nprobe (and re-rank depth) tuned to it
# ---------------------------------------------------------------------------------------------


@dataclass
class Queries:
    """Query vectors to measure recall on; `own_rows` when they are collection rows (not their own answer)."""

    vectors: np.ndarray  # [n, dim] float32, unit length
    description: str  # for index.json, e.g. "500 held-out rows"
    own_rows: np.ndarray | None = None

    @property
    def extra(self) -> int:
        """Answers asked beyond top_k, for the query's own row to be dropped."""
        return 0 if self.own_rows is None else 1


def query_recalls(found_rows: np.ndarray, exact_rows: np.ndarray, own_rows: np.ndarray | None = None,
                  top_k: int = TOP_K) -> np.ndarray:
    """Each query's share of its exact top-k found among `found_rows`; a query's own row counts for neither."""
    shares = np.empty(len(exact_rows))
    for position, (exact, approximate) in enumerate(zip(exact_rows.tolist(), found_rows.tolist())):
        own = own_rows[position] if own_rows is not None else -2
        exact_set = [row for row in exact if row != own][:top_k]
        shares[position] = len(set(exact_set) & {row for row in approximate if row != own and row >= 0}) / top_k
    return shares


def overlap_recall(found_rows: np.ndarray, exact_rows: np.ndarray, own_rows: np.ndarray | None = None,
                   top_k: int = TOP_K) -> float:
    """Recall@k over all queries: the mean of `query_recalls`."""
    return float(query_recalls(found_rows, exact_rows, own_rows, top_k).mean())


def recall_lower_bound(shares: np.ndarray) -> float:
    """The mean recall less RECALL_CONFIDENCE_Z standard errors: what other queries of the same kind should reach."""
    if len(shares) < 2:
        return float(shares.mean()) if len(shares) else 0.0
    return float(shares.mean() - RECALL_CONFIDENCE_Z * shares.std(ddof=1) / math.sqrt(len(shares)))


def search_cost(index: FaissIndex, nprobe: int, rerank_factor: int | None, top_k: int = TOP_K) -> float:
    """A query's work in bytes of codes scanned: the lists it probes plus the candidates it re-scores."""
    import faiss

    ivf = faiss.extract_index_ivf(index.index)
    scanned = nprobe * index.count / max(1, ivf.nlist) * ivf.code_size
    if index.kind == "ivf_pq_fast":
        scanned *= FAST_SCAN_BYTE_COST
    return scanned + top_k * (rerank_factor or 0) * RERANK_ROW_COST


def _recall_by_depth(index: FaissIndex, queries: Queries, exact_rows: np.ndarray, top_k: int) -> list[tuple[int | None, np.ndarray]]:
    """(re-rank depth, each query's recall) at the current nprobe; every depth from one search, since
    the exact re-rank of the first top_k * depth candidates keeps exactly the true top-k among them."""
    if not index.reranks:
        found = index.search(queries.vectors, top_k + queries.extra)[1]
        return [(index.info["params"].get("rerank_factor"), query_recalls(found, exact_rows, queries.own_rows, top_k))]
    wanted = top_k + queries.extra
    candidates = index.candidates(queries.vectors, wanted * RERANK_FACTORS[-1])
    return [(factor, query_recalls(candidates[:, : wanted * factor], exact_rows, queries.own_rows, top_k))
            for factor in RERANK_FACTORS]


def tune_search(index: FaissIndex, queries: Queries, exact_rows: np.ndarray, target: float = TARGET_RECALL,
                top_k: int = TOP_K) -> list[dict]:
    """The cheapest nprobe (powers of two) and re-rank depth whose recall@k on `queries` reaches `target`
    with a margin for the queries being a sample (`recall_lower_bound`).

    Leaves the index set to it (to the best recall found when nothing reaches the target) and
    returns every setting tried with its recall and lower bound. nprobe doubles until no larger one
    can be cheaper than a setting found, or the deepest re-rank gains less than RECALL_PLATEAU from
    a doubling while short of the target: then the codes, not the lists scanned, limit recall, and
    scanning every list of a large index (hours at 1B) would only confirm it.
    """
    nlist = faiss_nlist(index)
    tried: list[dict] = []

    def cost(setting: dict) -> float:
        return search_cost(index, setting["nprobe"], setting["rerank_factor"], top_k)

    nprobe, deepest = 1, None
    while True:
        probe = min(nprobe, nlist)
        index.set_nprobe(probe)
        found = [{"nprobe": probe, "rerank_factor": factor, "recall_at_10": round(float(shares.mean()), 4),
                  "recall_lower_bound": round(recall_lower_bound(shares), 4)}
                 for factor, shares in _recall_by_depth(index, queries, exact_rows, top_k)]
        tried += found
        cheapest = min((cost(setting) for setting in tried if setting["recall_lower_bound"] >= target), default=math.inf)
        following = {**found[0], "nprobe": min(2 * probe, nlist)}
        stalled = deepest is not None and found[-1]["recall_at_10"] - deepest < RECALL_PLATEAU
        if probe >= nlist or cost(following) >= cheapest or (stalled and cheapest == math.inf):
            break
        nprobe, deepest = 2 * probe, found[-1]["recall_at_10"]
    reaching = [setting for setting in tried if setting["recall_lower_bound"] >= target]
    best = min(reaching, key=cost) if reaching else max(tried, key=lambda setting: (setting["recall_at_10"], -cost(setting)))
    index.set_nprobe(best["nprobe"], best["rerank_factor"])
    return tried


def faiss_nlist(index: FaissIndex) -> int:
    import faiss

    return int(faiss.extract_index_ivf(index.index).nlist)


def record_recall(built: FaissIndex, image_rows: Queries | None, text: Queries | None,
                  exact: dict[str, np.ndarray], options: BuildOptions) -> None:
    """Tune the index on text queries (image rows when there are none) and record both recalls in its info.

    `exact` holds each query set's exact top rows ("image", "text"). A fixed `options.nprobe` is kept.
    """
    info, target, text_note = built.info, options.target_recall, options.text_note
    info["target_recall"] = target
    if built.kind == "flat":  # exact search
        info.update(recall_at_10=1.0, text_recall_at_10=1.0, image_recall_at_10=1.0, recall_queries="exact search")
        return
    if text is None and text_note:
        info["text_recall_note"] = text_note
    sets = {name: queries for name, queries in (("text", text), ("image", image_rows)) if queries is not None}
    if not sets:
        return
    tuned_on = next(iter(sets))
    if built.kind in IVF_KINDS and options.nprobe is None:
        info["tuning"] = tune_search(built, sets[tuned_on], exact[tuned_on], target)
    for name, queries in sets.items():
        found = built.search(queries.vectors, TOP_K + queries.extra)[1]
        shares = query_recalls(found, exact[name], queries.own_rows)
        info[f"{name}_recall_at_10"] = round(float(shares.mean()), 4)
        info[f"{name}_queries"] = queries.description
        if name == tuned_on:
            info["recall_lower_bound"] = round(recall_lower_bound(shares), 4)
    info["tuned_on"] = "text queries" if tuned_on == "text" else "image rows"
    info["recall_at_10"], info["recall_queries"] = info[f"{tuned_on}_recall_at_10"], sets[tuned_on].description


def _query_sets(embeddings, held_out_rows: np.ndarray, text: Queries | None) -> tuple[Queries | None, np.ndarray | None]:
    """The held-out image rows as queries, and every query vector stacked (image rows first) for one truth scan."""
    image_rows = None
    if len(held_out_rows):
        image_rows = Queries(_as_float32(_take(embeddings, held_out_rows)), f"{len(held_out_rows)} held-out rows", held_out_rows)
    stacked = [queries.vectors for queries in (image_rows, text) if queries is not None]
    return image_rows, (np.ascontiguousarray(np.concatenate(stacked), dtype=np.float32) if stacked else None)


def _split_truth(truth_rows: np.ndarray | None, image_rows: Queries | None) -> dict[str, np.ndarray]:
    if truth_rows is None:
        return {}
    split = len(image_rows.vectors) if image_rows is not None else 0
    return {"image": truth_rows[:split], "text": truth_rows[split:, :TOP_K]}


def _params(plan: Plan, nprobe: int | None, ef_search: int, train_rows: int, reranks: bool) -> dict:
    if plan.kind == "hnsw":
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": ef_search}
    if plan.kind not in IVF_KINDS:
        return {}
    params = {"nlist": plan.nlist, "nprobe": nprobe or 1, "train_rows": train_rows}
    if plan.nlist >= HNSW_QUANTIZER_FROM:
        params["quantizer_ef_search"] = HNSW_EF_SEARCH
    if plan.kind in RERANKING_KINDS:
        params.update(pq_m=plan.pq_m, rerank_factor=RERANK_FACTOR if reranks else 0)
    return params


@dataclass(frozen=True)
class BuildOptions:
    """What a build is asked for, in memory or in parts: layout, budget, and the queries recall is measured on.

    `max_memory`: bytes the index (and each build process) may take. `recall_queries` rows held out
    of training measure recall@10 on image queries (each excluding itself). `queries` [n, dim] are
    the text queries search will get (encoded captions), described by `queries_description`: an
    IVF index without a fixed `nprobe` is tuned on them (else on the held-out rows) to the cheapest
    nprobe and re-rank depth that reach `target_recall`, since captions lie in another cone than
    images and need a larger nprobe (benchmarks/bench_index.py). `text_note` records why there were
    no text queries. `rerank_rows(row_ids) -> vectors` lets IVF-PQ re-score its candidates exactly.
    """

    max_memory: int | None = None
    kind: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    ef_search: int = HNSW_EF_SEARCH
    rerank_rows: Callable[[np.ndarray], np.ndarray] | None = None
    recall_queries: int = RECALL_QUERIES
    target_recall: float = TARGET_RECALL
    queries: np.ndarray | None = None
    queries_description: str | None = None
    text_note: str | None = None
    seed: int = 0


def _new_built(options: BuildOptions, plan: Plan, count: int, dim: int, order_fingerprint: str, index,
               train_rows: int) -> FaissIndex:
    info = {
        "kind": plan.kind,
        "factory": plan.factory,
        "params": _params(plan, options.nprobe, options.ef_search, train_rows, options.rerank_rows is not None),
        "count": count,
        "dim": dim,
        "metric": "inner_product",
        "max_memory": options.max_memory,
        "estimated_bytes": plan.estimated_bytes,
        "order_fingerprint": order_fingerprint,
    }
    return FaissIndex(index, info, options.rerank_rows if plan.kind in RERANKING_KINDS else None)


def build_index(embeddings, order_fingerprint: str, **options) -> FaissIndex:
    """Build an inner-product index in memory over unit-length rows [count, dim] (a tensor or memory-mapped array).

    `options` are BuildOptions' fields. The layout is the most accurate that fits `max_memory`;
    recall on text queries and on held-out image rows goes to the index's info.
    """
    started = time.perf_counter()
    options = BuildOptions(**options)
    count, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    if count == 0:
        raise ValueError("cannot index an empty collection")
    plan = plan_index(count, dim, options.max_memory, options.kind, options.nlist, reranks=options.rerank_rows is not None)
    held = min(options.recall_queries, count) if plan.kind != "flat" else 0  # an exact scan needs no measuring
    memory = build_memory(plan, count, dim, options.max_memory, held)
    held_out_rows, train_rows = sample_rows(count, held, memory.train_rows, options.seed)
    index = train_index(embeddings, plan, train_rows)
    text = _text_queries(options) if plan.kind != "flat" else None
    image_rows, stacked = _query_sets(embeddings, held_out_rows, text)
    truth = add_rows(index, embeddings, 0, count, memory.chunk_rows, stacked, min(TOP_K + 1, count))
    built = _new_built(options, plan, count, dim, order_fingerprint, index, len(train_rows))
    record_recall(built, image_rows, text, _split_truth(truth[1] if truth else None, image_rows), options)
    built.info["build_seconds"] = round(time.perf_counter() - started, 2)
    return built


def _text_queries(options: BuildOptions) -> Queries | None:
    if options.queries is None or len(options.queries) == 0:
        return None
    vectors = np.array(options.queries, dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return Queries(vectors, options.queries_description or f"{len(vectors)} given queries")


# ---------------------------------------------------------------------------------------------
# Built in parts: train once, add slices of rows in parallel ranks, merge into on-disk lists
# ---------------------------------------------------------------------------------------------


def generic_captions(count: int, seed: int = 0) -> list[str]:
    """Up to `count` of the shipped everyday-photo captions (a random choice, fixed by `seed`), for
    tuning an index on text queries when the collection has no captions of its own."""
    captions = [line.strip() for line in GENERIC_CAPTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if count >= len(captions):
        return captions if count > 0 else []
    chosen = np.random.default_rng(seed).choice(len(captions), size=count, replace=False)
    return [captions[position] for position in sorted(chosen.tolist())]


def parts_folder(index_path: str | os.PathLike) -> Path:
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + PARTS_SUFFIX)


def rank_slice(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, end) of one rank: contiguous, every row on exactly one rank."""
    return rank * count // world_size, (rank + 1) * count // world_size


def wait_for(ready: Callable[[], bool], what: str, timeout: float) -> None:
    deadline, said = time.monotonic() + timeout, False
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout / 3600:.1f} h for {what}; is that rank still running?")
        if not said:
            logger.info("waiting for %s", what)
            said = True
        time.sleep(POLL_SECONDS)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda stream: np.savez(stream, **arrays))


def _write_index_file(index, path: Path, size_hint: int | None = None) -> None:
    """faiss.write_index through durable.atomic_write: readers see the old file or the whole new one."""
    import faiss

    def write(stream) -> None:
        writer = faiss.PyCallbackIOWriter(stream.write)
        faiss.write_index(index, writer)
        del writer  # flushes faiss's buffer into the stream

    atomic_write(path, write, size_hint=size_hint)


def merge_parts(trained_path: str | os.PathLike, part_paths: list[Path], lists_path: str | os.PathLike):
    """The trained index with every part's lists merged into one on-disk lists file (`lists_path`).

    Parts are mapped, not read, and the merged lists are written through a mapping: memory stays
    at the centroids and codebooks whatever the collection's size.
    """
    import faiss

    index = faiss.read_index(str(trained_path))
    ivf = faiss.extract_index_ivf(index)
    parts = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) for path in part_paths]
    lists = faiss.InvertedListsPtrVector()
    for part in parts:
        lists.push_back(faiss.extract_index_ivf(part).invlists)
    with _faiss_quiet():
        on_disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_path))
        total = on_disk.merge_from_multiple(lists.data(), lists.size(), False)  # ids are row numbers already
    ivf.replace_invlists(on_disk, True)
    on_disk.this.disown()  # the index frees it
    index.ntotal = ivf.ntotal = total
    del parts  # their mapped lists were copied
    return index


def _merge_truth(parts: list[tuple[np.ndarray, np.ndarray]], top_k: int) -> np.ndarray:
    import faiss

    heap = faiss.ResultHeap(len(parts[0][0]), top_k, keep_max=True)
    for scores, rows in parts:
        heap.add_result(np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64))
    heap.finalize()
    return heap.I


def build_index_in_parts(embeddings, order_fingerprint: str, index_path: str | os.PathLike, rank: int = 0,
                         world_size: int = 1, wait_seconds: float = WAIT_SECONDS, **options) -> FaissIndex | None:
    """Build an IVF index without holding the collection or the whole index, one rank of `world_size`.

    Rank 0 trains the centroids and codebooks on a sample; each rank adds its contiguous slice of
    rows, writing its lists out as parts whenever they fill what `max_memory` leaves, and scans the
    same rows for the recall queries' exact neighbours; rank 0 then merges all parts into on-disk
    inverted lists (`<index>.<token>.ivfdata`, mapped when searched), tunes and measures recall as
    `build_index` does, saves the index at `index_path` and returns it. Other ranks return None.
    Ranks meet through files in `<index_path>.parts/` (a folder every rank sees); a rerun after a
    kill reuses the training and every finished rank's parts.
    """
    started = time.perf_counter()
    options = BuildOptions(**options)
    index_path = Path(index_path)
    count, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    if count == 0:
        raise ValueError("cannot index an empty collection")
    plan = plan_index(count, dim, options.max_memory, options.kind, options.nlist, ivf_only=True)
    held = min(options.recall_queries, count)
    memory = build_memory(plan, count, dim, options.max_memory, held, in_parts=True)
    folder = parts_folder(index_path)
    folder.mkdir(parents=True, exist_ok=True)
    identity = _digest(order_fingerprint, plan.factory, count, held, memory.train_rows, world_size, options.seed)
    trained_path, queries_path, trained_record = folder / "trained.faiss", folder / "queries.npz", folder / "trained.json"
    text = _text_queries(options) if rank == 0 else None
    phases: dict = {}  # seconds of each step, for the record (and for sizing larger builds)

    def trained() -> dict | None:
        record = read_json(trained_record)
        return record if record is not None and record.get("identity") == identity else None

    if rank == 0:
        held_out_rows, train_rows = sample_rows(count, held, memory.train_rows, options.seed)
        image_rows, stacked = _query_sets(embeddings, held_out_rows, text)
        stacked = np.zeros((0, dim), np.float32) if stacked is None else stacked
        queries_digest = hashlib.sha256(stacked.tobytes()).hexdigest()[:16]
        record = trained()
        if record is None:
            for stale in folder.iterdir():  # another run's parts (other rows, layout or ranks)
                stale.unlink()
            training_started = time.perf_counter()
            with _all_cores():
                _write_index_file(train_index(embeddings, plan, train_rows), trained_path)
            phases["train"] = round(time.perf_counter() - training_started, 1)
        if record is None or record.get("queries") != queries_digest:
            _save_arrays(queries_path, queries=stacked)
            write_json(trained_record, {"identity": identity, "queries": queries_digest, "train_rows": len(train_rows)})
    else:
        wait_for(lambda: trained() is not None, f"rank 0 to train the index ({trained_record})", wait_seconds)
    record = trained()
    rank_record = folder / f"rank-{rank}.json"
    done = read_json(rank_record)
    if done is None or done.get("identity") != identity or done.get("queries") != record["queries"]:
        _add_part(embeddings, trained_path, queries_path, folder, rank, world_size, memory, record, identity)
    if rank != 0:
        return None

    ranks = [folder / f"rank-{other}.json" for other in range(world_size)]
    wait_for(lambda: all((read_json(path) or {}).get("identity") == identity for path in ranks),
              f"every rank's parts in {folder}", wait_seconds)
    records = [read_json(path) for path in ranks]
    with _all_cores():  # the other ranks are done
        phases["add_by_rank"] = [done.get("add_seconds") for done in records]
        merge_started = time.perf_counter()
        lists_name = f"{index_path.stem}.{os.urandom(4).hex()}{IVFDATA_SUFFIX}"
        serving = (read_json(info_path_of(index_path)) or {}).get("ivfdata")  # the index search may have open now
        for orphan in index_path.parent.glob(f"{index_path.stem}.*{IVFDATA_SUFFIX}"):  # merges a kill interrupted
            if orphan.name != serving:
                orphan.unlink()
        merged = merge_parts(trained_path, [folder / name for rank_done in records for name in rank_done["parts"]],
                             index_path.parent / lists_name)
        truth_parts = []
        for other, rank_done in enumerate(records if len(stacked) else []):
            if rank_done.get("queries") == record["queries"]:  # its truth is for these queries
                with np.load(folder / f"truth-{other}.npz") as truth:
                    truth_parts.append((truth["scores"], truth["rows"]))
            else:  # finished in an earlier run for other queries: scan its rows here
                start, end = rank_slice(count, other, world_size)
                truth_parts.append(add_rows(None, embeddings, start, end, memory.chunk_rows, stacked, min(TOP_K + 1, count)))
        truth_rows = _merge_truth(truth_parts, min(TOP_K + 1, count)) if len(stacked) else None
        phases["merge"] = round(time.perf_counter() - merge_started, 1)
        recall_started = time.perf_counter()
        built = _new_built(options, plan, count, dim, order_fingerprint, merged, int(record["train_rows"]))
        built.info.update(ivfdata=lists_name,
                          built_in_parts={"ranks": world_size, "parts": sum(len(done["parts"]) for done in records)})
        record_recall(built, image_rows, text, _split_truth(truth_rows, image_rows), options)
        phases["recall"] = round(time.perf_counter() - recall_started, 1)
        built.info.update(phase_seconds=phases, build_seconds=round(time.perf_counter() - started, 2))
        built.save(index_path)
        shutil.rmtree(folder)
        return built


@contextlib.contextmanager
def _all_cores():
    """faiss on every core this process may use, whatever share it had for adding: the other ranks wait
    for what runs inside (rank 0's training and merge), so their cores are idle."""
    import faiss

    threads = faiss.omp_get_max_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    faiss.omp_set_num_threads(max(threads, usable))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _add_part(embeddings, trained_path: Path, queries_path: Path, folder: Path, rank: int, world_size: int,
              memory: BuildMemory, record: dict, identity: str) -> None:
    """Add this rank's rows to copies of the trained index, writing each as a part once its lists fill one."""
    import faiss

    started = time.perf_counter()
    index = faiss.read_index(str(trained_path))
    ivf = faiss.extract_index_ivf(index)
    with np.load(queries_path) as saved:
        stacked = saved["queries"]
    parts: list[str] = []

    def write_part(index, last: bool = False) -> None:
        if index.ntotal and (last or index.ntotal * (ivf.code_size + ID_BYTES) >= memory.part_bytes):
            name = f"part-{rank}-{len(parts):04d}.faiss"
            _write_index_file(index, folder / name)
            parts.append(name)
            index.reset()

    start, end = rank_slice(int(embeddings.shape[0]), rank, world_size)
    truth = add_rows(index, embeddings, start, end, memory.chunk_rows, stacked if len(stacked) else None,
                     min(TOP_K + 1, int(embeddings.shape[0])), flush=write_part)
    write_part(index, last=True)
    if truth is not None:
        _save_arrays(folder / f"truth-{rank}.npz", scores=truth[0], rows=truth[1])
    write_json(folder / f"rank-{rank}.json",
               {"identity": identity, "queries": record["queries"], "rows": [start, end], "parts": parts,
                "add_seconds": round(time.perf_counter() - started, 1)})
