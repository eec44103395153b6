"""Retrieval recall of a model on a dataset split: each image encoded once, every caption encoded."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clipsearch.data import DataReport, read_table
from clipsearch.datasets import ImageGroupDataset, collate_groups
from clipsearch.metrics import RECALL_KS, retrieval_metrics
from clipsearch.models import ModelBundle

logger = logging.getLogger(__name__)

DIRECTIONS = {"text_to_image": "text->image", "image_to_text": "image->text"}


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def encode_split(
    bundle: ModelBundle,
    dataset_path: str | os.PathLike,
    split: str = "dev",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DataReport]:
    """Encode every unique image of a split once and all of its captions.

    Returns image_embeddings [N, D] and text_embeddings [M, D] (float32 on the CPU, not
    normalised), caption_image_ids [M] (each caption's row in image_embeddings) and the report of
    rows and images that were skipped. Images that fail to load are left out with their captions,
    so the metrics are over what could be read; the report says how much that was.
    """
    return _encode(bundle, dataset_path, split, batch_size, num_workers, device)[:4]


@torch.no_grad()
def _encode(bundle, dataset_path, split, batch_size, num_workers, device):
    """encode_split, plus the number of unique images the table listed."""
    report = DataReport()
    table = read_table(dataset_path, split, report=report)
    if table.empty:
        raise ValueError(f"{dataset_path}: split {split!r} has no usable rows ({report.summary()})")
    dataset = ImageGroupDataset(table, bundle.eval_transform, bundle.tokenizer)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_groups
    )
    model = bundle.model
    device = torch.device(device) if device is not None else model_device(model)
    # Training calls this for validation mid-run; dropout must be off and the mode put back after.
    was_training = model.training
    model.eval()
    image_embeddings, text_embeddings, caption_image_ids = [], [], []
    row_of_image_id: dict[int, int] = {}
    try:
        for batch in loader:
            report.merge(batch["skipped"])
            report.merge(batch["conversions"])
            if not batch["image_paths"]:
                continue
            # Dataset image ids count skipped images too; rows of the result do not.
            for image_id in batch["image_ids"].tolist():
                row_of_image_id[image_id] = len(row_of_image_id)
            rows = [row_of_image_id[image_id] for image_id in batch["caption_image_ids"].tolist()]
            image_embeddings.append(model.encode_image(batch["images"].to(device)).float().cpu())
            text_embeddings.append(model.encode_text(batch["tokens"].to(device)).float().cpu())
            caption_image_ids.append(torch.tensor(rows, dtype=torch.long))
    finally:
        model.train(was_training)
    if not image_embeddings:
        raise ValueError(f"{dataset_path}: no image of split {split!r} could be read ({report.summary()})")
    return (
        torch.cat(image_embeddings), torch.cat(text_embeddings), torch.cat(caption_image_ids), report, len(dataset)
    )


def evaluate(
    bundle: ModelBundle,
    dataset_path: str | os.PathLike,
    split: str = "dev",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> dict:
    """Retrieval metrics of `bundle` on a split, with the counts they were computed over.

    Returns {"dataset", "split", "metrics": retrieval_metrics(...), "counts": {"images",
    "captions", "skipped_images", "skipped": {reason: n}, "conversions": {mode: n}}}, where
    "skipped" also counts table rows dropped for an empty or unreadable caption or path.
    """
    image_embeddings, text_embeddings, caption_image_ids, report, table_images = _encode(
        bundle, dataset_path, split, batch_size, num_workers, device
    )
    metrics = retrieval_metrics(image_embeddings, text_embeddings, caption_image_ids)
    return {
        "dataset": str(Path(dataset_path).resolve()),
        "split": split,
        "metrics": metrics,
        "counts": {
            "images": int(image_embeddings.shape[0]),
            "captions": int(text_embeddings.shape[0]),
            "skipped_images": table_images - int(image_embeddings.shape[0]),
            "skipped": report.skipped(),
            "conversions": report.conversions(),
        },
    }


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as a small table: one row per direction, recalls then median and mean rank."""
    columns = [f"R@{k}" for k in RECALL_KS] + ["MedR", "MeanR"]
    lines = [f"{'':<12}" + "".join(f"{column:>8}" for column in columns)]
    for key, label in DIRECTIONS.items():
        values = [metrics[f"{key}_R@{k}"] for k in RECALL_KS]
        values += [metrics[f"{key}_median_rank"], metrics[f"{key}_mean_rank"]]
        lines.append(f"{label:<12}" + "".join(f"{value:>8.2f}" for value in values))
    lines.append(f"mean recall {metrics['mean_recall']:.2f}")
    return "\n".join(lines)


def default_output_path(checkpoint: str | os.PathLike, dataset_path: str | os.PathLike, split: str) -> Path:
    """`<checkpoint>.<dataset>.<split>.eval.json` beside the checkpoint, so results stay with the model."""
    dataset = Path(dataset_path).resolve()
    # Prepared datasets live in dataset/<name>/data; "data" alone would not say which one.
    dataset_name = dataset.parent.name if dataset.name == "data" else dataset.name
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.{dataset_name}.{split}.eval.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_path", default="dataset/sample",
                      help="dataset folder holding <split>.tsv/.csv/.parquet (default: the generated sample data)")
    data.add_argument("--split", default="dev", help="table to evaluate on, e.g. dev or test")
    data.add_argument("--batch_size", type=int, default=64, help="images per batch (each brings all its captions)")
    data.add_argument("--num_workers", type=int, default=2, help="DataLoader processes decoding images")
    model = parser.add_argument_group("model")
    model.add_argument("--load_model", required=True, help="checkpoint written by any of the training scripts")
    model.add_argument("--device", default=None, help="torch device; None picks cuda when available, else cpu")
    program = parser.add_argument_group("program")
    program.add_argument(
        "--out", default=None, help="JSON file for the results; None writes <checkpoint>.<dataset>.<split>.eval.json"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.num_workers < 0:
        parser.error("--num_workers must be 0 or more")
    if not Path(args.dataset_path).is_dir():
        parser.error(f"--dataset_path {args.dataset_path} is not a folder (prepare one, e.g. dataset/flickr8k/prepare.py)")
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from clipsearch.checkpoint import load_bundle

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle = load_bundle(args.load_model)
    bundle.model.to(device)
    result = evaluate(bundle, args.dataset_path, args.split, args.batch_size, args.num_workers, device)
    result = {"checkpoint": str(Path(args.load_model).resolve()), **result}
    out = Path(args.out) if args.out else default_output_path(args.load_model, args.dataset_path, args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    counts = result["counts"]
    print(
        f"{result['split']} split of {result['dataset']}: {counts['images']} images, "
        f"{counts['captions']} captions, {counts['skipped_images']} images skipped"
    )
    if counts["skipped"]:
        print("skipped: " + ", ".join(f"{count} {reason}" for reason, count in counts["skipped"].items()))
    print(format_metrics(result["metrics"]))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
