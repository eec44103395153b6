"""Symmetric contrastive (InfoNCE) loss over features gathered from every rank."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# OpenAI's CLIP clamps the temperature so logits never exceed 100; beyond it training destabilises.
MAX_LOGIT_SCALE = 100.0


class ContrastiveLoss(nn.Module):
    """CLIP's loss with each rank scoring its own rows against the whole global batch.

    `gather` maps a local [B, D] tensor to `(global rows, offset of this rank's rows)`, rank-major,
    with gradients flowing back to every rank's local part (Lightning's `all_gather(sync_grads=True)`,
    or `torch.distributed.nn.all_gather`). Only local rows are scored (open_clip's "local loss"):
    the [B, world_size * B] logits cost 1/world_size of the full matrix, and because the gathered
    gradients are summed across ranks, the gradient equals that of the single-process loss on the
    concatenated batch once DDP averages it.
    """

    def __init__(self, world_size: int = 1, gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None):
        super().__init__()
        self.world_size = world_size
        self.gather = gather

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        offset = 0
        all_image_features, all_text_features = image_features, text_features
        if self.world_size > 1:
            all_image_features, offset = self.gather(image_features)
            all_text_features, _ = self.gather(text_features)
        scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits_per_image = scale * image_features @ all_text_features.T
        logits_per_text = scale * text_features @ all_image_features.T
        labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
