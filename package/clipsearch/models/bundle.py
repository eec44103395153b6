"""The model contract every family meets: a model, its image transforms, its tokenizer and its spec."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Bumped when the meaning of a spec changes, so old checkpoints fail loudly instead of loading wrongly.
SPEC_VERSION = 1
# On a CPU an image tower runs faster per image on a few images at a time: the activations of 16
# images stay in the CPU's caches, those of 128 do not. Milliseconds per 224 px image on 2 cores,
# 16 at a time against 128 (benchmarks/bench_cpu_chunks.py): EfficientNet-Lite0 12.3 / 23.8,
# Lite2 18.3 / 32.9, OpenAI's ViT-B/32 51.6 / 67.4, RN50 70.6 / 87.8. GPUs want the whole batch.
CPU_IMAGE_CHUNK = 16


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass
class ModelBundle:
    """Everything needed to turn images and captions into comparable embeddings.

    `model` exposes `encode_image(images)`, `encode_text(tokens)`, a learnable `logit_scale`, and
    `new_parameter_names()`: the parameters that start untrained (projections, logit scale), which
    train at `--lr` while pretrained tower weights train at `--tower_lr`;
    `tokenizer` maps a list of captions to a LongTensor [n, context_length];
    `spec` is plain data (str/int/float/list/dict) from which `build_from_spec` rebuilds the
    architecture, so checkpoints describe themselves; its "mirror_average" and "scale_average"
    say how images are embedded (`ImageViews`, `embed_images`).
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

    @property
    def image_views(self) -> ImageViews:
        return ImageViews.of(self.spec)

    def set_mirror_average(self, on: bool) -> None:
        """Record how images are embedded; off leaves no key, so the spec (and fingerprint) is as before the setting."""
        self.spec.pop("mirror_average", None)
        if on:
            self.spec["mirror_average"] = True

    def set_scale_average(self, sizes: Sequence[int]) -> None:
        """Also embed each image at these sizes (px) and average; none leaves no key, as above."""
        self.spec.pop("scale_average", None)
        if sizes:
            self.spec["scale_average"] = sorted({int(size) for size in sizes}, reverse=True)


@dataclass(frozen=True)
class ImageViews:
    """How one image becomes one embedding: the test-time augmentation a model's spec records.

    `mirror`: the mean of the image's unit embedding and its mirror image's. `extra_sizes`: the
    image is also embedded at these sizes, resized from the transformed image, and the unit
    embeddings of all sizes are averaged. Validation, evaluation, encoding and image queries all
    embed through `embed_images` with the model's own views, so shards, queries and reported
    recall always agree.
    """

    mirror: bool = False
    extra_sizes: tuple[int, ...] = ()

    @classmethod
    def of(cls, spec: dict) -> ImageViews:
        return cls(bool(spec.get("mirror_average", False)), tuple(int(size) for size in spec.get("scale_average", ())))


def embed_images(model: nn.Module, images: torch.Tensor, views: ImageViews = ImageViews()) -> torch.Tensor:
    """`model.encode_image(images)` in float32, or with test-time augmentation (`views`) the mean
    of the unit embeddings of each image's views.

    The mirror average costs a second pass over every image and, on Flickr8k, bought about one
    point of R@1 in each direction. The scale average costs a pass per extra size (a 256 px pass
    is 0.64 of a 320 px one); on Flickr8k, two Lite2 towers trained at 256 px and encoded at 320 px
    and 256 px scored 0.7 and 0.2 points of mean recall above 288 px alone. Training mirrors
    images only with --flip_images.
    """
    if not views.extra_sizes:
        return _embed_one_size(model, images, views.mirror)
    sizes = [images] + [F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                        for size in views.extra_sizes]
    # Each size's embedding as a unit vector, so that every size weighs the same.
    return torch.stack([F.normalize(_embed_one_size(model, sized, views.mirror), dim=-1) for sized in sizes]).mean(0)


def _embed_one_size(model: nn.Module, images: torch.Tensor, mirror: bool) -> torch.Tensor:
    if not mirror:
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
