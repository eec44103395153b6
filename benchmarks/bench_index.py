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
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch
from clip_like import ClipLikeSpace, describe
from common import interleaved_ms, load_average, machine_lines, median

RESULTS_NAME = "index"
TRACKED_RESULTS = common.RESULTS_DIR / f"{RESULTS_NAME}.json"  # every part measured so far, keyed by part
TOP_K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("flickr8k", "synthetic", "gap", "parts", "startup", "report"), required=True,
                        help="which collection to run; gap: CLIP-like vectors and text queries with a modality gap "
                             "(benchmarks/clip_like.py); parts: the same, built in parts by --ranks processes into on-disk "
                             "lists and searched by a fresh process; startup: only the startup times on --count generated "
                             "rows; report: rewrite the BENCHMARKS.md section from the JSON")
    parser.add_argument("--source", type=Path, default=None,
                        help="flickr8k: the unpacked official Flickr8k download (Flicker8k_Dataset/, Flickr8k.token.txt, "
                             "Flickr_8k.*Images.txt); read in place")
    parser.add_argument("--work_dir", type=Path, default=common.work_dir("index"),
                        help="scratch folder (vectors, indexes, exports), kept between runs to reuse them")
    parser.add_argument("--count", type=int, default=200_000, help="synthetic, gap, parts: collection size")
    parser.add_argument("--clusters", type=int, default=2_000, help="synthetic, gap, parts: mixture components")
    parser.add_argument("--intrinsic_dim", type=int, default=32, help="synthetic: dimension of the subspace")
    parser.add_argument("--max_memory", default=None, help="index budget, e.g. 4GB (default: 200 bytes a vector)")
    parser.add_argument("--queries", type=int, default=1_000, help="queries scored for recall@10")
    parser.add_argument("--tune_queries", type=int, default=500,
                        help="gap, parts: text queries (captions of other images than the scored ones) our build tunes on")
    parser.add_argument("--match_autofaiss", action="store_true",
                        help="gap: also build ours with autofaiss's index size as the budget, to compare at equal memory")
    parser.add_argument("--autofaiss_deeper", type=int, nargs="*", default=[],
                        help="gap: also search autofaiss's index with its nprobe this many times larger (e.g. 4 16)")
    parser.add_argument("--ranks", type=int, default=2, help="parts: processes that build the parts, sharing the cores")
    parser.add_argument("--nlist", type=int, default=None, help="gap: our IVF lists (default: the index's own, 2*sqrt(N))")
    parser.add_argument("--skip_rows_tuning", action="store_true",
                        help="gap: leave out ours tuned on image rows (the old default), to save its build")
    parser.add_argument("--startup_rows", type=int, default=1_000_000, help="rows written as shards to time startup")
    parser.add_argument("--reuse", action="store_true",
                        help="load our indexes an earlier run built in --work_dir for the same vectors, budget and tuning "
                             "queries, instead of building them again")
    parser.add_argument("--search_only", action="store_true",
                        help="parts: measure only a fresh search process over the index an earlier parts run built in "
                             "--work_dir (with --queries ground-truth queries), not the build")
    parser.add_argument("--no_autofaiss", action="store_true", help="skip autofaiss (not installed)")
    parser.add_argument("--part_suffix", default="", help="words added to the part's name, so a run at other settings "
                        "(e.g. another --max_memory) gets its own section instead of replacing one")
    parser.add_argument("--note", default=None, help="a sentence printed under the part's table (e.g. why autofaiss did not run)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per contender (median reported)")
    common.add_report_flags(parser)
    args = parser.parse_args(argv)
    if args.search_only and args.part != "parts":
        parser.error("--search_only measures the search process of --part parts")
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


def generated_store(folder: Path, recipe: dict, vector_chunks):
    """The consolidated store of generated vectors in `folder`, written once per recipe (no shards: it is all search reads)."""
    from clipsearch.mmap_store import open_store, source_fingerprint, store_folder, write_store

    recipe_file = folder.parent / f"{folder.name}.recipe.json"
    store = open_store(folder)
    if store is not None and recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        return store
    folder.mkdir(parents=True, exist_ok=True)

    def chunks():
        start = 0
        for vectors in vector_chunks:
            yield [f"synthetic/{row}" for row in range(start, start + len(vectors))], torch.from_numpy(vectors)
            start += len(vectors)

    store = write_store(store_folder(folder), chunks(), source_fingerprint(folder))
    recipe_file.write_text(json.dumps(recipe))
    return store


def synthetic_store(args, folder: Path):
    recipe = {"count": args.count, "clusters": args.clusters, "intrinsic_dim": args.intrinsic_dim}
    return generated_store(folder, recipe, clustered_vectors(args.count, args.clusters, args.intrinsic_dim))


def gap_store(args, space: ClipLikeSpace, folder: Path):
    recipe = {"generator": "clip_like", "count": args.count, "clusters": args.clusters}
    return generated_store(folder, recipe, space.images(args.count))


def text_queries(space: ClipLikeSpace, store, count: int, seed: int) -> np.ndarray:
    """Captions of `count` random collection images (the targets), as the generator makes them."""
    targets = np.sort(np.random.default_rng(seed).choice(len(store), size=count, replace=False))
    return space.texts(store.rows(targets).astype(np.float32), seed=seed)


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


# --reuse: an index an earlier run built for the same vectors, budget and tuning queries is loaded, not
# built again (a 5M-row build takes half an hour here); its recorded build time is reported.
REUSE = False


def reusable_index(path: Path, store, max_memory: int | None, tune_queries: np.ndarray | None,
                   nlist: int | None = None) -> dict | None:
    """The record of an index at `path` built from `store`'s rows within `max_memory`, tuned on as many
    text queries as `tune_queries` holds (or on image rows when None), with `nlist` lists when given;
    None when there is none such."""
    from clipsearch.index import info_path_of

    record = info_path_of(path)
    if not (path.exists() and record.exists()):
        return None
    info = json.loads(record.read_text())
    tuned_on_text = tune_queries is not None
    same = (info.get("order_fingerprint") == store.order_fingerprint and info.get("max_memory") == max_memory
            and (info.get("tuned_on") == "text queries") == tuned_on_text and "build_seconds" in info
            and (not tuned_on_text or info.get("text_queries") == f"{len(tune_queries)} given queries")
            and (nlist is None or str(info.get("factory", "")).startswith(f"IVF{nlist}")))
    if same:
        print(f"reusing {path} (built in {info['build_seconds']:.0f} s)")
    return info if same else None


def build_ours(store, folder: Path, max_memory: int | None, tune_queries: np.ndarray | None = None, file: str = "index.faiss",
               nlist: int | None = None):
    from clipsearch.index import build_index, info_path_of, load_index

    info = reusable_index(folder / file, store, max_memory, tune_queries, nlist) if REUSE else None
    if info is not None:
        build_seconds = float(info["build_seconds"])
    else:
        started = time.perf_counter()
        index = build_index(store.embeddings, store.order_fingerprint, max_memory=max_memory, rerank_rows=store.rows,
                            queries=tune_queries, nlist=nlist)
        build_seconds = time.perf_counter() - started
        index.save(folder / file)
        info = json.loads(info_path_of(folder / file).read_text())
    loaded = load_index(folder / file)  # memory-mapped, re-ranking from the store, as search opens it
    return loaded, {"build_seconds": round(build_seconds, 1), "bytes": info["index_bytes"], "layout": info["factory"],
                    "build_recall_at_10": info.get("recall_at_10"), "nprobe": info["params"].get("nprobe"),
                    "rerank_factor": info["params"].get("rerank_factor"), "build_recall_queries": info.get("recall_queries"),
                    "tuned_on": info.get("tuned_on"), "recorded_text_recall": info.get("text_recall_at_10"),
                    "recorded_image_recall": info.get("image_recall_at_10"),
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
    from clipsearch.durable import write_json
    from clipsearch.index import read_faiss_index

    (folder / "autofaiss").mkdir(exist_ok=True)  # its JSON beside the shards would read as a new input
    index_path, infos_path = folder / "autofaiss" / "knn.index", folder / "autofaiss" / "infos.json"
    record_path = folder / "autofaiss" / "bench.json"  # what it was built from, for --reuse
    built_from = {"order_fingerprint": store.order_fingerprint, "max_memory": max_memory}
    record = json.loads(record_path.read_text()) if REUSE and record_path.exists() and index_path.exists() else {}
    if {key: record.get(key) for key in built_from} == built_from:
        print(f"reusing {index_path} (built in {record['build_seconds']:.0f} s)")
        build_seconds = record["build_seconds"]
    else:
        export = folder / "clip-retrieval"
        if not (export / "img_emb").is_dir():
            export_clip_retrieval(store.paths, store.embeddings.numpy(), export)
        adapt_autofaiss()
        started = time.perf_counter()
        build_index(
            embeddings=str(export / "img_emb"), index_path=str(index_path), index_infos_path=str(infos_path),
            max_index_memory_usage=f"{max_memory // 2**20}M", current_memory_available="6G", metric_type="ip",
            max_index_query_time_ms=10, should_be_memory_mappable=True, nb_cores=torch.get_num_threads(), verbose=20,  # INFO: its phases, timed, in the log
        )
        build_seconds = round(time.perf_counter() - started, 1)
        write_json(record_path, {**built_from, "build_seconds": build_seconds})
    infos = json.loads(infos_path.read_text())
    index, mapped = read_faiss_index(index_path)
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    return index, {"build_seconds": round(build_seconds, 1), "bytes": index_path.stat().st_size, "layout": infos["index_key"],
                   "params": infos["index_param"], "memory_mapped": mapped}


def autofaiss_searcher(index, params: str):
    """autofaiss's index at `params` (faiss ParameterSpace syntax), searched as ours is: split by inverted
    list when a batch has fewer queries than threads. The parameters are set before every call, so the
    same index serves several searchers."""
    import faiss

    ivf = faiss.extract_index_ivf(index)

    def search(batch: np.ndarray) -> np.ndarray:
        faiss.ParameterSpace().set_index_parameters(index, params)
        ivf.parallel_mode = 1 if len(batch) < faiss.omp_get_max_threads() else 0
        return index.search(batch, TOP_K)[1]

    return search


def deeper_autofaiss(params: str, factor: int) -> str:
    """autofaiss's chosen parameters with nprobe (and the HNSW quantizer's efSearch) `factor` times larger:
    what its index reaches when allowed more time than the 10 ms it was tuned to."""
    values = dict(item.split("=") for item in params.split(","))
    values["nprobe"] = str(int(values["nprobe"]) * factor)
    if "efSearch" in values:
        values["efSearch"] = str(max(int(values["efSearch"]), 2 * int(values["nprobe"])))
    return ",".join(f"{key}={value}" for key, value in values.items())


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


def measure(searchers: dict, query_sets: dict[str, tuple[np.ndarray, np.ndarray]], results: dict, args) -> None:
    """Each searcher's recall@10 on every query set ("recall_at_10<suffix>"), and its latency on the first set,
    one query and batches of 64, interleaved with the others."""
    import faiss

    for name, search in searchers.items():
        for suffix, (queries, exact_rows) in query_sets.items():
            results.setdefault(name, {})[f"recall_at_10{suffix}"] = 1.0 if name.startswith("exact") else recall(search(queries), exact_rows)
    timing_queries = next(iter(query_sets.values()))[0]
    for batch_size in (1, 64):
        batches = rotating_batches(timing_queries, batch_size)
        times = interleaved_ms({name: (lambda search=search, batches=batches: search(next(batches))) for name, search in searchers.items()},
                               repeats=args.repeats, warmup=2)
        for name, values in times.items():
            results[name][f"ms_per_query_{batch_size}"] = round(median(values) / batch_size, 3)
    results["threads"] = faiss.omp_get_max_threads()
    results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def exact_searcher(store):
    from clipsearch.search import Searcher

    exact = Searcher(store.paths, store.embeddings, assume_normalised=True)  # the mapped matrix, no copy
    return lambda batch: exact.exact_top_k(torch.from_numpy(batch), TOP_K)[1].numpy()


def ground_truth(store, query_sets: list[np.ndarray], results: dict) -> list[np.ndarray]:
    """Exact top-10 rows of each query set, from one scan of the mapped store."""
    from clipsearch.index import exact_neighbours

    started = time.perf_counter()
    exact_rows = exact_neighbours(store.embeddings, np.concatenate(query_sets), TOP_K)
    results["ground_truth_seconds"] = round(time.perf_counter() - started, 1)
    return np.split(exact_rows, np.cumsum([len(queries) for queries in query_sets])[:-1])


def compare(store, queries: np.ndarray, folder: Path, max_memory: int, args, tune_queries: np.ndarray | None = None) -> dict:
    """Exact ground truth from the mapped store, then each contender's recall@10, latency, build time and size."""
    results: dict = {"count": len(store), "dim": store.dim, "max_memory": max_memory, "queries": len(queries)}
    (exact_rows,) = ground_truth(store, [queries], results)
    ours, results["ours"] = build_ours(store, folder, max_memory)
    searchers = {"ours": lambda batch: ours.search(batch, TOP_K)[1]}
    if tune_queries is not None:
        tuned, results["ours, tuned on train captions"] = build_ours(store, folder, max_memory, tune_queries, "index-captions.faiss")
        searchers["ours, tuned on train captions"] = lambda batch: tuned.search(batch, TOP_K)[1]
    if not args.no_autofaiss:
        theirs, results["autofaiss"] = build_autofaiss(store, folder, max_memory)
        searchers["autofaiss"] = autofaiss_searcher(theirs, results["autofaiss"]["params"])
    searchers["exact (mmap fp16)"] = exact_searcher(store)
    measure(searchers, {"": (queries, exact_rows)}, results, args)
    return results


def compare_gap(store, space: ClipLikeSpace, folder: Path, max_memory: int, args) -> dict:
    """Text queries (and fresh image queries) on CLIP-like vectors: ours tuned on image rows (the old default)
    and on other text queries (the new one), autofaiss at the same budget, and ours at autofaiss's size."""
    texts = text_queries(space, store, args.queries, seed=11)
    tune_texts = text_queries(space, store, args.tune_queries, seed=12)  # other captions than the measured ones
    images = next(space.images(args.queries, seed=13))
    results: dict = {"count": len(store), "dim": store.dim, "max_memory": max_memory, "queries": len(texts),
                     "tune_queries": len(tune_texts), "cosines": describe(space)}
    exact_texts, exact_images = ground_truth(store, [texts, images], results)
    searchers = {}
    contenders = (("ours, tuned on image rows", None, "index-rows"), ("ours, tuned on text queries", tune_texts, "index"))
    for name, tune, stem in contenders[1:] if args.skip_rows_tuning else contenders:
        file = f"{stem}-{args.nlist}.faiss" if args.nlist else f"{stem}.faiss"  # another list count keeps its own file
        built, results[name] = build_ours(store, folder, max_memory, tune, file, args.nlist)
        searchers[name] = lambda batch, built=built: built.search(batch, TOP_K)[1]
    if not args.no_autofaiss:
        theirs, results["autofaiss"] = build_autofaiss(store, folder, max_memory)
        searchers["autofaiss"] = autofaiss_searcher(theirs, results["autofaiss"]["params"])
        for factor in args.autofaiss_deeper:
            deeper = deeper_autofaiss(results["autofaiss"]["params"], factor)
            name = f"autofaiss, nprobe x{factor}"
            results[name] = {**results["autofaiss"], "params": deeper}
            searchers[name] = autofaiss_searcher(theirs, deeper)
        if args.match_autofaiss:
            name = "ours, tuned on text queries, autofaiss's memory"
            built, results[name] = build_ours(store, folder, results["autofaiss"]["bytes"], tune_texts, "index-matched.faiss",
                                              args.nlist)
            searchers[name] = lambda batch, built=built: built.search(batch, TOP_K)[1]
    searchers["exact (mmap fp16)"] = exact_searcher(store)
    measure(searchers, {"_text": (texts, exact_texts), "_image": (images, exact_images)}, results, args)
    return results


class MemorySampler:
    """This process's peak resident memory, sampled from /proc/self/status: its own (anonymous) pages and the
    file pages it maps (the index's lists, the fp16 store), which the kernel can drop when memory is short."""

    FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}

    def __init__(self, interval: float = 0.1):
        import threading

        self.interval, self.peaks, self.stopped = interval, dict.fromkeys(self.FIELDS.values(), 0), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started, self.anon_peak_at = time.perf_counter(), 0.0  # when its own memory peaked: which phase

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in self.FIELDS:
                key, size = self.FIELDS[name], int(value.split()[0]) * 1024
                if key == "anon" and size > self.peaks[key]:
                    self.anon_peak_at = time.perf_counter() - self.started
                self.peaks[key] = max(self.peaks[key], size)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self._sample()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self._sample()

    def gb(self) -> dict:
        return {**{f"peak_{key}_gb": round(value / 2**30, 2) for key, value in self.peaks.items()},
                "peak_anon_at_seconds": round(self.anon_peak_at, 1)}


def build_rank(folder: str, rank: int, world_size: int, max_memory: int, tune_texts, description: str, threads: int) -> dict:
    """One rank of a parts build, in its own process (as torchrun would start it), with its peak memory."""
    import faiss

    from clipsearch.index import build_index_in_parts
    from clipsearch.mmap_store import open_store

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    with MemorySampler() as memory:
        store = open_store(folder)
        built = build_index_in_parts(store.embeddings, store.order_fingerprint, Path(folder) / "index.faiss", rank, world_size,
                                     max_memory=max_memory, rerank_rows=store.rows, queries=tune_texts,
                                     queries_description=description)
    return {"rank": rank, "seconds": round(time.perf_counter() - started, 1), **memory.gb(),
            **({"info": built.info} if built is not None else {})}


def search_process(folder: str, texts: np.ndarray, exact_rows: np.ndarray, repeats: int) -> dict:
    """A fresh process that opens the index as search does and answers text queries: its memory, recall and speed."""
    from clipsearch.index import load_index

    with MemorySampler() as memory:
        started = time.perf_counter()
        index = load_index(Path(folder) / "index.faiss")
        opened = time.perf_counter() - started
        started = time.perf_counter()
        index.search(texts[:1], TOP_K)
        first = time.perf_counter() - started
        found = np.concatenate([index.search(texts[start : start + 64], TOP_K)[1] for start in range(0, len(texts), 64)])
        timings = {}
        for batch_size in (1, 64):
            batches = rotating_batches(texts, batch_size)
            values = interleaved_ms({"ours": lambda batches=batches: index.search(next(batches), TOP_K)}, repeats, warmup=2)["ours"]
            timings[f"ms_per_query_{batch_size}"] = round(median(values) / batch_size, 3)
    return {"open_seconds": round(opened, 2), "first_query_ms": round(first * 1000, 1), "recall_at_10_text": recall(found, exact_rows),
            **timings, **memory.gb()}


def compare_parts(store, space: ClipLikeSpace, folder: Path, max_memory: int, args) -> dict:
    """Built in parts by `--ranks` processes into on-disk lists, then searched by a fresh process: memory of each, recall, speed."""
    import multiprocessing

    texts = text_queries(space, store, args.queries, seed=11)
    tune_texts = text_queries(space, store, args.tune_queries, seed=12)
    results: dict = {"count": len(store), "dim": store.dim, "max_memory": max_memory, "queries": len(texts),
                     "tune_queries": len(tune_texts), "ranks": args.ranks, "store_bytes": len(store) * store.dim * 2}
    (exact_texts,) = ground_truth(store, [texts], results)
    spawn = multiprocessing.get_context("spawn")
    if args.search_only:  # the index of an earlier run, as it lies: only a fresh search process is measured
        from clipsearch.index import load_index

        info = load_index(folder / "index.faiss").info
        if info["order_fingerprint"] != store.order_fingerprint:
            raise SystemExit(f"{folder / 'index.faiss'} was built on other vectors; run --part parts without --search_only")
        results["search_only"] = True
    else:
        results.update(build_parts(store, folder, max_memory, tune_texts, args, spawn))
        info = results["ranks_memory"][0].pop("info")
    results["index"] = {key: info.get(key) for key in ("factory", "params", "index_bytes", "built_in_parts", "phase_seconds",
                                                       "text_recall_at_10", "image_recall_at_10", "tuned_on", "recall_lower_bound")}
    with spawn.Pool(1) as pool:
        results["search"] = pool.apply(search_process, (str(folder), texts, exact_texts, args.repeats))
    results["disk_free_gb"] = round(shutil.disk_usage(folder).free / 2**30, 1)
    return results


def build_parts(store, folder: Path, max_memory: int, tune_texts: np.ndarray, args, spawn) -> dict:
    """`--ranks` processes build the index in parts, as torchrun would start them: their time and memory."""
    from clipsearch.index import IVFDATA_SUFFIX

    for old in folder.glob(f"index*{IVFDATA_SUFFIX}"):
        old.unlink()
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    description = f"{len(tune_texts)} generated captions"
    started = time.perf_counter()
    with spawn.Pool(args.ranks) as pool:
        ranks = pool.starmap(build_rank, [(str(folder), rank, args.ranks, max_memory, tune_texts if rank == 0 else None,
                                           description, threads) for rank in range(args.ranks)])
    return {"build_seconds": round(time.perf_counter() - started, 1), "ranks_memory": ranks}


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


def gap_table(result: dict) -> str:
    rows = []
    for name, row in result.items():
        if not isinstance(row, dict) or "ms_per_query_1" not in row:
            continue
        memory = f"{row['bytes'] / 2**20:,.1f} MB" if "bytes" in row else f"{result['count'] * result['dim'] * 2 / 2**20:,.0f} MB on disk"
        layout = row.get("layout", "fp16 matrix") + (" + exact re-rank" if row.get("reranks") else "")
        settings = row.get("params") or ", ".join(f"{label} {row[key]}" for label, key in (("nprobe", "nprobe"), ("depth", "rerank_factor"))
                                                  if row.get(key))
        recorded = (f"{row['recorded_text_recall'] or '-'} / {row['recorded_image_recall']}" if "recorded_image_recall" in row else "-")
        rows.append([name, layout, memory, row.get("build_seconds", "-"), settings or "-", recorded,
                     f"**{row['recall_at_10_text']:.3f}**", f"{row['recall_at_10_image']:.3f}",
                     f"{row['ms_per_query_1']:.2f}", f"{row['ms_per_query_64']:.2f}"])
    columns = ["index", "layout", "memory", "build s", "search settings", "index.json: text / image",
               "recall@10, text queries", "recall@10, image queries", "ms/query (1)", "ms/query (64 batch)"]
    return "\n".join(common.markdown_table(columns, rows, "llrrlrrrrr"))


def peak_time(rank: dict) -> str:
    return f" at {rank['peak_anon_at_seconds']:,.0f} s" if "peak_anon_at_seconds" in rank else ""  # older runs lack it


def parts_lines(result: dict) -> list[str]:
    index, search = result["index"], result["search"]
    phases = index.get("phase_seconds") or {}
    params = index["params"]
    searched = [
        f"- Search process (fresh, index memory-mapped): opened in {search['open_seconds']} s, first query {search['first_query_ms']} ms; "
        f"recall@10 **{search['recall_at_10_text']:.3f}** on {result['queries']} other text queries; "
        f"**{search['ms_per_query_1']:.2f} ms/query** one at a time, {search['ms_per_query_64']:.2f} ms/query in batches of 64; "
        f"peak {search['peak_rss_gb']} GB ({search['peak_anon_gb']} GB its own, {search['peak_file_gb']} GB mapped file pages).",
    ]
    if result.get("search_only"):
        return [f"- The index an earlier run built ({index['factory']}, nprobe {params.get('nprobe')}, re-rank depth "
                f"{params.get('rerank_factor')}), searched again by a fresh process; exact ground truth of the "
                f"{result['queries']} scored queries took {result['ground_truth_seconds']:,.0f} s.", *searched]
    ranks = "; ".join(f"rank {rank['rank']}: {rank['seconds']:,.0f} s, peak {rank['peak_rss_gb']} GB "
                      f"({rank['peak_anon_gb']} GB its own{peak_time(rank)}, {rank['peak_file_gb']} GB mapped file pages)"
                      for rank in result["ranks_memory"])
    return [
        f"- Layout: {index['factory']} + exact re-rank, nprobe {params.get('nprobe')}, re-rank depth {params.get('rerank_factor')}; "
        f"{index['built_in_parts']['parts']} parts from {index['built_in_parts']['ranks']} ranks merged into on-disk lists; "
        f"index {index['index_bytes'] / 2**30:,.2f} GB on disk, fp16 store {result['store_bytes'] / 2**30:,.1f} GB.",
        f"- Build: {result['build_seconds']:,.0f} s wall (train {phases.get('train', '-')} s, add by rank "
        f"{phases.get('add_by_rank')} s, merge {phases.get('merge', '-')} s, recall and tuning {phases.get('recall', '-')} s); "
        f"exact ground truth of the {result['queries']} scored queries took {result['ground_truth_seconds']:,.0f} s more.",
        f"- Build memory: {ranks}.",
        f"- Recorded in index.json: recall@10 {index['text_recall_at_10']} on {result['tune_queries']} text queries it tuned on"
        + (f" (lower bound {index['recall_lower_bound']})" if index.get("recall_lower_bound") else "")
        + f", {index['image_recall_at_10']} on held-out image rows.",
        *searched,
    ]


def render(all_results: dict) -> str:
    parts = ["## Index (memory budget, recall against exact search)", "",
             "`benchmarks/bench_index.py`. Recall@10 is measured against exact search on queries that are not "
             "collection rows; both indexes are loaded memory-mapped, as search opens them. autofaiss 2.18 "
             "(installed for the benchmark only) gets the same vectors through our clip-retrieval export and "
             "the same budget, and runs in the same process, interleaved, on the same threads. Memory is the "
             "index file that faiss maps; IVF-PQ re-ranks top-k x its depth candidates from the fp16 matrix on disk. "
             "Peak memory is the process's RSS, which counts the pages of mapped files it touched. The parts "
             "up to 1M ran while the 2 cores were shared with other jobs (load averages near 6): their latencies "
             "are pessimistic. Only figures of the same run compare. The CLIP-like parts use "
             "`benchmarks/clip_like.py`: image vectors with a common mean and a power-law spectrum over all "
             "512 directions, text queries shifted from their target image by a fixed gap vector plus noise."]
    for part, result in all_results.items():
        command = [f"Command: `{result['command']}`", ""] if "command" in result else []  # older parts lack it
        heading = (f"### {part}: {result['count']:,} x {result['dim']}, budget {result['max_memory'] / 2**20:,.1f} MB, "
                   f"{result['queries']} queries" if "max_memory" in result else f"### {part}")
        if "gap" in result:
            gap = result["gap"]
            cosines = gap["cosines"]
            parts += ["", heading, "", *command, machine_lines(result), gap_table(gap), "",
                      f"Mean cosines of the generated space: image pair {cosines['image_pair']}, text-target "
                      f"{cosines['text_target']}, text-random image {cosines['text_random_image']}, text pair "
                      f"{cosines['text_pair']}. Ours tunes on {gap['tune_queries']} text queries whose targets differ "
                      f"from the {gap['queries']} scored ones; image queries are fresh draws. Peak memory of the whole "
                      f"run: {gap['peak_rss_gb']} GB."]
            if "autofaiss" in gap:
                parts.append(f"autofaiss parameters: `{gap['autofaiss']['params']}`.")
        elif "parts" in result:
            parts += ["", heading, "", *command, machine_lines(result), *parts_lines(result["parts"])]
        elif "compare" not in result:  # a startup-only run
            parts += ["", f"### {part}", "", *command, machine_lines(result), startup_line(result["startup"])]
            continue
        else:
            parts += ["", heading, "", *command, machine_lines(result), table(result["compare"]), ""]
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
    global REUSE
    args = parse_args(argv)
    REUSE = args.reuse
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
    elif args.part in ("gap", "parts"):
        space = ClipLikeSpace(clusters=args.clusters)
        folder = work_dir / f"clip-like-{args.count}"
        store = gap_store(args, space, folder)
        max_memory = memory_size(args.max_memory) if args.max_memory else len(store) * 200
        name = (f"CLIP-like, {args.count:,} vectors, text queries" if args.part == "gap"
                else f"Built in parts, {args.count:,} CLIP-like vectors")
    else:
        folder, tune_queries = work_dir / f"synthetic-{args.count}", None
        store = synthetic_store(args, folder)
        queries = next(clustered_vectors(args.queries, args.clusters, args.intrinsic_dim))  # fresh draws
        max_memory = memory_size(args.max_memory) if args.max_memory else len(store) * 200
        name = f"Generated, {args.count:,} vectors ({args.clusters:,} Zipf clusters in a {args.intrinsic_dim}-d subspace)"
    name += f", {args.part_suffix}" if args.part_suffix else ""
    if args.part == "gap":
        result = {**started, "gap": compare_gap(store, space, folder, max_memory, args)}
    elif args.part == "parts":
        result = {**started, "parts": compare_parts(store, space, folder, max_memory, args)}
    else:
        result = {**started, "compare": compare(store, queries, folder, max_memory, args, tune_queries)}
    result.update(count=len(store), dim=store.dim, max_memory=max_memory, load_average_end=load_average(),
                  queries=args.queries if args.part in ("gap", "parts") else len(queries))
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
