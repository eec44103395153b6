"""Exact search over 1M x 512 vectors: our Searcher against faiss IndexFlatIP and the machine's memory bandwidth.

    .venv/bin/python benchmarks/bench_search.py                    # 1M x 512, index kinds on a 200k subset
    .venv/bin/python benchmarks/bench_search.py --rows 200000 --index_rows 0

One pass over the collection matrix is the floor for exact search of one query, so the run measures
how fast this machine reads memory (best of N full reads of the same matrix) and reports our latency
against that floor. faiss runs on the same data with the same thread count. The approximate indexes
of clipsearch.index are timed and scored (recall@10 against exact search) on a subset, because
building IVF and HNSW over 1M vectors takes far longer than a benchmark should on a few cores.
With --report, results go to benchmarks/results/search.json and the "Search" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import common
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# The search benchmark
# ---------------------------------------------------------------------------------------------


def add_collection_flags(group) -> None:
    """The vectors searched, shared with profile_search.py: both time the same 1M x 512 case by default."""
    group.add_argument("--rows", type=int, default=1_000_000, help="collection size for exact search")
    group.add_argument("--dim", type=int, default=512, help="embedding dimension")
    group.add_argument("--batch_queries", type=int, default=64, help="queries of the batched case (the other is 1)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    add_collection_flags(data)
    data.add_argument("--top_k", type=int, default=10, help="results per query")
    data.add_argument("--index_rows", type=int, default=100_000,
                      help="collection size for the IVF/HNSW indexes (0: skip them)")
    data.add_argument("--recall_queries", type=int, default=200, help="queries scored for recall@k of each index")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--repeats", type=int, default=7, help="timed calls per contender (median reported)")
    timing.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
    timing.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: torch's)")
    program = parser.add_argument_group("program")
    program.add_argument("--no_fp16", action="store_true", help="skip the fp16-storage Searcher")
    program.add_argument("--seed", type=int, default=0, help="random seed of the vectors")
    common.add_report_flags(parser)
    args = parser.parse_args(argv)
    for name in ("rows", "dim", "top_k", "batch_queries", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.index_rows < 0 or args.index_rows > args.rows:
        parser.error("--index_rows must be between 0 and --rows")
    return args


def random_unit_rows(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-length Gaussian rows, normalised in place chunk by chunk so the matrix exists once."""
    matrix = torch.randn(count, dim, generator=generator)
    for start in range(0, count, 65_536):
        chunk = matrix[start : start + 65_536]
        chunk.div_(chunk.norm(dim=1, keepdim=True))
    return matrix


def memory_bandwidth(matrix: torch.Tensor, repeats: int) -> dict:
    """Best-of-N read rates of the whole matrix: a sum and matrix-vector products with ones."""
    ones = torch.ones(matrix.shape[1], dtype=matrix.dtype)
    gigabytes = matrix.numel() * matrix.element_size() / 1e9
    # Several ways to read it (ATen's reduction, MKL's and OpenBLAS's matrix-vector products): the
    # fastest is the floor, so no search path can look better than memory allows.
    matrix_np, ones_np = matrix.numpy(), ones.numpy()
    reads = {
        "sum": lambda: matrix.sum(),
        "mv_ones": lambda: torch.mv(matrix, ones),
        "openblas_mv_ones": lambda: matrix_np @ ones_np,
    }
    times = common.interleaved_ms(reads, repeats, warmup=1)
    rates = {name: round(gigabytes / (min(values) / 1000), 2) for name, values in times.items()}
    best = max(rates.values())
    return {
        "matrix_gb": round(gigabytes, 3),
        "best_ms": {name: round(min(values), 2) for name, values in times.items()},
        "gb_per_s": rates,
        "best_gb_per_s": best,
    }


def matmul_gflops(repeats: int) -> float:
    """Best-of-N fp32 GEMM rate on cache-friendly square matrices: the compute ceiling for many queries."""
    size = 2048
    left, right = torch.randn(size, size), torch.randn(size, size)
    best = min(common.interleaved_ms({"gemm": lambda: left @ right}, repeats, warmup=1)["gemm"])
    return round(2 * size**3 / (best / 1000) / 1e9, 1)


def searcher_parts(searcher, queries: torch.Tensor, top_k: int) -> dict[str, Callable[[], object]]:
    """The exact search split into its steps, to show where the time of a search call goes."""
    typed = F.normalize(queries, dim=-1).to(searcher.storage.dtype)
    scores = searcher.scores(typed)
    score_step = lambda: searcher.scores(typed)  # noqa: E731
    scores = scores.float()
    best_scores, best_rows = scores.topk(top_k, dim=1)
    return {
        "scores": score_step,
        "topk": lambda: scores.topk(top_k, dim=1),
        "hits": lambda: [
            [(int(row), searcher.paths[int(row)], float(score)) for score, row in zip(query_scores, query_rows)]
            for query_scores, query_rows in zip(best_scores.tolist(), best_rows.tolist())
        ],
    }


def bench_exact(args, matrix: torch.Tensor, paths: list[str], threads: int, generator: torch.Generator) -> dict:
    import faiss

    from clipsearch.search import Searcher

    searcher = Searcher(paths, matrix, assume_normalised=True)
    faiss_index = faiss.IndexFlatIP(args.dim)
    faiss_index.add(matrix.numpy())
    fp16_searcher = None if args.no_fp16 else Searcher(paths, matrix.half(), assume_normalised=True)

    bandwidth = memory_bandwidth(matrix, args.repeats)
    gflops = matmul_gflops(args.repeats)
    results = {"bandwidth": bandwidth, "gemm_gflops": gflops, "cases": {}}
    for query_count in (1, args.batch_queries):
        queries = F.normalize(torch.randn(query_count, args.dim, generator=generator), dim=-1)
        queries_np = queries.numpy()
        contenders = {
            "ours": lambda queries=queries: searcher.search(queries, args.top_k),
            "faiss_flat": lambda queries_np=queries_np: faiss_index.search(queries_np, args.top_k),
        }
        if fp16_searcher is not None:
            contenders["ours_fp16"] = lambda queries=queries: fp16_searcher.search(queries, args.top_k)
        times = common.interleaved_ms(contenders, args.repeats, args.warmup)
        parts = common.interleaved_ms(searcher_parts(searcher, queries, args.top_k), args.repeats, args.warmup)

        # The floor: one read of the matrix, or the multiply-adds at the best GEMM rate, whichever is longer.
        read_ms = bandwidth["matrix_gb"] / bandwidth["best_gb_per_s"] * 1000
        compute_ms = 2 * query_count * args.rows * args.dim / (gflops * 1e9) * 1000
        bound_ms = max(read_ms, compute_ms)
        ours, faiss_ms = common.median(times["ours"]), common.median(times["faiss_flat"])
        case = {
            "queries": query_count,
            "ms": {name: common.median(values) for name, values in times.items()},
            "all_ms": {name: [round(value, 2) for value in values] for name, values in times.items()},
            "ours_parts_ms": {name: common.median(values) for name, values in parts.items()},
            "bandwidth_bound_ms": round(read_ms, 2),
            "compute_bound_ms": round(compute_ms, 2),
            "bound_ms": round(bound_ms, 2),
            "bound_kind": "memory" if read_ms >= compute_ms else "compute",
            "ours_over_bound": round(ours / bound_ms, 3),
            "faiss_over_ours": round(faiss_ms / ours, 3),
        }
        if fp16_searcher is not None:
            fp16_bound = max(read_ms / 2, compute_ms)
            case["fp16_bound_ms"] = round(fp16_bound, 2)
            case["ours_fp16_over_bound"] = round(case["ms"]["ours_fp16"] / fp16_bound, 3)
        results["cases"][str(query_count)] = case
        print(json.dumps({k: v for k, v in case.items() if k != "all_ms"}))
    return results


def bench_indexes(args, matrix: torch.Tensor, paths: list[str], generator: torch.Generator) -> dict:
    """IVF and HNSW of clipsearch.index on the first `index_rows` rows: build time, recall@k, latency."""
    from clipsearch.index import build_index
    from clipsearch.search import Searcher
    from clipsearch.store import order_fingerprint

    count = args.index_rows
    exact = Searcher(paths[:count], matrix[:count], assume_normalised=True)
    # Fresh random queries are the hard case for an approximate index (their neighbours are barely
    # closer than everything else); collection rows as queries (estimate_recall) are the easy case.
    fresh = F.normalize(torch.randn(args.recall_queries, args.dim, generator=generator), dim=-1)
    _, exact_rows = exact.exact_top_k(fresh, args.top_k)
    single = fresh[:1]
    batch = fresh[: args.batch_queries]
    results = {"rows": count}
    indexes = {}
    for kind in ("ivf", "hnsw"):
        started = time.perf_counter()
        # The build measures recall on held-out rows (and tunes IVF's nprobe to 0.95 on them).
        index = build_index(exact.embeddings, order_fingerprint(paths[:count], args.dim), kind=kind,
                            recall_queries=args.recall_queries)
        build_s = time.perf_counter() - started
        _, found_rows = index.search(fresh.numpy(), args.top_k)
        hits = sum(len(set(e.tolist()) & set(f.tolist())) for e, f in zip(exact_rows, found_rows))
        indexes[kind] = Searcher(paths[:count], matrix[:count], index, assume_normalised=True)
        results[kind] = {
            "params": index.info["params"],
            "build_s": round(build_s, 1),
            "recall_at_k_fresh_queries": round(hits / (len(fresh) * args.top_k), 4),
            "recall_at_k_row_queries": index.info["recall_at_10"],
        }
        print(json.dumps({kind: results[kind]}))
    for label, queries in (("1", single), (str(args.batch_queries), batch)):
        contenders = {"exact": lambda queries=queries: exact.search(queries, args.top_k)}
        for kind, searcher in indexes.items():
            contenders[kind] = lambda searcher=searcher, queries=queries: searcher.search(queries, args.top_k)
        times = common.interleaved_ms(contenders, args.repeats, args.warmup)
        results[f"ms_{label}_queries"] = {name: common.median(values) for name, values in times.items()}
        print(json.dumps({f"ms_{label}_queries": results[f"ms_{label}_queries"]}))
    return results


def report_markdown(results: dict) -> str:
    exact = results["exact"]
    bandwidth = exact["bandwidth"]
    exact_rows = []
    for case in exact["cases"].values():
        ms, parts = case["ms"], case["ours_parts_ms"]
        fp16 = f"{ms['ours_fp16']:.1f} ({case['ours_fp16_over_bound']:.2f} x its bound)" if "ours_fp16" in ms else "-"
        exact_rows.append([
            case["queries"], f"{ms['ours']:.1f}", fp16, f"{ms['faiss_flat']:.1f}",
            f"{case['bound_ms']:.1f} ({case['bound_kind']})", f"{case['ours_over_bound']:.2f}",
            f"{case['faiss_over_ours']:.2f}", f"{parts['scores']:.1f} / {parts['topk']:.1f} / {parts['hits']:.2f}",
        ])
    lines = [
        f"- Collection: {results['rows']:,} x {results['dim']} random unit vectors (fp32, "
        f"{bandwidth['matrix_gb']:.2f} GB), top-{results['top_k']}; faiss {results['faiss_version']} with "
        f"{results['threads']} OpenMP threads; median of {results['repeats']} calls after {results['warmup']} warm-up calls, "
        "contenders interleaved",
        f"- Memory read rate (best of N full reads of the matrix): {bandwidth['best_gb_per_s']:.1f} GB/s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in bandwidth['gb_per_s'].items())}), so one pass takes at least "
        f"{bandwidth['matrix_gb'] / bandwidth['best_gb_per_s'] * 1000:.0f} ms; fp32 GEMM peak {exact['gemm_gflops']:.0f} GFLOP/s",
        "",
        *common.markdown_table(
            ["queries", "ours ms", "ours fp16 ms", "faiss IndexFlatIP ms", "lower bound ms", "ours / bound (target <= 1.1)",
             "faiss / ours (target >= 2)", "ours: scores / topk / hits ms"],
            exact_rows, "rrrrrrrl"),
    ]
    indexes = results.get("indexes")
    if indexes:
        batch_key = next(key for key in indexes if key.startswith("ms_") and key != "ms_1_queries")
        index_rows = [["exact (ours)", "-", "-", "1.0", "1.0", f"{indexes['ms_1_queries']['exact']:.1f}",
                       f"{indexes[batch_key]['exact']:.1f}"]]
        for kind in ("ivf", "hnsw"):
            info = indexes[kind]
            index_rows.append([
                kind, ", ".join(f"{k}={v}" for k, v in info["params"].items()), f"{info['build_s']:.0f}",
                f"{info['recall_at_k_fresh_queries']:.3f}", f"{info['recall_at_k_row_queries']:.3f}",
                f"{indexes['ms_1_queries'][kind]:.2f}", f"{indexes[batch_key][kind]:.2f}",
            ])
        lines += [
            "",
            f"Approximate indexes of `clipsearch.index` on the first {indexes['rows']:,} vectors (building them on "
            "1M takes too long for a benchmark on this machine). Random vectors are the worst case for an "
            "approximate index: a fresh query's true neighbours are barely closer than the rest of the collection. "
            "Real CLIP embeddings are clustered and score far higher.",
            "",
            *common.markdown_table(
                ["index", "parameters", "build s", "recall@10, fresh random queries", "recall@10, collection rows as queries",
                 "ms, 1 query", "ms, batch"],
                index_rows, "llrrrrr"),
        ]
    return common.report_section("Search", results, lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    header = common.run_header()
    generator = torch.Generator().manual_seed(args.seed)
    matrix = random_unit_rows(args.rows, args.dim, generator)
    paths = [f"images/{row:07d}.jpg" for row in range(args.rows)]

    results = {
        **header,
        "rows": args.rows,
        "dim": args.dim,
        "top_k": args.top_k,
        "threads": threads,
        "faiss_version": faiss.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    results["exact"] = bench_exact(args, matrix, paths, threads, generator)
    if args.index_rows:
        results["indexes"] = bench_indexes(args, matrix, paths, generator)
    results["load_average_end"] = common.load_average()
    results["findings"] = findings(results)
    results["command"] = common.command_line("bench_search.py", argv)
    common.publish("search", results, report_markdown(results), args.report)
    return results


def findings(results: dict) -> list[str]:
    """Plain statements of which targets were met, from the measured figures."""
    lines = []
    for case in results["exact"]["cases"].values():
        met_bound = "met" if case["ours_over_bound"] <= 1.1 else "missed"
        met_faiss = "met" if case["faiss_over_ours"] >= 2 else "missed"
        parts = case["ours_parts_ms"]
        lines.append(
            f"- {case['queries']} quer{'y' if case['queries'] == 1 else 'ies'}: ours/bound {case['ours_over_bound']:.2f} "
            f"({met_bound}), faiss/ours {case['faiss_over_ours']:.2f} ({met_faiss}); of our {case['ms']['ours']:.1f} ms, "
            f"scoring takes {parts['scores']:.1f}, top-k {parts['topk']:.1f}, building hits {parts['hits']:.2f}."
        )
    return lines


if __name__ == "__main__":
    main()
