"""Filtered search over 1M x 512 vectors: latency against the unfiltered search for filters keeping 50%, 5% and 0.1%
of the rows, exact and through an IVF index, and recall@10 of the filtered index search against brute force.

    .venv/bin/python benchmarks/bench_filters.py                  # 1M x 512, an index within 4 GB
    .venv/bin/python benchmarks/bench_filters.py --rows 200000    # a quicker look

The vectors are clustered (1000 themes, like a photo collection's), each row has a number field
`bucket` drawn uniformly from 0..999 (a date or a folder: a filter unrelated to the picture), and
the queries are fresh draws from the same themes. Each filter is timed in every way the Searcher
can answer it (its rows gathered and scored alone; every row scored with the others masked; the
index's ID selector with probes widened), beside the unfiltered search on the same data in the
same run; the Searcher's own choice is the row marked "chosen". Recall@10 compares the filtered
index search with brute force over the rows that pass. With --report, results go to
benchmarks/results/filters.json and the "Filtered search" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import time

import common
import torch
import torch.nn.functional as F

KEEPS = (0.5, 0.05, 0.001)
# The same rows by their path (/photos/<bucket>/<row>.jpg): buckets 0-499, 0-49, 0.
GLOBS = {0.5: "/photos/[0-4]*", 0.05: "/photos/0[0-4]*", 0.001: "/photos/000/*"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--rows", type=int, default=1_000_000, help="collection size")
    data.add_argument("--dim", type=int, default=512, help="embedding dimension")
    data.add_argument("--themes", type=int, default=1000, help="clusters the vectors are drawn around")
    data.add_argument("--top_k", type=int, default=10, help="results per query")
    data.add_argument("--recall_queries", type=int, default=200, help="queries scored for recall@k")
    data.add_argument("--max_memory", default="4GB", help="the index's memory budget (./clipsearch index --max_memory)")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--repeats", type=int, default=7, help="timed calls per contender (median reported)")
    timing.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
    program = parser.add_argument_group("program")
    program.add_argument("--seed", type=int, default=0, help="random seed of the vectors, fields and queries")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


def themed_rows(count: int, dim: int, themes: int, generator: torch.Generator, spread: float = 0.8) -> tuple:
    """Unit rows drawn around `themes` random centres, made a chunk at a time so the matrix exists once."""
    centres = F.normalize(torch.randn(themes, dim, generator=generator), dim=-1)
    matrix = torch.empty(count, dim)
    for start in range(0, count, 65_536):
        size = min(65_536, count - start)
        chosen = centres[torch.randint(0, themes, (size,), generator=generator)]
        noise = torch.randn(size, dim, generator=generator) * (spread / dim**0.5)
        matrix[start : start + size] = F.normalize(chosen + noise, dim=-1)
    return matrix, centres


def fresh_queries(centres: torch.Tensor, count: int, generator: torch.Generator, spread: float = 0.8) -> torch.Tensor:
    chosen = centres[torch.randint(0, len(centres), (count,), generator=generator)]
    return F.normalize(chosen + torch.randn(count, centres.shape[1], generator=generator) * (spread / centres.shape[1] ** 0.5), dim=-1)


def forced(module, subset: bool | None):
    """The Searcher's choice set aside: True gathers every filter's rows, False never does, None leaves its rule."""
    saved = (module.SUBSET_MIN_ROWS, module.SUBSET_FRACTION)

    def apply():
        if subset is True:
            module.SUBSET_MIN_ROWS, module.SUBSET_FRACTION = 10**12, 1.0
        elif subset is False:
            module.SUBSET_MIN_ROWS, module.SUBSET_FRACTION = 0, 0.0
        else:
            module.SUBSET_MIN_ROWS, module.SUBSET_FRACTION = saved

    return apply, saved


def recall(found: list[list], exact_rows: torch.Tensor) -> float:
    hits = sum(len({hit.id for hit in hits} & set(rows.tolist())) for hits, rows in zip(found, exact_rows))
    return round(hits / max(1, sum(len(rows) for rows in exact_rows)), 4)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import clipsearch.search as search_module
    from clipsearch.cli.index import memory_size
    from clipsearch.index import build_index
    from clipsearch.metadata import MetadataTable
    from clipsearch.search import Searcher
    from clipsearch.store import order_fingerprint

    results = {**common.run_header(), "command": common.command_line("bench_filters.py", argv), "args": vars(args)}
    generator = torch.Generator().manual_seed(args.seed)
    matrix, centres = themed_rows(args.rows, args.dim, args.themes, generator)
    buckets = torch.randint(0, 1000, (args.rows,), generator=generator).numpy()
    paths = [f"/photos/{bucket:03d}/{row}.jpg" for row, bucket in enumerate(buckets.tolist())]
    import pyarrow

    fields = MetadataTable(paths, {"bucket": "number"}, {"bucket": pyarrow.array(buckets)})
    queries = fresh_queries(centres, args.recall_queries, generator)
    one = queries[:1]

    # Filters: a number field and a glob on the path, each keeping the same rows.
    filters = {}
    for keep in KEEPS:
        limit = int(round(keep * 1000))
        number = [f"bucket<{limit}"]
        glob = [f"path~{GLOBS[keep]}"]
        filters[keep] = number
        select_ms = {}
        for name, conditions in (("number", number), ("path glob", glob)):
            fresh_table = MetadataTable(paths, fields.kinds, fields.columns)  # no cached answer
            started = time.perf_counter()
            selected = fresh_table.select(conditions)
            select_ms[name] = round((time.perf_counter() - started) * 1000, 1)
            select_ms[f"{name} rows"] = selected.count
        results.setdefault("select_ms", {})[str(keep)] = select_ms
        print(json.dumps({"keep": keep, "select_ms": select_ms}))
    row_sets = {keep: fields.select(conditions) for keep, conditions in filters.items()}

    exact = Searcher(paths, matrix, assume_normalised=True)
    started = time.perf_counter()
    index = build_index(matrix, order_fingerprint(paths, args.dim), max_memory=memory_size(args.max_memory))
    results["index"] = {key: index.info[key] for key in ("factory", "params", "recall_at_10", "build_seconds")}
    results["index"]["build_s_wall"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"index": results["index"]}))
    through_index = Searcher(paths, matrix, index, assume_normalised=True)

    cases = {}
    for keep, allowed in row_sets.items():
        ways = {
            "exact, unfiltered": (exact, None, None),
            "exact, rows gathered": (exact, allowed, True),
            "exact, others masked": (exact, allowed, False),
            "exact, chosen": (exact, allowed, None),
            "index, unfiltered": (through_index, None, None),
            "index, ID selector": (through_index, allowed, False),
            "index, chosen": (through_index, allowed, None),
        }
        if keep >= 0.5:  # gathering half the collection copies 1 GB per query: shown once, at 5% and below only
            ways.pop("exact, rows gathered")

        def contender(searcher, rows, subset):
            apply, saved = forced(search_module, subset)

            def run():
                apply()
                try:
                    return searcher.search(one, args.top_k, allowed=rows)
                finally:
                    search_module.SUBSET_MIN_ROWS, search_module.SUBSET_FRACTION = saved

            return run

        times = common.interleaved_ms({name: contender(*way) for name, way in ways.items()}, args.repeats, args.warmup)
        _, exact_rows = exact.exact_top_k(queries, args.top_k, allowed.bias)
        exact_rows = [row[: min(args.top_k, allowed.count)] for row in exact_rows]
        unfiltered_exact = exact.exact_top_k(queries, args.top_k)[1]
        case = {
            "rows_kept": allowed.count,
            "ms": {name: common.median(values) for name, values in times.items()},
            "recall_at_10": {
                "index, unfiltered": recall(through_index.search(queries, args.top_k), unfiltered_exact),
                "index, chosen": recall(through_index.search(queries, args.top_k, allowed=allowed), exact_rows),
            },
        }
        apply, saved = forced(search_module, False)
        apply()
        try:
            case["recall_at_10"]["index, ID selector"] = recall(through_index.search(queries, args.top_k, allowed=allowed), exact_rows)
        finally:
            search_module.SUBSET_MIN_ROWS, search_module.SUBSET_FRACTION = saved
        cases[str(keep)] = case
        print(json.dumps({"keep": keep, **case}))
    results["cases"] = cases
    results["load_average_end"] = common.load_average()
    results["findings"] = findings(results)
    common.publish("filters", results, markdown(results), args.report)
    return results


def findings(results: dict) -> list[str]:
    lines = []
    for keep, case in results["cases"].items():
        ms = case["ms"]
        lines.append(
            f"- Keeping {float(keep):.1%} ({case['rows_kept']:,} rows): exact {ms['exact, chosen']} ms against "
            f"{ms['exact, unfiltered']} ms unfiltered; through the index {ms['index, chosen']} ms against "
            f"{ms['index, unfiltered']} ms, recall@10 {case['recall_at_10']['index, chosen']} "
            f"(unfiltered {case['recall_at_10']['index, unfiltered']})."
        )
    return lines


def markdown(results: dict) -> str:
    args = results["args"]
    names = ["exact, unfiltered", "exact, rows gathered", "exact, others masked", "exact, chosen",
             "index, unfiltered", "index, ID selector", "index, chosen"]
    rows = []
    for keep, case in results["cases"].items():
        rows.append([f"{float(keep):.1%}", f"{case['rows_kept']:,}", *(case["ms"].get(name, "-") for name in names),
                     case["recall_at_10"]["index, chosen"], case["recall_at_10"]["index, unfiltered"]])
    select_rows = [[f"{float(keep):.1%}", values["number"], values["path glob"]] for keep, values in results["select_ms"].items()]
    index = results["index"]
    body = [
        "",
        f"{args['rows']:,} x {args['dim']} unit vectors around {args['themes']} themes; a uniform number field decides "
        f"which rows pass; one query, top-{args['top_k']}, median ms of {args['repeats']} interleaved calls. Index: "
        f"`{index['factory']}` (nprobe {index['params'].get('nprobe')}, built in {index['build_s_wall']} s within "
        f"{args['max_memory']}). Recall@10 against brute force over the rows that pass, {args['recall_queries']} queries.",
        "",
        *common.markdown_table(["kept", "rows", *names, "recall@10 filtered", "recall@10 unfiltered"], rows,
                               "lr" + "r" * (len(names) + 2)),
        "",
        "Evaluating the filter once (then cached for the next queries), ms:",
        "",
        *common.markdown_table(["kept", "number field", "glob on the path"], select_rows, "lrr"),
    ]
    return common.report_section("Filtered search", results, body)


if __name__ == "__main__":
    main()
