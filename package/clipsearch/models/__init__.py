"""The model contract shared by every variant, and rebuilding any variant from its stored spec."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipsearch.models.transforms import make_image_transform

# Bumped when the meaning of a spec changes, so old checkpoints fail loudly instead of loading wrongly.
SPEC_VERSION = 1


@dataclass
class ModelBundle:
    """Everything needed to turn images and captions into comparable embeddings.

    `model` exposes `encode_image(images)`, `encode_text(tokens)` and a learnable `logit_scale`;
    `tokenizer` maps a list of captions to a LongTensor [n, context_length];
    `spec` is plain data (str/int/float/list/dict) from which `build_from_spec` rebuilds the
    architecture, so checkpoints describe themselves.
    """

    model: nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    spec: dict

    @property
    def embed_dim(self) -> int:
        return int(self.spec["embed_dim"])


def build_from_spec(spec: dict) -> ModelBundle:
    """Rebuild the architecture (random weights) that `spec` describes; the caller loads a state dict."""
    if spec.get("spec_version") != SPEC_VERSION:
        raise ValueError(
            f"model spec version {spec.get('spec_version')!r} is not supported (expected {SPEC_VERSION}); "
            "was this checkpoint written by another version of clipsearch?"
        )
    family = spec.get("family")
    if family == "openai":
        from clipsearch.models.openai_clip import build_openai_clip

        model, tokenizer = build_openai_clip(spec)
    elif family == "our":
        from clipsearch.models.our_clip import build_our_clip

        model, tokenizer = build_our_clip(spec)
    else:
        raise ValueError(f"unknown model family {family!r} in model spec; expected 'openai' or 'our'")
    image = spec["image"]
    return ModelBundle(
        model=model,
        train_transform=make_image_transform(image["size"], image["mean"], image["std"], is_train=True),
        eval_transform=make_image_transform(image["size"], image["mean"], image["std"], is_train=False),
        tokenizer=tokenizer,
        spec=spec,
    )
