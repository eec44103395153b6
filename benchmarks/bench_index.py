"""Compressed indexes within a memory budget, against exact search and against autofaiss, on real and generated embeddings.

    PYTHONPATH=package:<autofaiss folder> .venv/bin/python benchmarks/bench_index.py --part flickr8k --source <Flickr8k>
    PYTHONPATH=package:<autofaiss folder> .venv/bin/python benchmarks/bench_index.py --part synthetic \
        --count 5000000 --max_memory 4GB
    .venv/bin/python benchmarks/bench_index.py --part synthetic --count 20000 --no_autofaiss   # a quick trial

autofaiss is installed for the benchmark only, into a folder of your choice (see benchmarks/README.md).

(a) flickr8k: the Flickr8k dev+train photos encoded by the project's encoder with the packaged default
    "our" model (MiniLM-L6 text, EfficientNet-Lite0 image, ImageNet/sentence weights) whose projections
    are untrained (no trained checkpoint exists on this machine), queried by the dev captions. Caption
    rankings of such a model are poor retrieval, but they are real text-tower vectors against real
    image-tower vectors: what is measured is the index's agreement with exact search.
(b) synthetic: `--count` 512-d vectors from the generator below, queried by fresh draws of it.

Generator (`clustered_vectors`): a mixture of `--clusters` Gaussians whose weights follow a Zipf law
(exponent 1, as tag and category frequencies do), centres ~ N(0, I) in a random `--intrinsic_dim`-d
subspace of R^512, points ~ centre + 0.6 N(0, I) inside the subspace, plus isotropic N(0, 0.08^2 I)
noise in all 512 dimensions, then normalised to unit length. The subspace holds 93% of the energy;
image CLIP embeddings have an intrinsic dimension of a few tens.

Both indexes get the same vectors (autofaiss reads them through our clip-retrieval export), the same
memory budget, and run in the same process, interleaved, with the same threads; latencies on this
machine are pessimistic (2 cores shared with other jobs) but fair between contenders.
Each run adds its part to the tracked parts of benchmarks/results/index.json; with --report the merged
file replaces the tracked one and the "Index" section of BENCHMARKS.md is re-rendered from it.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch
from common import interleaved_ms, load_average, machine_lines, median

RESULTS_NAME = "index"
TRACKED_RESULTS = common.RESULTS_DIR / f"{RESULTS_NAME}.json"  # every part measured so far, keyed by part
TOP_K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("flickr8k", "synthetic", "startup", "report"), required=True,
                        help="which collection to run; startup: only the startup times on --count generated rows; "
                             "report: rewrite the BENCHMARKS.md section from the JSON")
    parser.add_argument("--source", type=Path, default=None,
                        help="flickr8k: the unpacked official Flickr8k download (Flicker8k_Dataset/, Flickr8k.token.txt, "
                             "Flickr_8k.*Images.txt); read in place")
    parser.add_argument("--work_dir", type=Path, default=common.work_dir("index"),
                        help="scratch folder (vectors, indexes, exports), kept between runs to reuse them")
    parser.add_argument("--count", type=int, default=200_000, help="synthetic: collection size")
    parser.add_argument("--clusters", type=int, default=2_000, help="synthetic: mixture components")
    parser.add_argument("--intrinsic_dim", type=int, default=32, help="synthetic: dimension of the subspace")
    parser.add_argument("--max_memory", default=None, help="index budget, e.g. 4GB (default: 200 bytes a vector)")
    parser.add_argument("--queries", type=int, default=1_000, help="queries scored for recall@10")
    parser.add_argument("--startup_rows", type=int, default=1_000_000, help="rows written as shards to time startup")
    parser.add_argument("--no_autofaiss", action="store_true", help="skip autofaiss (not installed)")
    parser.add_argument("--part_suffix", default="", help="words added to the part's name, so a run at other settings "
                        "(e.g. another --max_memory) gets its own section instead of replacing one")
    parser.add_argument("--note", default=None, help="a sentence printed under the part's table (e.g. why autofaiss did not run)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per contender (median reported)")
    common.add_report_flags(parser)
    args = parser.parse_args(argv)
    if args.part == "report" and not args.report:
        parser.error("--part report rewrites BENCHMARKS.md from benchmarks/results/index.json: add --report")
    if args.part == "flickr8k":
        if args.source is None:
            parser.error("--part flickr8k needs --source <Flickr8k>, the unpacked official download")
        missing = [name for name in ("Flicker8k_Dataset", "Flickr8k.token.txt", "Flickr_8k.trainImages.txt",
                                     "Flickr_8k.devImages.txt") if not (args.source / name).exists()]
        if missing:
            parser.error(f"--source {args.source}: missing {', '.join(missing)} (expected the official Flickr8k download)")
    return args


# ---------------------------------------------------------------------------------------------
# Collections
# ---------------------------------------------------------------------------------------------


def clustered_vectors(count: int, clusters: int, intrinsic_dim: int, dim: int = 512, seed: int = 0, chunk: int = 250_000):
    """Chunks of unit vectors from the documented mixture; the same seed always gives the same mixture."""
    mixture = np.random.default_rng(seed)
    basis = np.linalg.qr(mixture.standard_normal((dim, intrinsic_dim)))[0].T.astype(np.float32)  # [intrinsic, dim]
    centres = mixture.standard_normal((clusters, intrinsic_dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1)
    weights /= weights.sum()
    draws = np.random.default_rng([seed, count])  # collection and queries differ by `count`
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        members = draws.choice(clusters, size=rows, p=weights)
        latent = centres[members] + 0.6 * draws.standard_normal((rows, intrinsic_dim), dtype=np.float32)
        vectors = latent @ basis + 0.08 * draws.standard_normal((rows, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield vectors


def synthetic_store(args, folder: Path):
    from clipsearch.mmap_store import open_store, source_fingerprint, store_folder, write_store

    recipe = {"count": args.count, "clusters": args.clusters, "intrinsic_dim": args.intrinsic_dim}
    recipe_file = folder.parent / f"{folder.name}.recipe.json"
    store = open_store(folder)
    if store is not None and recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        return store
    folder.mkdir(parents=True, exist_ok=True)
    offsets = iter(range(0, args.count, 250_000))

    def chunks():
        for vectors in clustered_vectors(args.count, args.clusters, args.intrinsic_dim):
            start = next(offsets)
            yield [f"synthetic/{row}" for row in range(start, start + len(vectors))], torch.from_numpy(vectors)

    store = write_store(store_folder(folder), chunks(), source_fingerprint(folder))
    recipe_file.write_text(json.dumps(recipe))
    return store


def flickr8k_store(source: Path, work_dir: Path):
    """Encode the dev+train photos with an untrained-projection default model, once; returns (store, bundle)."""
    from clipsearch.checkpoint import load_bundle, save_bundle
    from clipsearch.mmap_store import consolidate

    checkpoint = work_dir / "our-default-untrained.ckpt"
    emb_path, images = work_dir / "flickr8k-emb", work_dir / "flickr8k-images"
    if not checkpoint.is_file():
        from clipsearch.models import build_from_spec
        from clipsearch.models.our_clip import load_image_weights, load_text_weights, our_clip_spec

        spec, _ = our_clip_spec(image_size=224)
        bundle = build_from_spec(spec)
        load_text_weights(bundle.model, spec["text"]["source"])
        load_image_weights(bundle.model, "efficientnet_lite0", None)
        save_bundle(bundle, checkpoint)
    if not (emb_path / "manifest.json").is_file():
        images.mkdir(parents=True, exist_ok=True)
        for listing in ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt"):
            for name in (source / listing).read_text().split():
                link = images / name
                if not link.exists():
                    link.symlink_to((source / "Flicker8k_Dataset" / name).resolve())  # links, not copies of the photos
        subprocess.run(
            [sys.executable, "-m", "clipsearch.cli.encode", "--load_model", str(checkpoint), "--dataset_path",
             str(images), "--emb_path", str(emb_path), "--no_progress"],
            check=True,
        )
    return consolidate(emb_path), load_bundle(checkpoint)


def caption_queries(bundle, source: Path, count: int, listing: str = "Flickr_8k.devImages.txt") -> np.ndarray:
    images = set((source / listing).read_text().split())
    captions = [
        line.split("\t", 1)[1]
        for line in (source / "Flickr8k.token.txt").read_text().splitlines()
        if "\t" in line and line.split("#", 1)[0] in images
    ][:count]
    with torch.inference_mode():
        vectors = torch.cat([bundle.model.encode_text(bundle.tokenizer(captions[start : start + 256])) for start in range(0, len(captions), 256)])
    return torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------


def build_ours(store, folder: Path, max_memory: int | None, tune_queries: np.ndarray | None = None, file: str = "index.faiss"):
    from clipsearch.index import build_index, load_index

    started = time.perf_counter()
    index = build_index(store.embeddings, store.order_fingerprint, max_memory=max_memory, rerank_rows=store.rows,
                        queries=tune_queries)
    build_seconds = time.perf_counter() - started
    index.save(folder / file)
    loaded = load_index(folder / file)  # memory-mapped, re-ranking from the store, as search opens it
    return loaded, {"build_seconds": round(build_seconds, 1), "bytes": index.info["index_bytes"], "layout": index.info["factory"],
                    "build_recall_at_10": index.info.get("recall_at_10"), "nprobe": index.info["params"].get("nprobe"),
                    "build_recall_queries": index.info.get("recall_queries"),
                    "reranks": loaded.reranks, "memory_mapped": loaded.info["memory_mapped"]}


def adapt_autofaiss() -> None:
    """Two incompatibilities of autofaiss 2.18 with this venv, adapted in autofaiss's modules only:
    it builds OPQ with `faiss.OPQMatrix(d, M=..., d2=...)`, which faiss 1.15's bindings take by
    position only, and it writes numpy 2's float32 metrics with a plain json.dump, which refuses them."""
    import types

    import autofaiss.external.optimize as optimize
    import autofaiss.indices.index_factory as factory
    import faiss

    def opq_matrix(d, M, d2):  # noqa: N803 - autofaiss's keyword names
        return faiss.OPQMatrix(d, M, d2)

    factory.faiss = types.SimpleNamespace(**{**vars(faiss), "OPQMatrix": opq_matrix})
    optimize.json = types.SimpleNamespace(**{**vars(json), "dump": lambda data, file: json.dump(data, file, default=float)})


def build_autofaiss(store, folder: Path, max_memory: int):
    """autofaiss's own choice for the same vectors and budget, from our clip-retrieval export."""
    import faiss
    from autofaiss import build_index

    from clipsearch.clip_retrieval_export import export_clip_retrieval
    from clipsearch.index import read_faiss_index

    export = folder / "clip-retrieval"
    if not (export / "img_emb").is_dir():
        export_clip_retrieval(store.paths, store.embeddings.numpy(), export)
    (folder / "autofaiss").mkdir(exist_ok=True)  # its JSON beside the shards would read as a new input
    index_path, infos_path = folder / "autofaiss" / "knn.index", folder / "autofaiss" / "infos.json"
    adapt_autofaiss()
    started = time.perf_counter()
    build_index(
        embeddings=str(export / "img_emb"), index_path=str(index_path), index_infos_path=str(infos_path),
        max_index_memory_usage=f"{max_memory // 2**20}M", current_memory_available="6G", metric_type="ip",
        max_index_query_time_ms=10, should_be_memory_mappable=True, nb_cores=torch.get_num_threads(), verbose=20,  # INFO: its phases, timed, in the log
    )
    build_seconds = time.perf_counter() - started
    infos = json.loads(infos_path.read_text())
    index, mapped = read_faiss_index(index_path)
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    return index, {"build_seconds": round(build_seconds, 1), "bytes": index_path.stat().st_size, "layout": infos["index_key"],
                   "params": infos["index_param"], "memory_mapped": mapped}


def recall(found_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    return round(float(np.mean([len(set(found[:TOP_K]) & set(exact[:TOP_K])) / TOP_K for found, exact in zip(found_rows.tolist(), exact_rows.tolist())])), 4)


def rotating_batches(queries: np.ndarray, size: int):
    """Successive query batches, so no contender answers the same query twice in a row from cache."""
    start = 0
    while True:
        if start + size > len(queries):
            start = 0
        yield queries[start : start + size]
        start += size


def compare(store, queries: np.ndarray, folder: Path, max_memory: int, args, tune_queries: np.ndarray | None = None) -> dict:
    """Exact ground truth from the mapped store, then each contender's recall@10, latency, build time and size."""
    import faiss

    from clipsearch.index import exact_neighbours
    from clipsearch.search import Searcher

    started = time.perf_counter()
    exact_rows = exact_neighbours(store.embeddings, queries, TOP_K)
    results: dict = {"count": len(store), "dim": store.dim, "max_memory": max_memory, "queries": len(queries),
                     "ground_truth_seconds": round(time.perf_counter() - started, 1)}
    ours, results["ours"] = build_ours(store, folder, max_memory)
    searchers = {"ours": lambda batch: ours.search(batch, TOP_K)[1]}
    if tune_queries is not None:
        tuned, results["ours, tuned on train captions"] = build_ours(store, folder, max_memory, tune_queries, "index-captions.faiss")
        searchers["ours, tuned on train captions"] = lambda batch: tuned.search(batch, TOP_K)[1]
    if not args.no_autofaiss:
        theirs, results["autofaiss"] = build_autofaiss(store, folder, max_memory)
        searchers["autofaiss"] = lambda batch: theirs.search(batch, TOP_K)[1]
    exact = Searcher(store.paths, store.embeddings, assume_normalised=True)  # the mapped matrix, no copy
    searchers["exact (mmap fp16)"] = lambda batch: exact.exact_top_k(torch.from_numpy(batch), TOP_K)[1].numpy()
    for name, search in searchers.items():
        results.setdefault(name, {})["recall_at_10"] = recall(search(queries), exact_rows) if name != "exact (mmap fp16)" else 1.0
    for batch_size in (1, 64):
        batches = rotating_batches(queries, batch_size)
        times = interleaved_ms({name: (lambda search=search, batches=batches: search(next(batches))) for name, search in searchers.items()},
                               repeats=args.repeats, warmup=2)
        for name, values in times.items():
            results[name][f"ms_per_query_{batch_size}"] = round(median(values) / batch_size, 3)
    results["threads"] = faiss.omp_get_max_threads()
    results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return results


def startup(store, folder: Path, rows: int) -> dict:
    """Seconds from a fresh process to the first exact answer: consolidated mmap against reading shards."""
    from clipsearch.mmap_store import consolidate
    from clipsearch.store import write_shard

    shards = folder / "startup-emb"
    rows = min(rows, len(store))
    written = folder / "startup-emb.done"
    if not written.is_file() or consolidate(shards).info["count"] != rows:
        shards.mkdir(parents=True, exist_ok=True)
        for number, start in enumerate(range(0, rows, 100_000)):
            end = min(start + 100_000, rows)
            write_shard(shards / f"0-{number:03d}-100000.ckpt", store.paths[start:end], store.embeddings[start:end].float())
        written.write_text(str(rows))
    consolidate(shards)  # built once, as the index command does
    query = f"torch.nn.functional.normalize(torch.ones(1, {store.dim}), dim=-1)"
    programs = {
        "imports only": "import torch, clipsearch.search, clipsearch.store, clipsearch.mmap_store",
        "shards read into memory (fp16)": f"import torch; from clipsearch.search import Searcher; from clipsearch.store import load_collection\n"
        f"s = Searcher.from_collection(load_collection({str(shards)!r}, dtype=torch.float16)); s.search({query}, 10)",
        "consolidated store, memory-mapped": f"import torch; from clipsearch.search import Searcher; from clipsearch.mmap_store import open_store\n"
        f"st = open_store({str(shards)!r}); s = Searcher(st.paths, st.embeddings, assume_normalised=True); s.search({query}, 10)",
    }
    seconds = {}
    for _ in range(3):  # alternate, best of three: the page cache is warm for both after the first
        for name, program in programs.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", program], check=True)
            seconds[name] = min(seconds.get(name, math.inf), round(time.perf_counter() - started, 2))
    return {"rows": rows, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(result: dict) -> str:
    rows = []
    for name in ("ours", "ours, tuned on train captions", "autofaiss", "exact (mmap fp16)"):
        row = result.get(name)
        if row is None:
            continue
        memory = f"{row['bytes'] / 2**20:,.1f} MB" if "bytes" in row else f"{result['count'] * result['dim'] * 2 / 2**20:,.0f} MB on disk"
        layout = row.get("layout", "fp16 matrix") + (" + exact re-rank" if row.get("reranks") else "")
        rows.append([name, layout, memory, row.get("build_seconds", "-"), f"{row['recall_at_10']:.3f}",
                     f"{row['ms_per_query_1']:.2f}", f"{row['ms_per_query_64']:.2f}"])
    columns = ["index", "layout", "memory", "build s", "recall@10", "ms/query (1)", "ms/query (64 batch)"]
    return "\n".join(common.markdown_table(columns, rows, "llrrrrr"))


def startup_line(startup: dict) -> str:
    return (f"Fresh process to the first exact answer, {startup['rows']:,} rows (best of 3, page cache warm): "
            + ", ".join(f"{name} {value} s" for name, value in startup["seconds"].items()) + ".")


def render(all_results: dict) -> str:
    parts = ["## Index (memory budget, recall against exact search)", "",
             "`benchmarks/bench_index.py`. Recall@10 is measured against exact search on queries that are not "
             "collection rows; both indexes are loaded memory-mapped, as search opens them. autofaiss 2.18 "
             "(installed for the benchmark only) gets the same vectors through our clip-retrieval export and "
             "the same budget, and runs in the same process, interleaved, on the same threads. Memory is the "
             "index file that faiss maps; IVF-PQ re-ranks 10 x top-k candidates from the fp16 matrix on disk. "
             "Peak memory is the process's RSS, which counts the pages of mapped files it touched. The parts "
             "up to 1M ran while the 2 cores were shared with other jobs (load averages near 6): their latencies "
             "are pessimistic. Only figures of the same run compare."]
    for part, result in all_results.items():
        command = [f"Command: `{result['command']}`", ""] if "command" in result else []  # older parts lack it
        if "compare" not in result:  # a startup-only run
            parts += ["", f"### {part}", "", *command, machine_lines(result), startup_line(result["startup"])]
            continue
        parts += ["", f"### {part}: {result['count']:,} x {result['dim']}, budget {result['max_memory'] / 2**20:,.1f} MB, "
                  f"{result['queries']} queries", "", *command, machine_lines(result), table(result["compare"]), ""]
        for name in ("ours", "ours, tuned on train captions"):
            row = result["compare"].get(name)
            if row and row.get("build_recall_at_10") is not None:
                parts.append(f"{name}: recall@10 measured by the build on {row['build_recall_queries']}: "
                             f"{row['build_recall_at_10']} at nprobe {row['nprobe']}.")
        parts.append(f"Peak memory of the whole run: {result['compare']['peak_rss_gb']} GB.")
        if "autofaiss" in result["compare"]:
            theirs = result["compare"]["autofaiss"]
            parts.append(f"autofaiss parameters: `{theirs['params']}`.")
            if theirs["bytes"] > result["max_memory"]:
                parts.append(f"autofaiss's index ({theirs['bytes'] / 2**20:,.1f} MB) exceeds the budget: below "
                             "10,000 vectors (its quantization threshold) it does not compress whatever the budget.")
        if "startup" in result:
            parts.append(startup_line(result["startup"]))
        if result.get("note"):
            parts.append(result["note"])
    return "\n".join(parts)


def tracked_results() -> dict:
    return json.loads(TRACKED_RESULTS.read_text()) if TRACKED_RESULTS.is_file() else {}


def save_part(name: str, result: dict, report: bool) -> dict:
    """The tracked parts with this one added or replaced, written where --report says (no BENCHMARKS.md yet)."""
    all_results = {**tracked_results(), name: result}
    common.write_results(RESULTS_NAME, all_results, common.results_dir(report))
    return all_results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.part == "report":  # re-render only: the JSON is rewritten unchanged
        all_results = tracked_results()
        common.publish(RESULTS_NAME, all_results, render(all_results), args.report)
        return {}
    work_dir = args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    from clipsearch.cli.index import memory_size

    started = {**common.run_header(), "command": common.command_line("bench_index.py", argv)}
    if args.part == "flickr8k":
        store, bundle = flickr8k_store(args.source, work_dir)
        folder = work_dir / "flickr8k-emb"
        queries = caption_queries(bundle, args.source, args.queries)
        tune_queries = caption_queries(bundle, args.source, args.queries, "Flickr_8k.trainImages.txt")
        max_memory = memory_size(args.max_memory) if args.max_memory else 2**20  # 1/7 of fp32: PQ
        name = "Flickr8k (real photos, caption queries)"
    elif args.part == "startup":
        store = synthetic_store(args, work_dir / f"synthetic-{args.count}")
        result = {**started, "startup": startup(store, work_dir / f"synthetic-{args.count}", args.count)}
        result["load_average_end"] = load_average()
        name = f"Startup, {args.count:,} generated rows"
        print(render({name: result}))
        all_results = {**tracked_results(), name: result}
        common.publish(RESULTS_NAME, all_results, render(all_results), args.report)
        return result
    else:
        folder, tune_queries = work_dir / f"synthetic-{args.count}", None
        store = synthetic_store(args, folder)
        queries = next(clustered_vectors(args.queries, args.clusters, args.intrinsic_dim))  # fresh draws
        max_memory = memory_size(args.max_memory) if args.max_memory else len(store) * 200
        name = f"Generated, {args.count:,} vectors ({args.clusters:,} Zipf clusters in a {args.intrinsic_dim}-d subspace)"
    name += f", {args.part_suffix}" if args.part_suffix else ""
    result = {**started, "compare": compare(store, queries, folder, max_memory, args, tune_queries)}
    result.update(count=len(store), dim=store.dim, max_memory=max_memory, queries=len(queries), load_average_end=load_average())
    if args.note:
        result["note"] = args.note
    all_results = save_part(name, result, args.report)  # kept even if the startup measurement fails
    if args.part == "synthetic" and args.startup_rows:
        result["startup"] = startup(store, folder, args.startup_rows)
        all_results = {**all_results, name: result}
    print(render({name: result}))
    common.publish(RESULTS_NAME, all_results, render(all_results), args.report)
    return result


if __name__ == "__main__":
    main()
