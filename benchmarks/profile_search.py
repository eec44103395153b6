"""Where exact search over 1M x 512 spends its time: the ways to score and reduce a query batch, timed side by side.

    .venv/bin/python benchmarks/profile_search.py            # prints Markdown tables

The companion of bench_search.py: that one times our Searcher against faiss and the machine's
bound; this one times the building blocks the Searcher chose between (ATen, MKL and OpenBLAS
kernels on row- and column-major copies, fp32 panels and fp16 rows with our native kernels and
without, two ways to take a top-k), and the old search's two steps alone and together, so the
choice in clipsearch/search.py can be rechecked on another machine. Best and median of N calls, in ms.
"""
from __future__ import annotations

import argparse
import statistics
import time

import common
import numpy as np
import torch
import torch.nn.functional as F
from bench_search import add_collection_flags

from clipsearch import score_kernels
from clipsearch.score_kernels import NativeScorer
from clipsearch.search import TOP_K_GROUP, Searcher, _RunningTopK

TOP_K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_collection_flags(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per operation")
    parser.add_argument("--settle_s", type=float, default=0.3,
                        help="untimed pause before each call, so no library's threads still spin from the call before")
    return parser.parse_args(argv)


def widened_slabs(halves: torch.Tensor, queries: torch.Tensor, slab_rows: int = 4096):
    """fp16 rows widened to fp32 a slab at a time, multiplied by MKL into [rows, queries]."""
    slab, out = torch.empty(slab_rows, halves.shape[1]), torch.empty(halves.shape[0], queries.shape[0])

    def run() -> None:
        for start in range(0, halves.shape[0], slab_rows):
            rows = halves[start : start + slab_rows]
            slab[: rows.shape[0]].copy_(rows)
            torch.mm(slab[: rows.shape[0]], queries.T, out=out[start : start + rows.shape[0]])

    return run


def native_one_query(halves: torch.Tensor, query: torch.Tensor):
    """The native fp16 kernel's scan (score_kernels), or None where it cannot be built."""
    scorer, out = NativeScorer.create(query, halves), np.empty((halves.shape[0], 1), dtype=np.float32)
    return None if scorer is None else (lambda: scorer(0, halves.shape[0], out))


def columns_by_queries(columns: np.ndarray, queries: np.ndarray, block_rows: int = 65536):
    """OpenBLAS's product written queries x rows, a reused 16 MB block at a time (the fp32 Searcher
    before it stored panels)."""
    out = np.empty((queries.shape[0], block_rows), dtype=np.float32)

    def run() -> None:
        for start in range(0, columns.shape[1], block_rows):
            block = columns[:, start : start + block_rows]
            np.matmul(queries, block, out=out[:, : block.shape[1]])

    return run


def columns_by_rows(columns: np.ndarray, queries: np.ndarray, block_rows: int = 65536):
    """OpenBLAS's product written rows x queries, a reused 16 MB block at a time (the Searcher before issue 32's fix)."""
    out = np.empty((block_rows, queries.shape[0]), dtype=np.float32)

    def run() -> None:
        for start in range(0, columns.shape[1], block_rows):
            block = columns[:, start : start + block_rows]
            np.matmul(block.T, queries.T, out=out[: block.shape[1]])

    return run


def paired_native_ab(searcher: Searcher, storage: str, batch: torch.Tensor, repeats: int, settle_s: float) -> None:
    """A Searcher's batch path with the native kernels and without (as where they cannot be
    built), alternating call by call, so each pair shares the machine's minute: medians and the
    median of the pairs' ratios."""
    if score_kernels.load() is None:
        print("\n(the native kernels cannot be built here: no A/B)")
        return
    built = score_kernels.load

    def timed(native: bool, run) -> float:
        score_kernels.load = built if native else (lambda: None)
        try:
            time.sleep(settle_s)
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1000
        finally:
            score_kernels.load = built

    steps = {"scoring pass": lambda: [None for _ in searcher.score_blocks(batch)],
             "exact top-k": lambda: searcher.exact_top_k(batch, TOP_K)}
    print(f"\n**{batch.shape[0]} queries, {storage}: the Searcher with and without the native kernels**, "
          f"{repeats} alternating pairs\n")
    print("| step | native: median ms | torch: median ms | torch / native, median of pairs |")
    print("|---|---:|---:|---:|")
    for name, run in steps.items():
        pairs = [(timed(True, run), timed(False, run)) for _ in range(repeats)]
        natives, torches = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        ratio = statistics.median(torch_ms / native_ms for native_ms, torch_ms in pairs)
        print(f"| {name} | {statistics.median(natives):.1f} | {statistics.median(torches):.1f} | {ratio:.2f} |")


def block_top_k(scores: np.ndarray):
    """The Searcher's reduction: group maxima, then only the best groups' rows, on one thread."""
    def run() -> None:
        best = _RunningTopK(TOP_K, scores.shape[1])
        block_rows = max(1, 16 * 2**20 // (4 * scores.shape[1]))
        for start in range(0, scores.shape[0], block_rows):
            best.add(scores[start : start + block_rows], start)
        best.result()

    return run


def print_table(title: str, contenders: dict, repeats: int, gigabytes: float | None, settle_s: float) -> None:
    print(f"\n{title}\n")
    print("| operation | best ms | median ms |" + (" GB/s of the matrix |" if gigabytes else ""))
    print("|---|---:|---:|" + ("---:|" if gigabytes else ""))
    for name, times in common.interleaved_ms(contenders, repeats, warmup=1, settle_s=settle_s).items():
        best = min(times)
        rate = f" {gigabytes / (best / 1000):.1f} |" if gigabytes else ""
        print(f"| {name} | {best:.1f} | {common.median(times):.1f} |{rate}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=-1)
    paths = [str(row) for row in range(args.rows)]
    searcher = Searcher(paths, rows, assume_normalised=True)  # fp32: 16-row panels
    columns = rows.T.contiguous()  # [dim, count]: the fp32 Searcher's layout before the panels
    halves = rows.half()
    half_searcher = Searcher(paths, halves, assume_normalised=True)
    query = F.normalize(torch.randn(1, args.dim, generator=generator), dim=-1)
    batch = F.normalize(torch.randn(args.batch_queries, args.dim, generator=generator), dim=-1)
    columns_np, query_np, batch_np = columns.numpy(), query.numpy(), batch.numpy()
    one_scores, batch_scores = torch.from_numpy(query_np @ columns_np), torch.from_numpy(batch_np @ columns_np)
    batch_scores_by_row = np.ascontiguousarray(batch_scores.numpy().T)
    gigabytes = rows.numel() * 4 / 1e9
    load_start = common.load_average()
    print(f"{args.rows:,} x {args.dim} ({gigabytes:.2f} GB fp32), {torch.get_num_threads()} torch threads")

    print_table("One query, fp32 (GB/s of the fp32 matrix)", {
        "`rows.sum()`: a plain read (ATen)": lambda: rows.sum(),
        "`torch.mv(rows, q)`, row-major (MKL)": lambda: torch.mv(rows, query[0]),
        "`q @ columns`, column-major (MKL)": lambda: query @ columns,
        "`q @ columns` in numpy (OpenBLAS): the Searcher before the panels": lambda: query_np[0] @ columns_np,
        "16-row panels, the native kernel (score_kernels): what the Searcher runs":
            lambda: [None for _ in searcher.score_blocks(query)],
    }, args.repeats, gigabytes, args.settle_s)
    native = native_one_query(halves, query)
    print_table("One query, fp16 (GB/s of the fp16 matrix)", {
        "`halves.sum()`: a plain read (ATen)": lambda: halves.sum(),
        **({"the native kernel (F16C, score_kernels): what the Searcher runs": native} if native else {}),
        "`torch.mv(halves, q)` (ATen's fp16 kernel): the Searcher without the native kernels":
            lambda: torch.mv(halves, query[0].half()),
        "slabs widened to fp32, then MKL": widened_slabs(halves, query),
    }, args.repeats, gigabytes / 2, args.settle_s)
    print_table(f"Top-{TOP_K} of 1 and {args.batch_queries} queries' scores over the collection", {
        "1 query: `topk` (torch)": lambda: one_scores.topk(TOP_K),
        "1 query: group maxima, then the best groups (numpy): what the Searcher runs":
            block_top_k(np.ascontiguousarray(one_scores.numpy().T)),
        f"{args.batch_queries} queries: `topk` (torch, two threads)": lambda: batch_scores.topk(TOP_K, dim=1),
        f"{args.batch_queries} queries: group maxima, then the best groups (numpy, one thread): what the Searcher runs":
            block_top_k(batch_scores_by_row),
    }, args.repeats, None, args.settle_s)
    old_search = lambda: torch.from_numpy(batch_np @ columns_np).topk(TOP_K, dim=1)  # noqa: E731
    print_table(f"{args.batch_queries} queries: products, and the old search's two steps together", {
        "`Q @ columns` in numpy (OpenBLAS), whole [q, count] result": lambda: batch_np @ columns_np,
        "`Q @ columns` in numpy, blocks of [q, 16 MB of scores]: the Searcher before the panels":
            columns_by_queries(columns_np, batch_np),
        "16-row panels, the native kernel in blocks, with group maxima: what the Searcher runs":
            lambda: [None for _ in searcher.score_blocks(batch)],
        "`columns.T @ Q.T` in numpy, blocks of [16 MB of scores, q]":
            columns_by_rows(columns_np, batch_np),
        "`rows @ Q.T` (MKL), whole": lambda: rows @ batch.T,
        "fp16: the native kernel in blocks, with group maxima: what the Searcher runs":
            lambda: [None for _ in half_searcher.score_blocks(batch)],
        "fp16: slabs widened to fp32, then MKL: the Searcher without the native kernels": widened_slabs(halves, batch),
        "the old search: numpy's whole product, then torch's top-k over it": old_search,
        "torch's top-k alone over the same scores": lambda: batch_scores.topk(TOP_K, dim=1),
        "the Searcher: blocks of scores, each reduced on one thread": lambda: searcher.exact_top_k(batch, TOP_K),
        "the Searcher, fp16: the native kernel's blocks and group maxima, reduced on one thread":
            lambda: half_searcher.exact_top_k(batch, TOP_K),
    }, args.repeats, None, args.settle_s)
    for storage, paired in (("fp32", searcher), ("fp16", half_searcher)):
        paired_native_ab(paired, storage, batch, max(args.repeats, 9), args.settle_s)
    print(f"\nTOP_K_GROUP = {TOP_K_GROUP}; load average at start {load_start}, at end {common.load_average()}")


if __name__ == "__main__":
    main()
