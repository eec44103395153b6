"""The two training losses, each over features gathered from every rank: CLIP's symmetric
contrastive (InfoNCE) loss and SigLIP's pairwise sigmoid loss."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# OpenAI's CLIP clamps the temperature so logits never exceed 100; beyond it training destabilises.
MAX_LOGIT_SCALE = 100.0
# SigLIP's initial bias: with almost every pair a negative, a strongly negative start keeps the
# first steps from spending themselves on pushing all pairs apart (Zhai et al. 2023, section 3.2).
SIGMOID_BIAS_INIT = -10.0

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class _GlobalBatchLoss(nn.Module):
    """A loss that scores this rank's rows against the whole global batch.

    `gather` maps a local [B, D] tensor to `(global rows, offset of this rank's rows)`, rank-major,
    with gradients flowing back to every rank's local part (Lightning's `all_gather(sync_grads=True)`,
    or `torch.distributed.nn.all_gather`). Only local rows are scored (open_clip's "local loss"):
    the [B, world_size * B] logits cost 1/world_size of the full matrix, and because the gathered
    gradients are summed across ranks, the gradient equals that of the single-process loss on the
    concatenated batch once DDP averages it. The trainer sets both once it knows the world
    (`distribute`); `distributed=False` in a call scores the local rows alone (validation batches,
    which ranks need not reach in step).
    """

    def __init__(self, world_size: int = 1, gather: Gather | None = None):
        super().__init__()
        self.distribute(world_size, gather)

    def distribute(self, world_size: int, gather: Gather | None) -> None:
        self.world_size = world_size
        self.gather = gather

    def global_rows(self, features: torch.Tensor, distributed: bool) -> tuple[torch.Tensor, int]:
        if distributed and self.world_size > 1:
            return self.gather(features)
        return features, 0


def positive_columns(caption_images: torch.Tensor | None, images: int, captions: int, all_captions: int,
                     caption_offset: int, device: torch.device) -> torch.Tensor:
    """[images, all_captions] booleans: which of the global batch's captions belong to each local image.

    `caption_images` [captions] is each local caption's local image row (None: pairs, caption i of
    image i). A caption always travels with its image, so an image's positives are among its own
    rank's captions, which start at `caption_offset` of the gathered ones.
    """
    caption_images = torch.arange(images, device=device) if caption_images is None else caption_images.to(device)
    positives = torch.zeros(images, all_captions, dtype=torch.bool, device=device)
    local = torch.arange(images, device=device)[:, None] == caption_images[None, :]
    positives[:, caption_offset : caption_offset + captions] = local
    return positives


class ContrastiveLoss(_GlobalBatchLoss):
    """CLIP's loss: cross-entropy over each image's row of captions and each caption's row of images.

    With several captions per image (`caption_images`), an image's target spreads evenly over its
    captions, and each caption's target is its one image.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                distributed: bool = True, caption_images: torch.Tensor | None = None) -> torch.Tensor:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        all_image_features, image_offset = self.global_rows(image_features, distributed)
        all_text_features, caption_offset = self.global_rows(text_features, distributed)
        scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits_per_image = scale * image_features @ all_text_features.T
        logits_per_text = scale * text_features @ all_image_features.T
        device = logits_per_image.device
        positives = positive_columns(caption_images, image_features.shape[0], text_features.shape[0],
                                     all_text_features.shape[0], caption_offset, device)
        # For pairs, one-hot targets: the same loss as class labels on the diagonal.
        image_targets = positives.float() / positives.sum(dim=1, keepdim=True)
        local_images = torch.arange(image_features.shape[0], device=device) if caption_images is None else caption_images
        caption_labels = local_images.to(device) + image_offset
        return (F.cross_entropy(logits_per_image, image_targets) + F.cross_entropy(logits_per_text, caption_labels)) / 2


class SigmoidLoss(_GlobalBatchLoss):
    """SigLIP's loss: every image-caption pair is its own binary question, "is this the caption?".

    No softmax ties a row together, so each rank needs only the other ranks' captions (its images
    against every caption covers every pair once), and the loss does not lean on a large batch for
    its negatives, which suits the small batches of a CPU or a single GPU. It learns a bias beside
    the model's temperature; the bias only shifts every score alike, so it stays in the training
    checkpoint and search never needs it.
    """

    def __init__(self, world_size: int = 1, gather: Gather | None = None):
        super().__init__(world_size, gather)
        self.logit_bias = nn.Parameter(torch.tensor(SIGMOID_BIAS_INIT))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                distributed: bool = True, caption_images: torch.Tensor | None = None) -> torch.Tensor:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        all_text_features, caption_offset = self.global_rows(text_features, distributed)
        scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * image_features @ all_text_features.T + self.logit_bias
        # Every caption of an image is a positive ("yes, this is its caption"); all other pairs negatives.
        positives = positive_columns(caption_images, image_features.shape[0], text_features.shape[0],
                                     all_text_features.shape[0], caption_offset, logits.device)
        signs = positives.float() * 2 - 1
        # Summed over pairs, averaged over this rank's images (the paper's normalisation).
        return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


LOSSES: dict[str, type[_GlobalBatchLoss]] = {"contrastive": ContrastiveLoss, "sigmoid": SigmoidLoss}
