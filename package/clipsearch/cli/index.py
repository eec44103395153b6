"""Build a faiss index over an embedding folder within a memory budget: `python -m clipsearch.cli.index --emb_path <folder> --max_memory 4GB`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipsearch.cli.common import (
    DEFAULT_EMB_PATH,
    CommandParser,
    UserError,
    non_negative_int,
    positive_int,
    run_command,
    unit_fraction,
)

KINDS = ("auto", "flat", "ivf", "ivf_sq8", "ivf_pq", "hnsw")  # clipsearch.index.KINDS, without importing faiss
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

EPILOG = """\
--kind auto takes the most accurate layout that fits --max_memory: flat below 50,000 vectors, then
IVF with full vectors, IVF with 8-bit codes, IVF-PQ with fewer and fewer bytes a vector (an HNSW
coarse quantizer from 16,384 lists). IVF-PQ re-scores its candidates exactly from the memory-mapped
fp16 store it writes to <emb_path>/consolidated/. Recall@10 against exact search is measured on
collection rows held out of training, and nprobe is set to the smallest that reaches
--target_recall; both go to index.json beside the index.
"""
# Flags passed to `index.build_index` under their own names.
BUILD_FLAGS = ("max_memory", "kind", "nlist", "nprobe", "ef_search", "recall_queries", "target_recall")


def memory_size(text: str) -> int:
    """Bytes in '4GB', '512MB', '1.5G' or a plain number (binary units: 1GB = 2**30 bytes)."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = cleaned[-1:] if cleaned[-1:].isalpha() else ""
    try:
        value = float(cleaned[: len(cleaned) - len(unit)]) * UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="python -m clipsearch.cli.index", description=__doc__, epilog=EPILOG)
    data = parser.add_argument_group("data")
    data.add_argument("--emb_path", default=DEFAULT_EMB_PATH, help="folder of embedding shards to index")
    data.add_argument("--out", default=None, help="index file to write (default: <emb_path>/index.faiss)")
    index = parser.add_argument_group("index")
    index.add_argument("--max_memory", type=memory_size, default=None, help="memory budget of the index, e.g. 4GB (default: no limit)")
    index.add_argument("--kind", default="auto", choices=KINDS, help="index layout; auto picks the best that fits --max_memory")
    index.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: 2*sqrt(N) as a power of two)")
    index.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists scanned per query (default: tuned to --target_recall)")
    index.add_argument("--ef_search", type=positive_int, default=128, help="HNSW search beam width")
    program = parser.add_argument_group("program")
    program.add_argument("--recall_queries", type=non_negative_int, default=500, help="rows held out as queries to measure recall@10 (0: skip)")
    program.add_argument("--tune_queries", default=None,
                         help=".npy file of query embeddings [n, d] (e.g. encoded captions) to measure and tune recall on, "
                              "instead of held-out rows")
    program.add_argument("--target_recall", type=unit_fraction, default=0.95, help="recall@10 the nprobe tuning aims for")
    args = parser.parse_args(argv)
    check_emb_path(args.emb_path)
    if args.tune_queries and not Path(args.tune_queries).is_file():
        raise UserError(f"--tune_queries {args.tune_queries} not found; save query embeddings with numpy.save")
    return args


def check_emb_path(emb_path: str) -> None:
    if not Path(emb_path).is_dir():
        raise UserError(f"--emb_path {emb_path} is not a folder; encode images first with 2_inference_encode.sh")


def consolidated_store(emb_path: str):
    """The folder's memory-mapped fp16 store, built first if the shards changed; no shards is the user's to fix."""
    from clipsearch.mmap_store import consolidate

    try:
        return consolidate(emb_path)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None


def main(argv: list[str]):
    args = parse_args(argv)
    from clipsearch.durable import FolderLock
    from clipsearch.index import INDEX_FILE

    out = Path(args.out) if args.out else Path(args.emb_path) / INDEX_FILE
    # One build per index file: a second is refused in one line that names the first.
    with FolderLock(out.parent, out.name, "an index build"):
        return build(args, out)


def build(args: argparse.Namespace, out: Path):
    from clipsearch.index import build_index

    store = consolidated_store(args.emb_path)
    queries = None
    if args.tune_queries:
        import numpy as np

        queries = np.load(args.tune_queries, allow_pickle=False)
        if queries.ndim != 2 or queries.shape[1] != store.dim:
            raise UserError(f"--tune_queries {args.tune_queries} holds shape {queries.shape}, expected [n, {store.dim}]")
    try:
        layout = {name: getattr(args, name) for name in BUILD_FLAGS}
        index = build_index(store.embeddings, store.order_fingerprint, rerank_rows=store.rows, queries=queries, **layout)
    except ValueError as error:  # the budget cannot hold any layout
        raise UserError(str(error)) from None
    index.save(out)
    print(f"wrote {index.info['factory']} index of {index.count:,} vectors to {out}: {json.dumps(index.info)}")
    recall = index.info.get("recall_at_10")
    if recall is not None and recall < args.target_recall:
        print(f"warning: recall@10 is {recall:.2f}; a larger --max_memory allows a more accurate layout")
    return index


if __name__ == "__main__":
    run_command(main)
