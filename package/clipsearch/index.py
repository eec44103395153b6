"""Optional faiss index over an embedding folder: `python -m clipsearch.index --emb_path <folder>`."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clipsearch.search import Searcher
from clipsearch.store import atomic_replace, load_collection, order_fingerprint, write_json

INDEX_FILE = "index.faiss"
INFO_FILE = "index.json"
KINDS = ("auto", "flat", "ivf", "hnsw")
# Below FLAT_BELOW vectors an exact scan takes milliseconds, so an approximate index buys nothing.
# IVF's clustering scales to a few million; beyond that HNSW's graph answers without scanning lists.
FLAT_BELOW = 50_000
IVF_BELOW = 4_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
# faiss warns below 39 training points per centroid; k-means needs no more than ~256 per centroid.
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 256
ADD_ROWS = 65_536


def choose_kind(count: int) -> str:
    """flat below 50k vectors, IVF below 4M, HNSW (M=32) beyond."""
    if count < FLAT_BELOW:
        return "flat"
    if count < IVF_BELOW:
        return "ivf"
    return "hnsw"


def default_nlist(count: int) -> int:
    """About 4 * sqrt(N) lists, but never so many that a list gets too few training points."""
    return max(1, min(round(4 * math.sqrt(count)), count // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 1/16 of them, at least 8.

    On clustered data, as image collections are, this gives recall@10 >= 0.95; structureless
    data (e.g. random Gaussian vectors) needs more, which the build's recall estimate shows.
    """
    return min(nlist, max(8, nlist // 16))


class FaissIndex:
    """A faiss index with the facts needed to trust it: kind, parameters, and the row order it was built on."""

    def __init__(self, index, info: dict):
        self.index = index
        self.info = info
        self.configure()

    def configure(self) -> None:
        import faiss

        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = int(self.info["params"]["nprobe"])

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def order_fingerprint(self) -> str:
        return self.info["order_fingerprint"]

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product scores and row ids, best first; rows faiss could not fill are -1."""
        if self.kind == "hnsw":
            # HNSW needs at least top_k candidates in its beam to return top_k results.
            self.index.hnsw.efSearch = max(int(self.info["params"]["ef_search"]), int(top_k))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(top_k))

    def save(self, index_path: str | os.PathLike) -> Path:
        import faiss

        index_path = Path(index_path)
        atomic_replace(index_path, lambda temporary: faiss.write_index(self.index, str(temporary)))
        write_json(info_path_of(index_path), self.info)
        return index_path


def info_path_of(index_path: str | os.PathLike) -> Path:
    return Path(index_path).with_suffix(".json")


def resolve_index_path(index_path: str | os.PathLike) -> Path:
    """An index file, or an embedding folder holding index.faiss."""
    index_path = Path(index_path)
    return index_path / INDEX_FILE if index_path.is_dir() else index_path


def load_index(index_path: str | os.PathLike, nprobe: int | None = None) -> FaissIndex:
    import faiss

    index_path = resolve_index_path(index_path)
    info_path = info_path_of(index_path)
    if not index_path.is_file() or not info_path.is_file():
        raise FileNotFoundError(
            f"no index at {index_path} (with {info_path.name}); build one with "
            "python -m clipsearch.index --emb_path <folder>"
        )
    info = json.loads(info_path.read_text())
    if nprobe is not None:
        info["params"]["nprobe"] = int(nprobe)
    return FaissIndex(faiss.read_index(str(index_path)), info)


def _add_in_chunks(index, embeddings: torch.Tensor) -> None:
    # faiss wants float32; converting chunk by chunk avoids a second full copy of fp16 storage.
    for start in range(0, embeddings.shape[0], ADD_ROWS):
        index.add(np.ascontiguousarray(embeddings[start : start + ADD_ROWS].float().numpy()))


def build_index(
    searcher: Searcher,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = HNSW_M,
    ef_search: int = HNSW_EF_SEARCH,
    seed: int = 0,
) -> FaissIndex:
    """Build an inner-product index over a searcher's (unit-length) rows, in the searcher's row order."""
    import faiss

    count, dim = len(searcher), searcher.dim
    if count == 0:
        raise ValueError("cannot index an empty collection")
    kind = choose_kind(count) if kind == "auto" else kind
    embeddings = searcher.embeddings
    if kind == "flat":
        index, params = faiss.IndexFlatIP(dim), {}
    elif kind == "ivf":
        nlist = min(nlist or default_nlist(count), count)
        nprobe = nprobe or default_nprobe(nlist)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        generator = np.random.default_rng(seed)
        train_rows = np.sort(generator.permutation(count)[: nlist * TRAIN_POINTS_PER_LIST])
        index.train(np.ascontiguousarray(embeddings[torch.from_numpy(train_rows)].float().numpy()))
        params = {"nlist": nlist, "nprobe": nprobe}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"M": hnsw_m, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": ef_search}
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    _add_in_chunks(index, embeddings)
    info = {
        "kind": kind,
        "params": params,
        "count": count,
        "dim": dim,
        "metric": "inner_product",
        "order_fingerprint": order_fingerprint(searcher.paths, dim),
    }
    return FaissIndex(index, info)


def estimate_recall(searcher: Searcher, index: FaissIndex, top_k: int = 10, queries: int = 200, seed: int = 0) -> float:
    """Recall@k of the index against exact search, using rows of the collection as queries."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(searcher), generator=generator)[:queries]
    query_embeddings = searcher.embeddings[rows].float()
    top_k = min(top_k, len(searcher))
    _, exact_rows = searcher.exact_top_k(query_embeddings, top_k)
    _, index_rows = index.search(query_embeddings.numpy(), top_k)
    found = sum(len(set(exact.tolist()) & set(approx.tolist())) for exact, approx in zip(exact_rows, index_rows))
    return found / (len(rows) * top_k)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clipsearch.index",
        description=__doc__
        + " Writes index.faiss and index.json; search with --index_path. The rule for --kind auto: "
        f"flat below {FLAT_BELOW:,} vectors, IVF below {IVF_BELOW:,}, HNSW (M={HNSW_M}) beyond.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default="dataset/sample/emb", help="folder of embedding shards to index")
    data.add_argument("--out", default=None, help="index file to write (default: <emb_path>/index.faiss)")
    index = parser.add_argument_group("index")
    index.add_argument("--kind", default="auto", choices=KINDS, help="index type; auto picks by collection size")
    index.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about 4*sqrt(N))")
    index.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (default: nlist/16, >= 8)")
    index.add_argument("--hnsw_m", type=int, default=HNSW_M, help="HNSW neighbours per node")
    index.add_argument("--ef_search", type=int, default=HNSW_EF_SEARCH, help="HNSW search beam width")
    program = parser.add_argument_group("program")
    program.add_argument(
        "--recall_queries", type=int, default=200, help="collection rows used to estimate recall@10 (0: skip)"
    )
    args = parser.parse_args(argv)
    for name in ("nlist", "nprobe", "hnsw_m", "ef_search"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> FaissIndex:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    searcher = Searcher.from_collection(load_collection(args.emb_path))
    started = time.perf_counter()
    index = build_index(
        searcher, args.kind, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search
    )
    index.info["build_seconds"] = round(time.perf_counter() - started, 2)
    if args.recall_queries > 0 and index.kind != "flat":
        index.info["estimated_recall_at_10"] = round(estimate_recall(searcher, index, queries=args.recall_queries), 4)
    out = Path(args.out) if args.out else Path(args.emb_path) / INDEX_FILE
    index.save(out)
    print(f"wrote {index.kind} index of {index.count} vectors to {out}: {json.dumps(index.info)}")
    recall = index.info.get("estimated_recall_at_10")
    if recall is not None and recall < 0.95:
        knob = "--nprobe" if index.kind == "ivf" else "--ef_search"
        print(f"warning: estimated recall@10 is {recall:.2f}; rebuild with a larger {knob} for better results")
    return index


if __name__ == "__main__":
    main()
