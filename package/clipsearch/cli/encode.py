"""Encode an image collection into L2-normalised embedding shards with a trained checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from clipsearch.cli.common import (
    DEFAULT_DATASET,
    DEFAULT_DATASETS_DIR,
    DEFAULT_MODEL,
    PRECISIONS,
    CommandParser,
    UserError,
    add_column_args,
    non_negative_int,
    positive_int,
    recorded_dataset,
    run_command,
)
from clipsearch.defaults import is_default_dataset, same_path
from clipsearch.model_reference import HELP as LOAD_MODEL_HELP
from clipsearch.model_reference import check_model_reference
from clipsearch.tables import check_columns, encoding_splits, find_table, table_columns
from clipsearch.tars import is_remote, list_tars, looks_like_tars, tars_collection_name

EPILOG = """\
Output, in --emb_path:
  <rank>-<step>-<batch_size>.ckpt  shards {'path': [...], 'emb': FloatTensor[n, d], 'skipped': [...]}
                                   (+ per row 'stat' [size, mtime_ns] and 'digest' of the file's bytes, and
                                   'meta': the rows' fields as columns: size, mtime, taken (EXIF), width,
                                   height, and every other column of the tables, caption and url included);
                                   step counts --shard_size input images of that rank
  model.json                       the model (resolved checkpoint, its run, fingerprint): a folder never
                                   mixes models
  update-<n>.json                  one per run that changed the folder: the shards it writes and the
                                   images it drops. Only shards listed here are ever read
  manifest.json                    written once every rank has finished: counts and model identity
  errors.tsv, duplicates.tsv       images skipped (with the reason); images with the same bytes

Webdataset tars (img2dataset's output): each tar is encoded whole into one shard of its own, so a
tar is the unit of work, of ranks' shares and of resuming. A row is named <tar>#<key>; its fields are
the sample's caption (.txt), the top-level values of its .json (url, width, ...), tar and key. A bad
sample is listed in errors.tsv with its tar and key; a tar that cannot be read after 3 tries is named
at the end and the run exits non-zero, keeping every tar it finished. Running again encodes only
tars that are new or changed; tars left out of --dataset_path are dropped.

Running the same command again updates the folder: only new images and images whose size or
modification time changed are encoded, into new shards; deleted and changed images are dropped
from what search sees; old shards are never rewritten. A killed run is resumed the same way
(finished shards are kept). --overwrite starts from scratch. A file rewritten under the same size
and mtime (touch -r, a copy that keeps mtime) is caught only with --recheck_content, which reads
the bytes of every file to compare them with the stored digest.

Several processes:
  one machine      --devices 4                 (starts 4 processes itself)
  torchrun         torchrun --nproc_per_node 4 -m clipsearch.cli.encode ...
  SLURM, one task per device:
                   srun --nodes 2 --ntasks-per-node 4 bash 2_inference_encode.sh --devices 4 --num_nodes 2
                   (rank from SLURM_PROCID, world size from SLURM_NTASKS)
  SLURM, one task per node that starts the devices:
                   srun --nodes 2 --ntasks-per-node 1 bash 2_inference_encode.sh --devices 4 --num_nodes 2
                   (node rank from SLURM_NODEID)
  by hand          on each node: ... --devices 4 --num_nodes 2 --node_rank <0 or 1>
Set MASTER_ADDR/MASTER_PORT to end a multi-node run with a barrier; without them the last rank
to finish writes manifest.json. The images to encode are split into contiguous slices, one per
rank: every image is encoded exactly once.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="2_inference_encode.sh", description=__doc__, epilog=EPILOG)
    model = parser.add_argument_group("model")
    model.add_argument("--load_model", default=DEFAULT_MODEL, help=LOAD_MODEL_HELP)
    model.add_argument("--precision", default="32", choices=PRECISIONS, help="32, or autocast to 16-mixed / bf16-mixed")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_path",
        default=DEFAULT_DATASET,
        help="an image folder (scanned recursively), a dataset folder with <split>.tsv/.csv/.parquet tables, or "
        "webdataset tars: 'shards/{00000..00099}.tar', a glob, a folder of .tar files, or s3://, gs://, https:// "
        "URLs of them (quote the pattern); each sample's .txt and .json become its row's fields",
    )
    data.add_argument(
        "--split",
        default="auto",
        help="'auto': the unique images of every table among train/dev/test, or a folder scan when there "
        "is none; 'folder': always scan; or comma-separated split names, e.g. train,dev",
    )
    data.add_argument(
        "--emb_path",
        default=None,
        help="output folder for shards (default: dataset/<name of --dataset_path>/emb in this repository, "
        "or <dataset_path>/emb for a dataset inside the repository's dataset/ folder; never inside your "
        "own image folder unless you say so)",
    )
    data.add_argument(
        "--shard_size",
        type=positive_int,
        default=10_000,
        help="input images per shard (10000 x 512-d is about 20 MB); also the unit of resuming",
    )
    add_column_args(data)
    data.add_argument(
        "--captions",
        action="store_true",
        help="encode the tables' captions instead of their images, one row per distinct (image, caption), so "
        "an image query finds captions (image -> text); default --emb_path: the images' folder + '-captions'",
    )
    data.add_argument("--batch_size", type=positive_int, default=64, help="images per model call")
    data.add_argument(
        "--num_workers",
        type=non_negative_int,
        default=None,
        help="image decoding processes per rank (default: CPU cores / processes on the node - 1, at least 1, at most 8)",
    )

    trainer = parser.add_argument_group("processes and devices")
    trainer.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"], help="where the model runs")
    trainer.add_argument("--devices", type=positive_int, default=1, help="processes per node (GPUs on a GPU node)")
    trainer.add_argument("--num_nodes", type=positive_int, default=1, help="nodes of a multi-node run")
    trainer.add_argument(
        "--cpu_threads",
        type=positive_int,
        default=None,
        help="torch threads of each rank whose model runs on the CPU (default: CPU cores / processes on the node); "
        "fewer leave cores to the decoding workers and to other work",
    )
    trainer.add_argument(
        "--node_rank", type=non_negative_int, default=0, help="this node's index when starting nodes by hand (0-based)"
    )

    program = parser.add_argument_group("program")
    program.add_argument(
        "--overwrite", action="store_true", help="delete the folder's shards and records and encode everything again"
    )
    program.add_argument(
        "--recheck_content",
        action="store_true",
        help="on an update, also hash the files whose size and mtime are unchanged and re-encode those whose "
        "bytes differ from the stored digest; reads every file (I/O like a full pass), so it is off by default",
    )
    program.add_argument("--no_progress", action="store_true", help="hide the progress bar")

    args = parser.parse_args(argv)
    if args.node_rank >= args.num_nodes:
        parser.error(f"--node_rank must be in 0..{args.num_nodes - 1}, got {args.node_rank}")
    if args.captions and args.recheck_content:
        parser.error("--recheck_content reads image files; a caption's row is re-encoded whenever its text changes")
    if looks_like_tars(args.dataset_path) and (args.captions or args.recheck_content):
        parser.error(f"{'--captions' if args.captions else '--recheck_content'} does not apply to webdataset tars: "
                     "a tar is encoded again whenever its size or version changes, and each sample's caption is "
                     "kept as a field of its row")
    args.emb_path_is_default = args.emb_path is None
    if args.emb_path is None:
        args.emb_path = default_emb_path(args.dataset_path) + ("-captions" if args.captions else "")
    return args


def default_emb_path(dataset_path: str) -> str:
    """Where a collection's shards go when --emb_path is not given: a folder of the project's own.

    A dataset inside the project's dataset/ folder (the sample data, a prepared Flickr8k) keeps
    them in <dataset>/emb, as it always has; any other folder gets dataset/<its name>/emb, so
    encoding never writes into a user's photo folder unasked.
    """
    if looks_like_tars(dataset_path):
        return os.path.join(DEFAULT_DATASETS_DIR, tars_collection_name(dataset_path), "emb")
    dataset = os.path.abspath(dataset_path)
    datasets_dir = os.path.abspath(DEFAULT_DATASETS_DIR)
    if dataset.startswith(datasets_dir + os.sep):
        return os.path.join(dataset_path, "emb")
    name = os.path.basename(dataset.rstrip(os.sep)) or "root"
    return os.path.join(DEFAULT_DATASETS_DIR, name, "emb")


def check_default_emb_path(args: argparse.Namespace) -> None:
    """Say where the default --emb_path is, refusing one that already holds another folder's embeddings."""
    if not args.emb_path_is_default:
        return
    recorded = recorded_dataset(args.emb_path)
    if recorded is not None and not same_path(recorded, args.dataset_path):
        raise UserError(
            f"the default --emb_path {args.emb_path} holds the embeddings of {recorded}, not of "
            f"{args.dataset_path}; pass --emb_path <folder> for this one"
        )
    print(f"embeddings go to {args.emb_path} (--emb_path chooses another folder)", file=sys.stderr)


def check_inputs(args: argparse.Namespace) -> None:
    """Missing inputs answer at once, before torch and the model load."""
    if looks_like_tars(args.dataset_path):
        if not is_remote(args.dataset_path):  # listing a remote store waits for the run (and its retries)
            tars = list_tars(args.dataset_path)
            if not any(os.path.isfile(tar) for tar in tars):
                raise UserError(f"--dataset_path {args.dataset_path}: none of the {len(tars)} tars it names exists "
                                f"(the first: {tars[0]})")
    elif not os.path.isdir(args.dataset_path) and not is_default_dataset(args.dataset_path):
        raise UserError(f"--dataset_path {args.dataset_path} is not a folder; give an image folder or a dataset folder")
    if os.path.isdir(args.dataset_path) and not looks_like_tars(args.dataset_path):
        splits = encoding_splits(args.dataset_path, args.split)
        if args.captions and not splits:
            raise UserError(f"--captions encodes a table's captions; {args.dataset_path} has no train/dev/test "
                            "table (or name them with --split)")
        for split in splits:
            try:
                table = find_table(args.dataset_path, split)
            except FileNotFoundError:
                raise UserError(f"--split {split}: {args.dataset_path} holds no such table") from None
            check_columns(table, table_columns(table), args.image_column, args.caption_column if args.captions else None)
    check_model_reference(args.load_model)
    if os.path.exists(args.emb_path) and not os.path.isdir(args.emb_path):
        raise UserError(f"--emb_path {args.emb_path} is a file; give a folder for the shards")
    check_default_emb_path(args)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from clipsearch.encoding.launcher import run
    from clipsearch.encoding.runner import EncodeConfig

    # The default dataset is generated on first use, as training does, so the scripts run in order.
    from clipsearch.sample_data import prepare_default_sample

    prepare_default_sample(args.dataset_path)
    # The flags carry the config's names; only the progress switch is phrased the other way round.
    names = [field.name for field in dataclasses.fields(EncodeConfig) if field.name != "progress"]
    config = EncodeConfig(**{name: getattr(args, name) for name in names}, progress=not args.no_progress)
    return run(config, devices=args.devices, num_nodes=args.num_nodes, node_rank=args.node_rank)


if __name__ == "__main__":
    run_command(main)
