"""Model stage: image tensors in, L2-normalised embeddings out, under no-grad and optional autocast."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipsearch.models.bundle import ImageViews, embed_images

AUTOCAST_DTYPES = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def autocast_context(device: torch.device, precision: str):
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
    autocast_dtype = AUTOCAST_DTYPES[precision]
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)


class ImageEmbedder:
    """Maps a batch of transformed images to unit-length float32 embeddings on the model's device.

    A batch of uint8 pixels (a loader's `split_normalize` half) is normalised on the device by
    `normalize`, the transform's other half. Results stay on the device so the GPU is not
    synchronised after every batch; the writer moves a whole shard to the CPU at once.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", precision: str = "32",
                 views: ImageViews = ImageViews(), normalize: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.views = views  # the model spec's: see `embed_images`
        self.normalize = normalize
        autocast_context(self.device, precision)  # validate early, before any data is read

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError("uint8 pixels need the transform's normalisation (normalize=)")
            images = self.normalize(images)
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            embeddings = embed_images(self.model, images, self.views)
        # Normalise in float32: half-precision norms lose digits that ranking later depends on.
        return F.normalize(embeddings, dim=-1)


class TextEmbedder:
    """Maps a batch of tokenised captions to unit-length float32 embeddings (encode --captions)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", precision: str = "32"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        autocast_context(self.device, precision)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            embeddings = self.model.encode_text(tokens)
        return F.normalize(embeddings.float(), dim=-1)
