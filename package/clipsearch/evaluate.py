"""Retrieval recall of a model on a dataset split: each image encoded once, every caption encoded.

The command is `clipsearch/cli/evaluate.py` (4_evaluate.sh)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from clipsearch import querybank
from clipsearch.data import DataReport, read_table
from clipsearch.datasets import ImageGroupDataset, collate_groups
from clipsearch.metrics import RECALL_KS, retrieval_metrics
from clipsearch.models import ImageViews, ModelBundle, embed_images, model_device
from clipsearch.tables import CAPTION_COLUMN, IMAGE_COLUMN

logger = logging.getLogger(__name__)

DIRECTIONS = {"text_to_image": "text->image", "image_to_text": "image->text"}


def encode_groups(model: torch.nn.Module, batch: dict, device: torch.device | str | None = None,
                  views: ImageViews = ImageViews()) -> dict:
    """One batch of `collate_groups` encoded, as float32 tensors on the model's device.

    Returns {"image_ids" [B], "image_embeddings" [B, D], "caption_image_ids" [M], "text_embeddings"
    [M, D]}, ids being the dataset's image ids. Validation and `evaluate` both encode this way,
    with the model spec's `ImageViews` (`embed_images`).
    """
    device = device if device is not None else model_device(model)
    return {
        "image_ids": batch["image_ids"].to(device),
        "image_embeddings": embed_images(model, batch["images"].to(device), views),
        "caption_image_ids": batch["caption_image_ids"].to(device),
        "text_embeddings": model.encode_text(batch["tokens"].to(device)).float(),
    }


def concat_encoded(encoded: list[dict], embed_dim: int, device: torch.device | str) -> dict:
    """The batches of `encode_groups` as one dict of tensors (empty tensors for no batch)."""
    empty = {"image_ids": torch.zeros(0, dtype=torch.long, device=device),
             "image_embeddings": torch.zeros((0, embed_dim), device=device),
             "caption_image_ids": torch.zeros(0, dtype=torch.long, device=device),
             "text_embeddings": torch.zeros((0, embed_dim), device=device)}
    return {key: torch.cat([batch[key] for batch in encoded]) if encoded else value for key, value in empty.items()}


def _first_occurrences(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted unique keys, the row of each one's first occurrence, and each row's index into them."""
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    rows = torch.full((unique.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    rows = rows.scatter_reduce(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
    return unique, rows, inverse


def split_embeddings(encoded: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_ids [N], image_embeddings [N, D], text_embeddings [M, D], caption_rows [M]) from encoded groups.

    Each image keeps one row, in image-id order, and each caption the row of its image; the
    captions of one image stay in their table order. A
    distributed sampler pads the last batches with repeats of whole groups (an image with all
    its captions): an image seen k times brought each caption k times, so the first 1/k of
    them are kept.
    """
    image_ids, image_rows, _ = _first_occurrences(encoded["image_ids"])
    caption_ids = encoded["caption_image_ids"]
    _, _, caption_group = _first_occurrences(caption_ids)
    occurrences = torch.bincount(torch.searchsorted(image_ids, encoded["image_ids"]), minlength=image_ids.numel())
    # Each caption's rank among the captions of its image, in arrival order.
    order = torch.argsort(caption_group, stable=True)
    group_sizes = torch.bincount(caption_group)
    group_starts = torch.cumsum(group_sizes, 0) - group_sizes
    rank_in_group = torch.empty_like(order)
    rank_in_group[order] = torch.arange(order.numel(), device=order.device) - group_starts[caption_group[order]]
    caption_rows = torch.searchsorted(image_ids, caption_ids)
    keep = rank_in_group < group_sizes[caption_group] // occurrences[caption_rows]
    return image_ids, encoded["image_embeddings"][image_rows], encoded["text_embeddings"][keep], caption_rows[keep]


class EncodedSplit(NamedTuple):
    image_embeddings: torch.Tensor  # [N, D], float32 on the CPU, not normalised
    text_embeddings: torch.Tensor  # [M, D]
    caption_image_ids: torch.Tensor  # [M]: each caption's row in image_embeddings
    report: DataReport  # table rows and images that were skipped
    listed_images: int  # unique images the table listed, read or not


@torch.no_grad()
def encode_split(
    bundle: ModelBundle,
    dataset_path: str | os.PathLike,
    split: str = "dev",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> EncodedSplit:
    """Encode every unique image of a split once and all of its captions.

    Images that fail to load are left out with their captions, so the metrics are over what
    could be read; the report says how much that was.
    """
    report = DataReport()
    table = read_table(dataset_path, split, image_column, caption_column, report=report)
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
    encoded = []
    try:
        for batch in loader:
            report.merge(batch["skipped"])
            report.merge(batch["conversions"])
            if batch["image_paths"]:
                encoded.append({key: value.cpu() for key, value in
                                encode_groups(model, batch, device, bundle.image_views).items()})
    finally:
        model.train(was_training)
    if not encoded:
        raise ValueError(f"{dataset_path}: no image of split {split!r} could be read ({report.summary()})")
    _, image_embeddings, text_embeddings, caption_rows = split_embeddings(concat_encoded(encoded, bundle.embed_dim, "cpu"))
    return EncodedSplit(image_embeddings, text_embeddings, caption_rows, report, len(dataset))


def evaluate(bundle: ModelBundle, dataset_path: str | os.PathLike, split: str = "dev",
             querybank_split: str | None = None, querybank_size: int | None = None,
             querybank_temperature: float | None = None, **encode_options) -> dict:
    """Retrieval metrics of `bundle` on a split, with the counts they were computed over.

    `encode_options` (batch_size, num_workers, device) go to `encode_split`. Returns {"dataset",
    "split", "metrics": retrieval_metrics(...), "counts": {"images", "captions", "skipped_images",
    "skipped": {reason: n}, "conversions": {mode: n}}}, where "skipped" also counts table rows
    dropped for an empty or unreadable caption or path.

    With `querybank_split` (a split of the same dataset, e.g. train), text->image ranks are
    querybank-normalised as `3_inference_search.sh --querybank` ranks them (querybank.py):
    "metrics" are those, "metrics_without_querybank" the plain cosine ones, and "querybank" says
    how many captions of which split made the bank, at which temperature.
    """
    image_embeddings, text_embeddings, caption_image_ids, report, table_images = encode_split(
        bundle, dataset_path, split, **encode_options
    )
    metrics = retrieval_metrics(image_embeddings, text_embeddings, caption_image_ids)
    result = {"dataset": str(Path(dataset_path).resolve()), "split": split, "metrics": metrics}
    if querybank_split is not None:
        columns = {name: encode_options[name] for name in ("image_column", "caption_column") if name in encode_options}
        captions = querybank.bank_captions(dataset_path, querybank_split, querybank_size or querybank.DEFAULT_BANK_SIZE,
                                           **columns)
        bank = querybank.encode_bank(bundle, captions, encode_options.get("device"))
        temperature = querybank_temperature or querybank.model_temperature(bundle.model)
        bias = querybank.hub_bias(image_embeddings, bank, temperature)
        result["metrics"] = retrieval_metrics(image_embeddings, text_embeddings, caption_image_ids, image_bias=bias)
        result["metrics_without_querybank"] = metrics
        result["querybank"] = {"split": querybank_split, "captions": len(captions), "temperature": temperature}
    result["counts"] = {
        "images": int(image_embeddings.shape[0]),
        "captions": int(text_embeddings.shape[0]),
        "skipped_images": table_images - int(image_embeddings.shape[0]),
        "skipped": report.skipped(),
        "conversions": report.conversions(),
    }
    return result


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
