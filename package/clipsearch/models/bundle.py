"""The model contract every family meets: a model, its image transforms, its tokenizer and its spec."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Bumped when the meaning of a spec changes, so old checkpoints fail loudly instead of loading wrongly.
SPEC_VERSION = 1
# On a CPU an image tower runs faster per image on a few images at a time: the activations of 16
# images stay in the CPU's caches, those of 128 do not. Milliseconds per 224 px image on 2 cores,
# 16 at a time against 128 (benchmarks/bench_cpu_chunks.py): EfficientNet-Lite0 16.1 / 25.1,
# Lite2 19.2 / 32.2, OpenAI's ViT-B/32 53.8 / 63.1, RN50 71.4 / 90.4. GPUs want the whole batch.
CPU_IMAGE_CHUNK = 16


@dataclass
class ModelBundle:
    """Everything needed to turn images and captions into comparable embeddings.

    `model` exposes `encode_image(images)`, `encode_text(tokens)`, a learnable `logit_scale`, and
    `new_parameter_names()`: the parameters that start untrained (projections, logit scale), which
    train at `--lr` while pretrained tower weights train at `--tower_lr`;
    `tokenizer` maps a list of captions to a LongTensor [n, context_length];
    `spec` is plain data (str/int/float/list/dict) from which `build_from_spec` rebuilds the
    architecture, so checkpoints describe themselves; `spec["mirror_average"]` says how images are
    embedded (`embed_images`).
    """

    model: nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    spec: dict

    @property
    def embed_dim(self) -> int:
        return int(self.spec["embed_dim"])

    @property
    def mirror_average(self) -> bool:
        return bool(self.spec.get("mirror_average", False))

    def set_mirror_average(self, on: bool) -> None:
        """Record how images are embedded; off leaves no key, so the spec (and fingerprint) is as before the setting."""
        self.spec.pop("mirror_average", None)
        if on:
            self.spec["mirror_average"] = True


def embed_images(model: nn.Module, images: torch.Tensor, mirror_average: bool = False) -> torch.Tensor:
    """`model.encode_image(images)` in float32; with `mirror_average`, the mean of each image's unit
    embedding and its mirror image's.

    The mirror average is test-time augmentation: it costs a second pass over every image and, on
    Flickr8k, bought about one point of R@1 in each direction. Validation, evaluation, encoding
    and image queries all embed through here with the model's own setting, so shards, queries and
    reported recall always agree. Training mirrors images only with --flip_images.
    """
    if not mirror_average:
        return in_cpu_chunks(model.encode_image, images).float()
    # One call over twice the batch: on a GPU better use of the device than two calls over one.
    both = in_cpu_chunks(model.encode_image, torch.cat([images, images.flip(-1)]))
    own, mirrored = F.normalize(both.float(), dim=-1).chunk(2)
    return (own + mirrored) / 2


def in_cpu_chunks(function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  chunk: int = CPU_IMAGE_CHUNK) -> torch.Tensor:
    """`function(images)` on a CPU over `chunk` images at a time, which is faster; elsewhere whole.

    For a function of each image alone (an image tower in eval mode) the rows are the same. A tower
    training its BatchNorm (CLIPModule.forward) gets each slice's own statistics instead."""
    if images.device.type != "cpu" or images.shape[0] <= chunk:
        return function(images)
    return torch.cat([function(part) for part in images.split(chunk)])
