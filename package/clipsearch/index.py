"""faiss index over an embedding folder, chosen to fit a memory budget, with its recall measured at build time."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipsearch.durable import atomic_write, write_json
from clipsearch.errors import UserError

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
KINDS = ("auto", "flat", "ivf", "ivf_sq8", "ivf_pq", "hnsw")
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
# vector then costs a graph walk instead of a scan of every centroid.
HNSW_QUANTIZER_FROM = 16_384
ADD_ROWS = 65_536
# Bytes per vector that faiss's inverted lists add to each code: the 64-bit row id.
ID_BYTES = 8
# Leave this share of the budget for what the estimate leaves out (allocator slack, list headroom).
BUDGET_MARGIN = 0.9
# PQ codes keep too little to rank the true top 10 first; re-scoring this many candidates per
# wanted result exactly, from the memory-mapped fp16 store, recovers the order (measured in
# benchmarks/bench_index.py). Rows touched per query: top_k * RERANK_FACTOR.
RERANK_FACTOR = 10
TARGET_RECALL = 0.95
RECALL_QUERIES = 500
TOP_K = 10


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
        codes = {"ivf": "Flat", "ivf_sq8": "SQ8", "ivf_pq": f"PQ{self.pq_m}"}[self.kind]
        return f"{quantizer},{codes}"


def estimate_bytes(kind: str, count: int, dim: int, nlist: int = 0, pq_m: int = 0) -> int:
    """Resident size of an index: codes and ids per vector, plus centroids and codebooks."""
    if kind == "flat":
        return count * dim * 4
    if kind == "hnsw":
        return count * (dim * 4 + HNSW_M * 2 * 4)  # vectors and about 2M neighbour links of 4 bytes
    code_bytes = {"ivf": dim * 4, "ivf_sq8": dim, "ivf_pq": pq_m}[kind]
    centroids = nlist * dim * 4 + (nlist * HNSW_M * 2 * 4 if nlist >= HNSW_QUANTIZER_FROM else 0)
    codebooks = {"ivf": 0, "ivf_sq8": dim * 2 * 4, "ivf_pq": 256 * dim * 4}[kind]
    return count * (code_bytes + ID_BYTES) + centroids + codebooks


def plan_index(count: int, dim: int, max_memory: int | None = None, kind: str = "auto", nlist: int | None = None) -> Plan:
    """The most accurate layout that fits `max_memory` bytes.

    In order of preference: flat (small collections), IVF with full vectors, IVF with 8-bit scalar
    codes (d bytes a vector, recall within a point of full vectors), then IVF-PQ with the most
    sub-quantizers that fit (d/2 ... 8 bytes a vector; its ranking is repaired by the exact re-rank).
    """
    budget = math.inf if max_memory is None else max_memory * BUDGET_MARGIN
    lists = min(nlist or default_nlist(count), count)
    pq_choices = [m for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32, 8) if m >= 1 and dim % m == 0]
    if kind == "auto":
        candidates = [Plan("flat", estimated_bytes=estimate_bytes("flat", count, dim))] if count < FLAT_BELOW else []
        candidates += [Plan(name, lists, 0, estimate_bytes(name, count, dim, lists)) for name in ("ivf", "ivf_sq8")]
        candidates += [Plan("ivf_pq", lists, m, estimate_bytes("ivf_pq", count, dim, lists, m)) for m in pq_choices]
    elif kind == "ivf_pq":
        candidates = [Plan("ivf_pq", lists, m, estimate_bytes("ivf_pq", count, dim, lists, m)) for m in pq_choices]
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

    def set_nprobe(self, nprobe: int) -> None:
        self.info["params"]["nprobe"] = int(nprobe)
        self.configure()

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product scores and row ids, best first; rows faiss could not fill are -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "hnsw":
            # HNSW needs at least top_k candidates in its beam to return top_k results.
            self.index.hnsw.efSearch = max(int(self.info["params"]["ef_search"]), int(top_k))
        if not self.reranks:
            return self.index.search(queries, int(top_k))
        _, candidates = self.index.search(queries, int(top_k) * int(self.info["params"]["rerank_factor"]))
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

    def save(self, index_path: str | os.PathLike) -> Path:
        """Write the index, then its record; the record's byte count ties the pair together.

        Each file is replaced atomically, but not both at once: a build stopped between the two
        leaves an index whose record describes another, which `load_index` refuses by its size.
        """
        import faiss

        index_path = Path(index_path)

        def write(stream):
            writer = faiss.PyCallbackIOWriter(stream.write)
            faiss.write_index(self.index, writer)
            del writer  # flushes faiss's buffer into the stream

        atomic_write(index_path, write, size_hint=self.info.get("estimated_bytes"))
        self.info["index_bytes"] = index_path.stat().st_size
        write_json(info_path_of(index_path), self.info)
        return index_path


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


def read_faiss_index(index_path: str | os.PathLike, mmap: bool = True):
    """(index, memory_mapped): IVF lists and flat codes are mapped from disk where faiss can, else read."""
    import faiss

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
    if info.get("index_bytes") not in (None, index_path.stat().st_size):
        raise IndexMismatchError(
            f"{index_path} ({index_path.stat().st_size:,} bytes) is not the index {info_path.name} describes "
            f"({info['index_bytes']:,} bytes): a build stopped between writing the two; rebuild it with "
            f"python -m clipsearch.index --emb_path {index_path.parent}"
        )
    if nprobe is not None:
        info["params"]["nprobe"] = int(nprobe)
    index, mapped = read_faiss_index(index_path, mmap)
    info["memory_mapped"] = mapped
    rerank_rows = None
    if info["params"].get("rerank_factor"):
        from clipsearch.mmap_store import open_store

        store = open_store(index_path.parent)
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
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_m, 8, metric)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index frees its quantizer
    index.cp.niter = KMEANS_ITERATIONS
    return index


def exact_neighbours(embeddings, queries: np.ndarray, top_k: int, rows_per_chunk: int = ADD_ROWS) -> np.ndarray:
    """Row ids of the exact top-k by inner product, scanning `embeddings` (any dtype, memory-mapped) in chunks."""
    import faiss

    heap = faiss.ResultHeap(queries.shape[0], top_k, keep_max=True)
    for start in range(0, embeddings.shape[0], rows_per_chunk):
        scores, rows = faiss.knn(queries, _as_float32(embeddings[start : start + rows_per_chunk]), top_k, faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + start, -1))
    heap.finalize()
    return heap.I


def held_out_recall(
    index: FaissIndex, queries: np.ndarray, exact_rows: np.ndarray, query_rows: np.ndarray | None = None, top_k: int = TOP_K
) -> float:
    """Recall@k of the index against exact search; a query that is a collection row is not its own neighbour."""
    extra = 1 if query_rows is not None else 0
    _, found_rows = index.search(queries, top_k + extra)
    found = 0
    for position, (exact, approximate) in enumerate(zip(exact_rows, found_rows)):
        own = query_rows[position] if query_rows is not None else -2
        exact_set = [row for row in exact.tolist() if row != own][:top_k]
        approximate_set = {row for row in approximate.tolist() if row != own and row >= 0}
        found += len(set(exact_set) & approximate_set)
    return found / (len(queries) * top_k)


def tune_nprobe(index: FaissIndex, queries, exact_rows, query_rows=None, target: float = TARGET_RECALL) -> dict[int, float]:
    """Smallest nprobe (powers of two) whose held-out recall@10 reaches `target`; leaves the index set to it."""
    nlist = faiss_nlist(index)
    curve: dict[int, float] = {}
    nprobe = 1
    while True:
        index.set_nprobe(min(nprobe, nlist))
        curve[min(nprobe, nlist)] = round(held_out_recall(index, queries, exact_rows, query_rows), 4)
        if curve[min(nprobe, nlist)] >= target or nprobe >= nlist:
            return curve
        nprobe *= 2


def faiss_nlist(index: FaissIndex) -> int:
    import faiss

    return int(faiss.extract_index_ivf(index.index).nlist)


def build_index(
    embeddings,
    order_fingerprint: str,
    max_memory: int | None = None,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    ef_search: int = HNSW_EF_SEARCH,
    rerank_rows: Callable[[np.ndarray], np.ndarray] | None = None,
    recall_queries: int = RECALL_QUERIES,
    target_recall: float = TARGET_RECALL,
    queries: np.ndarray | None = None,
    seed: int = 0,
) -> FaissIndex:
    """Build an inner-product index over unit-length rows [count, dim] (a tensor or memory-mapped array).

    The layout is the most accurate that fits `max_memory` bytes. `recall_queries` rows held out of
    training serve as queries: recall@10 against exact search is measured on them (each query
    excluding itself), and an IVF index without a given `nprobe` takes the smallest that reaches
    `target_recall`. `queries` [n, dim], when given, replace the held-out rows: queries of the kind
    search will get (caption embeddings lie farther from the images than images from each other, and
    need a larger nprobe; measured in benchmarks/bench_index.py). `rerank_rows(row_ids) -> vectors`
    lets an IVF-PQ index re-score its candidates exactly.
    """
    started = time.perf_counter()
    count, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    if count == 0:
        raise ValueError("cannot index an empty collection")
    plan = plan_index(count, dim, max_memory, kind, nlist)
    index = _new_index(plan, dim)
    generator = np.random.default_rng(seed)
    shuffled = generator.permutation(count)
    query_rows = np.sort(shuffled[: 0 if queries is not None else min(recall_queries, count)])
    params: dict = {}
    if plan.kind.startswith("ivf"):
        train_rows = np.sort(shuffled[len(query_rows) :][: plan.nlist * TRAIN_POINTS_PER_LIST])
        if len(train_rows) < plan.nlist:  # tiny collections: train on everything
            train_rows = np.arange(count)
        index.train(_as_float32(_take(embeddings, train_rows)))
        params = {"nlist": plan.nlist, "nprobe": nprobe or 1, "train_rows": len(train_rows)}
        if plan.nlist >= HNSW_QUANTIZER_FROM:
            params["quantizer_ef_search"] = HNSW_EF_SEARCH
        if plan.kind == "ivf_pq":
            params.update(pq_m=plan.pq_m, rerank_factor=RERANK_FACTOR if rerank_rows is not None else 0)
    elif plan.kind == "hnsw":
        params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": ef_search}
    for start in range(0, count, ADD_ROWS):
        index.add(_as_float32(embeddings[start : start + ADD_ROWS]))
    info = {
        "kind": plan.kind,
        "factory": plan.factory,
        "params": params,
        "count": count,
        "dim": dim,
        "metric": "inner_product",
        "max_memory": max_memory,
        "estimated_bytes": plan.estimated_bytes,
        "order_fingerprint": order_fingerprint,
    }
    built = FaissIndex(index, info, rerank_rows if plan.kind == "ivf_pq" else None)
    if (len(query_rows) or queries is not None) and plan.kind != "flat":
        given = queries is not None
        queries = np.ascontiguousarray(queries, dtype=np.float32) if given else _as_float32(_take(embeddings, query_rows))
        own_rows = None if given else query_rows
        exact_rows = exact_neighbours(embeddings, queries, min(TOP_K + (0 if given else 1), count))
        if plan.kind.startswith("ivf") and nprobe is None:
            info["recall_by_nprobe"] = tune_nprobe(built, queries, exact_rows, own_rows, target_recall)
        info["recall_at_10"] = round(held_out_recall(built, queries, exact_rows, own_rows), 4)
        info["recall_queries"] = f"{len(queries)} given queries" if given else f"{len(queries)} held-out rows"
    elif plan.kind == "flat":
        info["recall_at_10"] = 1.0
    info["build_seconds"] = round(time.perf_counter() - started, 2)
    return built
