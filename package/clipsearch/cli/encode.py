"""Encode an image collection into L2-normalised embedding shards with a trained checkpoint."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from clipsearch.encoding.mapper import PRECISIONS
from clipsearch.model_reference import HELP, exit_on_bad_model

DEFAULT_DATASET = "dataset/sample"
EPILOG = """\
Output, in --emb_path:
  <rank>-<step>-<batch_size>.ckpt  shards {'path': [...], 'emb': FloatTensor[n, d], 'skipped': [...]};
                                   step counts --shard_size input images of that rank
  model.json                       model fingerprint and shard layout, written first: a folder never
                                   mixes models, and a resume must use the same layout
  errors-<rank>.tsv                images that were skipped, with the reason
  manifest.json                    written once every rank has finished: counts and model identity

A killed run is resumed by running the same command again: finished shards are kept.

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
to finish writes manifest.json. The image list is split into contiguous slices, one per rank:
every image is encoded exactly once.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="2_inference_encode.sh",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--load_model", default="models/latest/best.ckpt", help=HELP)
    model.add_argument(
        "--precision", default="32", choices=list(PRECISIONS), help="32, or autocast to 16-mixed / bf16-mixed"
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_path",
        default=DEFAULT_DATASET,
        help="an image folder (scanned recursively) or a dataset folder with <split>.tsv/.csv/.parquet tables",
    )
    data.add_argument(
        "--split",
        default="auto",
        help="'auto': the unique images of every table among train/dev/test, or a folder scan when there "
        "is none; 'folder': always scan; or comma-separated split names, e.g. train,dev",
    )
    data.add_argument("--emb_path", default=None, help="output folder for shards (default: <dataset_path>/emb)")
    data.add_argument(
        "--shard_size",
        type=int,
        default=10_000,
        help="input images per shard (10000 x 512-d is about 20 MB); also the unit of resuming",
    )
    data.add_argument("--batch_size", type=int, default=64, help="images per model call")
    data.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="image decoding processes per rank (default: CPU cores / devices - 1, at least 1, at most 8)",
    )

    trainer = parser.add_argument_group("processes and devices")
    trainer.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"], help="where the model runs")
    trainer.add_argument("--devices", type=int, default=1, help="processes per node (GPUs on a GPU node)")
    trainer.add_argument("--num_nodes", type=int, default=1, help="nodes of a multi-node run")
    trainer.add_argument(
        "--node_rank", type=int, default=0, help="this node's index when starting nodes by hand (0-based)"
    )

    program = parser.add_argument_group("program")
    program.add_argument(
        "--overwrite", action="store_true", help="delete the folder's earlier shards instead of resuming"
    )
    program.add_argument("--no_progress", action="store_true", help="hide the progress bar")

    args = parser.parse_args(argv)
    for name in ("batch_size", "shard_size", "devices", "num_nodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.node_rank < args.num_nodes:
        parser.error(f"--node_rank must be in 0..{args.num_nodes - 1}, got {args.node_rank}")
    if args.num_workers is None:
        # One core per rank stays with the model (its BLAS threads); the rest decode. On 2 cores one
        # decoder keeps up with EfficientNet-Lite0 (0.96 of model-only), two starve the model (0.92).
        args.num_workers = min(8, max(1, (os.cpu_count() or 1) // args.devices - 1))
    elif args.num_workers < 0:
        parser.error(f"--num_workers cannot be negative, got {args.num_workers}")
    if args.emb_path is None:
        args.emb_path = os.path.join(args.dataset_path, "emb")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exit_on_bad_model(args.load_model)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from clipsearch.encoding.runner import EncodeConfig, EncodingMismatchError, run

    config = EncodeConfig(
        load_model=args.load_model,
        dataset_path=args.dataset_path,
        emb_path=args.emb_path,
        split=args.split,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        precision=args.precision,
        accelerator=args.accelerator,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if os.path.normpath(args.dataset_path) == os.path.normpath(DEFAULT_DATASET):
        # The default dataset is generated on first use, as training does, so the scripts run in order.
        from clipsearch.sample_data import ensure_sample_dataset

        ensure_sample_dataset(DEFAULT_DATASET)
    try:
        return run(config, devices=args.devices, num_nodes=args.num_nodes, node_rank=args.node_rank)
    except (EncodingMismatchError, FileNotFoundError, ValueError) as error:
        if argv is not None:  # called from Python (tests, notebooks): let the caller see the exception
            raise
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
