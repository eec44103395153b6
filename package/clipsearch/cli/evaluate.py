"""Retrieval recall (R@1/5/10, median and mean rank, both directions) of a checkpoint on a dataset split."""
from __future__ import annotations

import json
from pathlib import Path

from clipsearch.cli.common import (
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    CommandParser,
    UserError,
    add_column_args,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from clipsearch.cli.train_args import check_dataset
from clipsearch.model_reference import HELP as LOAD_MODEL_HELP
from clipsearch.model_reference import check_model_reference, model_label, results_stem

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def parse_args(argv: list[str] | None = None):
    parser = CommandParser(description=__doc__ + "\n\nPrints a table and writes the results as JSON.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_path", default=DEFAULT_DATASET, help="dataset folder holding <split>.tsv/.csv/.parquet")
    data.add_argument("--split", default="dev", help="table to evaluate on, e.g. dev or test")
    data.add_argument("--batch_size", type=positive_int, default=64, help="images per batch (each brings all its captions)")
    data.add_argument("--num_workers", type=non_negative_int, default=2, help="DataLoader processes decoding images")
    add_column_args(data)
    ranking = parser.add_argument_group("ranking")
    ranking.add_argument("--querybank", default=None, metavar="SPLIT",
                         help="also score text->image querybank-normalised, as 3_inference_search.sh --querybank ranks: "
                              "each image's score corrected by how strongly the captions of this split (e.g. train) "
                              "point at it")
    ranking.add_argument("--querybank_size", type=positive_int, default=None,
                         help="captions of --querybank to use, drawn at random when it has more (default: 50000)")
    ranking.add_argument("--querybank_temperature", type=positive_float, default=None,
                         help="inverted-softmax temperature (default: the model's learnt logit scale, at most 100)")
    model = parser.add_argument_group("model")
    model.add_argument("--load_model", default=DEFAULT_MODEL, help=LOAD_MODEL_HELP)
    trainer = parser.add_argument_group("trainer")
    trainer.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="auto picks a CUDA GPU when there is one")
    trainer.add_argument("--devices", default="1", help="evaluation runs in one process on one device: 1 (or auto)")
    trainer.add_argument("--device", default=None, help="a torch device such as cuda:1; overrides --accelerator")
    program = parser.add_argument_group("program")
    program.add_argument("--out", default=None,
                         help="JSON file for the results (default: <checkpoint>.<dataset>.<split>.eval.json beside it)")
    args = parser.parse_args(argv)
    if args.devices not in ("1", "auto"):
        raise UserError(f"--devices {args.devices}: evaluation runs on one device; pass --devices 1")
    check_model_reference(args.load_model)
    columns = {"image_column": args.image_column, "caption_column": args.caption_column}
    check_dataset(args.dataset_path, args.split, shards_allowed=False, **columns)
    if args.querybank is not None:
        check_dataset(args.dataset_path, args.querybank, shards_allowed=False, **columns)
    elif args.querybank_size is not None or args.querybank_temperature is not None:
        raise UserError("--querybank_size and --querybank_temperature apply only with --querybank SPLIT")
    return args


def _device(args):
    import torch

    if args.device:
        return torch.device(args.device)
    cuda = torch.cuda.is_available()
    if args.accelerator in ("gpu", "cuda") and not cuda:
        raise UserError(f"--accelerator {args.accelerator}: no CUDA GPU here; pass --accelerator cpu")
    if args.accelerator == "mps":
        return torch.device("mps")
    return torch.device("cuda" if cuda and args.accelerator != "cpu" else "cpu")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from clipsearch.evaluate import default_output_path, evaluate, format_metrics
    from clipsearch.models.released import load_model
    from clipsearch.sample_data import prepare_default_sample

    device = _device(args)
    prepare_default_sample(args.dataset_path)  # the default dataset is generated on first use
    try:
        bundle = load_model(args.load_model)
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--load_model: {error} (pass a model checkpoint such as models/<run>/best.ckpt, "
                        "not an embedding shard)") from None
    bundle.model.to(device)
    try:
        result = evaluate(bundle, args.dataset_path, args.split, batch_size=args.batch_size,
                          num_workers=args.num_workers, device=device, querybank_split=args.querybank,
                          image_column=args.image_column, caption_column=args.caption_column,
                          querybank_size=args.querybank_size, querybank_temperature=args.querybank_temperature)
    except ValueError as error:
        raise UserError(str(error)) from None
    result = {"checkpoint": model_label(args.load_model), **result}
    out = Path(args.out) if args.out else default_output_path(results_stem(args.load_model), args.dataset_path, args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    from clipsearch.durable import atomic_write

    atomic_write(out, json.dumps(result, indent=2) + "\n")

    counts = result["counts"]
    print(
        f"{result['split']} split of {result['dataset']}: {counts['images']} images, "
        f"{counts['captions']} captions, {counts['skipped_images']} images skipped"
    )
    if counts["skipped"]:
        print("skipped: " + ", ".join(f"{count} {reason}" for reason, count in counts["skipped"].items()))
    if "querybank" in result:
        bank = result["querybank"]
        print(format_metrics(result["metrics_without_querybank"]))
        print(f"querybank-normalised text->image ({bank['captions']} {bank['split']} captions, "
              f"temperature {bank['temperature']:.1f}):")
    print(format_metrics(result["metrics"]))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    run_command(main)
