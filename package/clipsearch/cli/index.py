"""Build a faiss index over an embedding folder within a memory budget: `python -m clipsearch.cli.index --emb_path <folder> --max_memory 4GB`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from clipsearch.cli.common import (
    DEFAULT_EMB_PATH,
    CommandParser,
    UserError,
    add_column_args,
    non_negative_int,
    positive_int,
    recorded_dataset,
    run_command,
    unit_fraction,
)
from clipsearch.model_reference import HELP as LOAD_MODEL_HELP

KINDS = ("auto", "flat", "ivf", "ivf_sq8", "ivf_pq", "ivf_pq_fast", "hnsw")  # clipsearch.index.KINDS, without importing faiss
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

EPILOG = """\
--kind auto takes the most accurate layout that fits --max_memory: flat below 50,000 vectors, then
IVF with full vectors, IVF with 8-bit codes, IVF-PQ with fewer and fewer bytes a vector (an HNSW
coarse quantizer from 16,384 lists). IVF-PQ re-scores its candidates exactly from the memory-mapped
fp16 store it writes to <emb_path>/consolidated/.

Recall@10 against exact search is measured on the queries search will get: text. The captions of
the dataset the folder was encoded from (its tables), made up to --recall_queries with a shipped
bank of generic photo captions, are encoded with the model that encoded the folder; nprobe (and
IVF-PQ's re-rank depth) is set to the cheapest that reaches --target_recall on them. Recall on
--recall_queries held-out image rows is measured too; both go to index.json. Without a model to
load, the tuning falls back to image rows and index.json says so.

When the index and its training sample do not fit --max_memory together, or with --on_disk, or
when started as several ranks (torchrun's RANK/WORLD_SIZE, or srun's SLURM_PROCID and
SLURM_STEP_NUM_TASKS), the index is built in parts: rank 0 trains on a sample, every rank adds its
slice of rows, and rank 0 merges the parts into on-disk inverted lists (<out>.<token>.ivfdata,
memory-mapped by search). Every rank must see the embedding folder.
  torchrun --nproc_per_node 8 -m clipsearch.cli.index --emb_path <folder> --max_memory 64GB
"""
# Flags passed to `index.build_index` and `index.build_index_in_parts` under their own names.
BUILD_FLAGS = ("max_memory", "kind", "nlist", "nprobe", "recall_queries", "target_recall")


def memory_size(text: str) -> int:
    """Bytes in '4GB', '512MB', '1.5G' or a plain number (binary units: 1GB = 2**30 bytes)."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = cleaned[-1:] if cleaned[-1:].isalpha() else ""
    try:
        value = float(cleaned[: len(cleaned) - len(unit)]) * UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {text!r}")
    return int(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="python -m clipsearch.cli.index", description=__doc__, epilog=EPILOG)
    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default=DEFAULT_EMB_PATH, help="folder of embedding shards to index")
    data.add_argument("--out", default=None, help="index file to write (default: <emb_path>/index.faiss)")
    index = parser.add_argument_group("index")
    index.add_argument("--max_memory", type=memory_size, default=None,
                       help="memory budget of the index and of each process that builds it, e.g. 4GB (default: no limit)")
    index.add_argument("--kind", default="auto", choices=KINDS, help="index layout; auto picks the best that fits --max_memory")
    index.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: 2*sqrt(N) as a power of two)")
    index.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists scanned per query (default: tuned to --target_recall)")
    index.add_argument("--ef_search", type=positive_int, default=128, help="HNSW search beam width")
    index.add_argument("--on_disk", action="store_true",
                       help="build in parts into on-disk inverted lists even when the build fits in memory")
    recall = parser.add_argument_group("recall (queries to measure and tune on)")
    recall.add_argument("--load_model", default=None,
                        help="the model that encodes the captions the index is tuned on (default: the one that encoded "
                        "--emb_path, as its model.json records); " + LOAD_MODEL_HELP)
    add_column_args(recall)
    recall.add_argument("--recall_queries", type=non_negative_int, default=500,
                        help="text queries, and held-out image rows, to measure recall@10 on (0: skip)")
    recall.add_argument("--tune_queries", default=None,
                        help=".npy file of query embeddings [n, d] to tune and measure on, instead of encoded captions")
    recall.add_argument("--tune_on", choices=("text", "images"), default="text",
                        help="tune for text queries (captions), or for image queries (held-out rows) when the "
                             "collection is searched by image")
    recall.add_argument("--target_recall", type=unit_fraction, default=0.95, help="recall@10 the nprobe tuning aims for")
    args = parser.parse_args(argv)
    check_emb_path(args.emb_path)
    if args.tune_queries and not Path(args.tune_queries).is_file():
        raise UserError(f"--tune_queries {args.tune_queries} not found; save query embeddings with numpy.save")
    if args.tune_queries and args.tune_on == "images":
        parser.error("--tune_queries gives the queries to tune on; leave out --tune_on images")
    return args


def check_emb_path(emb_path: str) -> None:
    if not Path(emb_path).is_dir():
        raise UserError(f"--emb_path {emb_path} is not a folder; encode images first with 2_inference_encode.sh")


def ranks_from_env(env) -> tuple[int, int]:
    """(rank, world size) a launcher gave this process: torchrun's RANK/WORLD_SIZE, srun's
    SLURM_PROCID/SLURM_STEP_NUM_TASKS (set per step, so a batch script's own shell stays one rank), else (0, 1)."""
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if env.get(rank_name, "").isdigit() and env.get(size_name, "").isdigit():
            rank, world_size = int(env[rank_name]), int(env[size_name])
            if not 0 <= rank < world_size:
                raise UserError(f"{rank_name}={rank} is not a rank of {size_name}={world_size}")
            return rank, world_size
    return 0, 1


def share_cores(env, world_size: int) -> None:
    """Ranks started on one machine (torchrun's LOCAL_WORLD_SIZE, srun's SLURM_STEP_TASKS_PER_NODE) split its
    cores: faiss's and torch's threads, oversubscribed, slow every rank down."""
    local = next((env[name].split("(")[0] for name in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE")
                  if env.get(name, "").split("(")[0].isdigit()), "1")
    if world_size > 1 and int(local) > 1:
        import faiss
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(local))
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)


def consolidated_store(emb_path: str, rank: int = 0):
    """The folder's memory-mapped fp16 store: rank 0 builds it first if the shards changed, other ranks wait for it."""
    from clipsearch.index import WAIT_SECONDS, wait_for
    from clipsearch.mmap_store import consolidate, open_store

    try:
        if rank == 0:
            return consolidate(emb_path)
        wait_for(lambda: open_store(emb_path) is not None, f"rank 0 to consolidate {emb_path}", WAIT_SECONDS)
        return open_store(emb_path)
    except (FileNotFoundError, ValueError) as error:  # no shards, unreadable shards, no live rows
        raise UserError(str(error)) from None


def given_queries(path: str, dim: int):
    import numpy as np

    queries = np.load(path, allow_pickle=False)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise UserError(f"--tune_queries {path} holds shape {queries.shape}, expected [n, {dim}]")
    return queries, f"{len(queries)} given queries ({path})"


def collection_captions(emb_path: str, count: int, image_column: str, caption_column: str) -> tuple[list[str], str]:
    """Up to `count` captions of the tables of the dataset the folder was encoded from, and where they came from."""
    from clipsearch.querybank import bank_captions
    from clipsearch.tables import tables_present

    dataset = recorded_dataset(emb_path)
    if dataset is None or not Path(dataset).is_dir():
        return [], ""
    captions, splits = [], []
    for split in tables_present(dataset, ("dev", "test", "train")):  # the small tables first: one is often enough
        try:
            found = bank_captions(dataset, split, count - len(captions), image_column=image_column, caption_column=caption_column)
        except (FileNotFoundError, ValueError):  # a table without captions (encoding needs none)
            continue
        captions += found
        splits.append(split)
        if len(captions) >= count:
            break
    return captions, (f"{len(captions)} captions of {dataset} ({', '.join(splits)})" if captions else "")


def caption_queries(args: argparse.Namespace, store) -> tuple[object, str | None, str | None]:
    """(query vectors, their description, None), or (None, None, why not) when no model can encode captions.

    The model is --load_model, else the one model.json says encoded the folder; a recorded model
    that cannot be loaded (moved, or a bare folder of interchange shards that names none) leaves
    the tuning to image rows, and the reason goes to index.json. An explicit --load_model that
    fails is an error.
    """
    from clipsearch.checkpoint import model_fingerprint
    from clipsearch.index import generic_captions
    from clipsearch.models.released import load_model
    from clipsearch.querybank import encode_bank
    from clipsearch.search import check_encoded_with
    from clipsearch.store import MODEL_FILE, read_json

    recorded = read_json(Path(args.emb_path) / MODEL_FILE) or {}
    reference = args.load_model or recorded.get("load_model")
    if not reference:
        return None, None, f"{args.emb_path} records no model (no model.json) and no --load_model was given"
    try:
        bundle = load_model(reference)
        check_encoded_with(recorded, reference, model_fingerprint(bundle), args.emb_path)
        if bundle.embed_dim != store.dim:
            raise UserError(f"{reference} makes {bundle.embed_dim}-d embeddings but {args.emb_path} holds {store.dim}-d ones")
    except Exception as error:  # noqa: BLE001 - every way a model fails to load is the same answer
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if args.load_model:
            raise UserError(f"--load_model {args.load_model}: {reason}") from None
        return None, None, f"the recorded model {reference} could not be used: {reason}"
    captions, source = collection_captions(args.emb_path, args.recall_queries, args.image_column, args.caption_column)
    generic = generic_captions(args.recall_queries - len(captions))
    if generic:
        source = ", ".join(filter(None, [source, f"{len(generic)} generic captions (clipsearch/generic_captions.txt)"]))
    queries = encode_bank(bundle, captions + generic).numpy()
    return queries, f"{len(queries)} text queries: {source}, encoded with {reference}", None


def tuning_queries(args: argparse.Namespace, store) -> tuple[object, str | None, str | None]:
    """The queries to tune on (vectors, description) or the reason there are none, as index.json will say."""
    if args.recall_queries == 0 and not args.tune_queries:
        return None, None, "--recall_queries 0"
    if args.tune_queries:
        return (*given_queries(args.tune_queries, store.dim), None)
    if args.tune_on == "images":
        return None, None, "built with --tune_on images"
    return caption_queries(args, store)


def check_budget(args: argparse.Namespace, count: int, dim: int, world_size: int) -> bool:
    """Whether to build in parts; a --max_memory that no layout (or no part build) fits is one line, before any work."""
    from clipsearch.index import build_memory, in_memory_build_fits, plan_index

    try:
        plan = plan_index(count, dim, args.max_memory, args.kind, args.nlist, reranks=True)  # the store re-ranks
        in_parts = args.on_disk or world_size > 1 or not in_memory_build_fits(plan, count, dim, args.max_memory)
        if in_parts:
            plan = plan_index(count, dim, args.max_memory, args.kind, args.nlist, ivf_only=True)
            build_memory(plan, count, dim, args.max_memory, min(args.recall_queries, count), in_parts=True)
    except ValueError as error:
        raise UserError(str(error)) from None
    return in_parts


def describe(index, out: Path) -> str:
    info, params = index.info, index.info["params"]
    where = f" (lists in {info['ivfdata']})" if info.get("ivfdata") else ""
    lines = [f"wrote {info['factory']} index of {index.count:,} vectors, {info['index_bytes'] / 2**20:,.1f} MB, to {out}{where}"]
    settings = [f"{name} {params[key]}" for name, key in (("nprobe", "nprobe"), ("re-rank depth", "rerank_factor"),
                                                          ("ef_search", "ef_search")) if params.get(key)]
    recalls = [f"{info[f'{name}_recall_at_10']:.3f} on {info[f'{name}_queries']}" for name in ("text", "image")
               if info.get(f"{name}_queries")]
    if recalls:
        lines.append(f"recall@10 {'; '.join(recalls)}" + (f" ({', '.join(settings)})" if settings else ""))
    lines.append(f"details: {out.with_suffix('.json')}")
    return "\n".join(lines)


def main(argv: list[str]):
    args = parse_args(argv)
    rank, world_size = ranks_from_env(os.environ)
    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(message)s" if world_size > 1 else "%(message)s")
    share_cores(os.environ, world_size)
    from clipsearch.durable import FolderLock
    from clipsearch.index import INDEX_FILE

    out = Path(args.out) if args.out else Path(args.emb_path) / INDEX_FILE
    if rank != 0:  # rank 0 holds the lock for the build; the others only write their parts
        return build(args, out, rank, world_size)
    # One build per index file: a second is refused in one line that names the first.
    with FolderLock(out.parent, out.name, "an index build"):
        return build(args, out, rank, world_size)


def build(args: argparse.Namespace, out: Path, rank: int, world_size: int):
    store = consolidated_store(args.emb_path, rank)
    in_parts = check_budget(args, len(store), store.dim, world_size)
    from clipsearch.index import build_index, build_index_in_parts

    queries, description, text_note = tuning_queries(args, store) if rank == 0 else (None, None, None)
    if text_note and args.tune_on == "text" and args.recall_queries:
        print(f"warning: tuning on image rows, not text queries: {text_note}", file=sys.stderr)
    layout = {name: getattr(args, name) for name in BUILD_FLAGS}
    measuring = {"queries": queries, "queries_description": description, "text_note": text_note}
    try:
        if in_parts:
            index = build_index_in_parts(store.embeddings, store.order_fingerprint, out, rank, world_size,
                                         rerank_rows=store.rows, **layout, **measuring)
        else:
            index = build_index(store.embeddings, store.order_fingerprint, rerank_rows=store.rows,
                                ef_search=args.ef_search, **layout, **measuring)
            index.save(out)
    except (ValueError, TimeoutError) as error:  # a budget no layout fits, or a rank that never came
        raise UserError(str(error)) from None
    if index is None:
        print(f"rank {rank} of {world_size}: parts written; rank 0 merges them into {out}")
        return None
    print(describe(index, out))
    warning = index.recall_warning() if index.info.get("text_recall_at_10") is not None else None
    recall = index.info.get("recall_at_10")
    if warning is None and recall is not None and recall < args.target_recall:
        warning = f"warning: recall@10 is {recall:.2f}; a larger --max_memory allows a more accurate layout"
    if warning:
        print(warning, file=sys.stderr)
    return index


if __name__ == "__main__":
    run_command(main)
