"""The model contract every family meets: a model, its image transforms, its tokenizer and its spec."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Bumped when the meaning of a spec changes, so old checkpoints fail loudly instead of loading wrongly.
SPEC_VERSION = 1


@dataclass
class ModelBundle:
    """Everything needed to turn images and captions into comparable embeddings.

    `model` exposes `encode_image(images)`, `encode_text(tokens)`, a learnable `logit_scale`, and
    `new_parameter_names()`: the parameters that start untrained (projections, logit scale), which
    train at `--lr` while pretrained tower weights train at `--tower_lr`;
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
