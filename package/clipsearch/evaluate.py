"""Retrieval recall of a model on a dataset split: each image encoded once, every caption encoded.

The command is `clipsearch/cli/evaluate.py` (4_evaluate.sh)."""
from __future__ import annotations

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
    # The caller may hold the model in training mode: dropout must be off here and the mode put back after.
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
