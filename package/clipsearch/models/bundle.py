"""The model contract every family fulfils: a model, its image transforms, its tokenizer and its spec."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


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
