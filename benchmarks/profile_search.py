"""Where exact search over 1M x 512 spends its time: the ways to score a query, timed side by side.

    .venv/bin/python benchmarks/profile_search.py            # prints a Markdown table

The companion of bench_search.py: that one times our Searcher against faiss and the memory floor;
this one times the building blocks the Searcher chose between (ATen, MKL and OpenBLAS kernels on
row- and column-major copies, fp16 storage, top-k), so the choice in clipsearch/search.py can be
rechecked on another machine. Best and median of N calls, in ms.
"""
from __future__ import annotations

import argparse
import threading

import common
import torch
import torch.nn.functional as F
from bench_search import add_collection_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_collection_flags(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per operation")
    return parser.parse_args(argv)


def two_thread_halves(query: torch.Tensor, columns: torch.Tensor):
    """Each Python thread scores half the columns with one torch thread (torch releases the GIL)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    half = columns.shape[1] // 2
    results = [None, None]

    def work(part: int) -> None:
        results[part] = query @ columns[:, part * half : (part + 1) * half]

    workers = [threading.Thread(target=work, args=(part,)) for part in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    torch.set_num_threads(threads_before)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=-1)
    columns = rows.T.contiguous()
    rows_half = rows.half()
    query = F.normalize(torch.randn(1, args.dim, generator=generator), dim=-1)
    batch = F.normalize(torch.randn(args.batch_queries, args.dim, generator=generator), dim=-1)
    scores = torch.empty(1, args.rows)
    columns_np, query_np, batch_np = columns.numpy(), query.numpy(), batch.numpy()
    gigabytes = rows.numel() * 4 / 1e9

    one_query = {
        "`rows.sum()`: one read of the fp32 matrix (ATen)": lambda: rows.sum(),
        "`torch.mv(rows, q)`, row-major (MKL sgemv)": lambda: torch.mv(rows, query[0]),
        "`q @ columns`, column-major (MKL)": lambda: query @ columns,
        "`q @ columns` on two column halves, two Python threads": lambda: two_thread_halves(query, columns),
        "`q @ columns` in numpy (OpenBLAS): what the Searcher runs": lambda: query_np @ columns_np,
        "`torch.mv` on fp16 rows (ATen, half the bytes)": lambda: torch.mv(rows_half, query[0].half()),
        "`topk(10)` of 1M scores": lambda: scores.topk(10),
    }
    many_queries = {
        f"{args.batch_queries} queries: `Q @ columns` (MKL sgemm)": lambda: batch @ columns,
        f"{args.batch_queries} queries: `Q @ columns` in numpy (OpenBLAS): what the Searcher runs": lambda: batch_np @ columns_np,
        f"{args.batch_queries} queries: fp16 `Q @ rows.T` (ATen half GEMM)": lambda: batch.half() @ rows_half.T,
    }
    load_start = common.load_average()
    print(f"{args.rows:,} x {args.dim} fp32 ({gigabytes:.2f} GB), {torch.get_num_threads()} torch threads\n")
    print("| operation | best ms | median ms | GB/s of the fp32 matrix |")
    print("|---|---:|---:|---:|")
    for contenders, repeats in ((one_query, args.repeats), (many_queries, max(2, args.repeats // 2))):
        for name, times in common.interleaved_ms(contenders, repeats, warmup=1).items():
            best = min(times)
            print(f"| {name} | {best:.1f} | {common.median(times):.1f} | {gigabytes / (best / 1000):.1f} |")
    print(f"\nload average at start {load_start}, at end {common.load_average()}")


if __name__ == "__main__":
    main()
