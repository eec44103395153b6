"""Querybank normalisation: a per-image correction for hubs, images that rank high for many queries.

In a joint embedding space some images sit close to a large share of all captions. They come up
for queries they do not answer, and push the right image down. Querybank normalisation (Bogolin
et al., "Cross Modal Retrieval with Querybank Normalisation", CVPR 2022) measures each gallery
image against a bank of typical queries, here the captions of a training split, and ranks by the
inverted softmax (Smith et al. 2017): a query's score for image j divided by how strongly the
whole bank points at j,

    exp(t * s(q, j)) / mean_b exp(t * s(b, j)).

Its logarithm over t is the cosine s(q, j) plus a bias that depends on the image alone,

    bias_j = -log(mean_b exp(t * s(b, j))) / t,

so the bias is computed once per image, stored beside the shards, and search adds it to the
cosine: no query costs more. The temperature t is the model's own learnt logit scale, the
sharpness it was trained to turn cosines into probabilities with, so nothing is tuned on the
split being scored. Image->text ranking is unchanged: an image's bias moves all its scores alike.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipsearch.durable import atomic_write
from clipsearch.errors import UserError
from clipsearch.tables import CAPTION_COLUMN, IMAGE_COLUMN, read_table

QUERYBANK_FILE = "querybank.pt"
# Captions drawn for the bank, at most. On Flickr8k dev (two models, two random draws each) 10,000
# of the 30,000 training captions came within 0.3 points of all of them (text->image R@1 and
# R@10), and 1,000 lost up to 2.2 R@1, so any training split up to this size is taken whole.
DEFAULT_BANK_SIZE = 50_000
# The temperature when the model has none, or one beyond OpenAI CLIP's clamp.
DEFAULT_TEMPERATURE = 100.0
# Gallery rows scored against the bank at a time: [bank, rows] float32 scores, 200 MB at 50,000 x 1,024.
BIAS_CHUNK_ROWS = 1024
# Captions a text-encoder call takes while encoding the bank (the model buckets them by length).
BANK_ENCODE_BATCH = 1024


class QueryBankMismatchError(UserError, ValueError):
    """A stored querybank belongs to other shards or another model than the search uses."""


def model_temperature(model: torch.nn.Module) -> float:
    """exp(logit_scale) of a CLIP-style model, the temperature its training learnt (at most 100)."""
    logit_scale = getattr(model, "logit_scale", None)
    if not isinstance(logit_scale, torch.Tensor):
        return DEFAULT_TEMPERATURE
    return min(float(logit_scale.detach().float().exp().reshape(-1)[0]), DEFAULT_TEMPERATURE)


def hub_bias(images: torch.Tensor, bank: torch.Tensor, temperature: float,
             chunk_rows: int = BIAS_CHUNK_ROWS) -> torch.Tensor:
    """Each image's querybank bias [N]: -log(mean_b exp(t * cos(b, image))) / t.

    `images` [N, D] and `bank` [B, D] are normalised here; the log-sum-exp runs in float32 over
    chunks of image rows, so memory stays at [B, chunk_rows] whatever N is.
    """
    if bank.shape[0] == 0:
        raise ValueError("the querybank holds no queries")
    if images.shape[1] != bank.shape[1]:
        raise ValueError(f"querybank queries are {bank.shape[1]}-d but the images are {images.shape[1]}-d")
    bank = F.normalize(bank.float(), dim=-1)
    bias = torch.empty(images.shape[0])
    for start in range(0, images.shape[0], chunk_rows):
        rows = F.normalize(images[start : start + chunk_rows].float(), dim=-1)
        pull = torch.logsumexp(temperature * (bank @ rows.T), dim=0) - math.log(bank.shape[0])
        bias[start : start + rows.shape[0]] = -pull / temperature
    return bias


def bank_captions(dataset_path: str | os.PathLike, split: str, size: int = DEFAULT_BANK_SIZE, seed: int = 0,
                  image_column: str = IMAGE_COLUMN, caption_column: str = CAPTION_COLUMN) -> list[str]:
    """The captions of a split's table, or a random `size` of them (fixed by `seed`) when it has more."""
    captions = list(read_table(dataset_path, split, image_column, caption_column)["caption"])
    if not captions:
        raise ValueError(f"{dataset_path}: split {split!r} has no captions for a querybank")
    if len(captions) > size:
        chosen = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:size]
        captions = [captions[i] for i in sorted(chosen.tolist())]
    return captions


@torch.no_grad()
def encode_bank(bundle, captions: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Unit-length text embeddings [len(captions), D] of the bank, float32 on the CPU."""
    from clipsearch.models import model_device

    device = device if device is not None else model_device(bundle.model)
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        embeddings = [
            bundle.model.encode_text(bundle.tokenizer(captions[start : start + BANK_ENCODE_BATCH]).to(device)).float().cpu()
            for start in range(0, len(captions), BANK_ENCODE_BATCH)
        ]
    finally:
        bundle.model.train(was_training)
    return F.normalize(torch.cat(embeddings), dim=-1)


@dataclass(frozen=True)
class QueryBank:
    """The stored biases of one embedding folder, and what they were computed from."""

    bias: torch.Tensor  # [N] float32, one per collection row
    temperature: float
    order_fingerprint: str  # the collection rows the biases follow (store.order_fingerprint)
    model_fingerprint: str  # the model whose captions and images made them
    source: str  # where the bank's captions came from, for people: "<dataset> <split>, n captions"

    def save(self, emb_path: str | os.PathLike) -> Path:
        record = {"bias": self.bias.float().contiguous(), "temperature": float(self.temperature),
                  "order_fingerprint": self.order_fingerprint, "model_fingerprint": self.model_fingerprint,
                  "source": self.source}
        buffer = io.BytesIO()
        torch.save(record, buffer)
        return atomic_write(Path(emb_path) / QUERYBANK_FILE, buffer.getbuffer())

    @classmethod
    def load(cls, emb_path: str | os.PathLike, order: str, count: int, model_fingerprint: str | None) -> QueryBank:
        """The folder's querybank, checked against the collection's rows (their order_fingerprint and
        count) and the query model."""
        path = Path(emb_path) / QUERYBANK_FILE
        rebuild = f"build it with ./clipsearch querybank --emb_path {emb_path} --load_model <the model>"
        if not path.is_file():
            raise QueryBankMismatchError(f"{path} not found; {rebuild}")
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            bank = cls(record["bias"].float(), float(record["temperature"]), str(record["order_fingerprint"]),
                       str(record["model_fingerprint"]), str(record["source"]))
        except Exception as error:  # a truncated or foreign file: say which, not a pickle traceback
            raise QueryBankMismatchError(f"{path} is not a querybank file ({type(error).__name__}: {error}); {rebuild}") from None
        if bank.order_fingerprint != order or bank.bias.shape != (count,):
            raise QueryBankMismatchError(f"{path} was computed for other rows than the shards hold now; {rebuild}")
        if model_fingerprint is not None and bank.model_fingerprint != model_fingerprint:
            raise QueryBankMismatchError(f"{path} was computed with another model than the query model; {rebuild}")
        return bank
