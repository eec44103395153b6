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
# Lightning's `LightningModule.all_gather` contract: local [n, ...] -> [world_size, n, ...], equal n on every rank.
AllGather = Callable[..., torch.Tensor]


def gather_rows(rows: torch.Tensor, rank: int, all_gather: AllGather, sync_grads: bool = False) -> tuple[torch.Tensor, int]:
    """All ranks' rows in rank order, and where this rank's rows start (a `Gather`).

    Ranks may hold different numbers of rows (a skipped bad image shrinks a training batch, a
    rank's batch can lose every image, a split rarely divides evenly), and all_gather needs equal
    shapes: so sizes travel first and short tensors are padded. With `sync_grads`, gradients flow
    back to each rank's rows.
    """
    sizes = all_gather(torch.tensor([rows.shape[0]], device=rows.device), sync_grads=False).flatten().tolist()
    offset = sum(sizes[:rank])
    if len(set(sizes)) == 1:
        return all_gather(rows, sync_grads=sync_grads).flatten(0, 1), offset
    padded = torch.cat([rows, rows.new_zeros((max(sizes) - rows.shape[0], *rows.shape[1:]))])
    gathered = all_gather(padded, sync_grads=sync_grads)
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)]), offset


class _GlobalBatchLoss(nn.Module):
    """A loss that scores this rank's rows against the whole global batch.

    `gather` maps a local [B, D] tensor to `(global rows, offset of this rank's rows)`, rank-major,
    with gradients flowing back to every rank's local part (`gather_rows` over Lightning's
    `all_gather(sync_grads=True)` or `torch.distributed.nn.all_gather`). Only local rows are scored
    (open_clip's "local loss"): the [B, world_size * B] logits cost 1/world_size of the full matrix.
    Each rank sums its rows' terms and divides by the global row count, times the world size:
    the gathered gradients are summed across ranks and DDP averages ranks, so the gradient equals
    that of the single-process loss on the concatenated batch even when ranks hold different
    numbers of rows (none included). The trainer sets both once it knows the world
    (`distribute`); `distributed=False` in a call scores the local rows alone, as a mean
    (validation batches, which ranks need not reach in step).
    """

    def __init__(self, world_size: int = 1, gather: Gather | None = None):
        super().__init__()
        self.distribute(world_size, gather)

    def distribute(self, world_size: int, gather: Gather | None) -> None:
        self.world_size = world_size
        self.gather = gather

    def is_distributed(self, distributed: bool) -> bool:
        return distributed and self.world_size > 1

    def global_rows(self, features: torch.Tensor, distributed: bool) -> tuple[torch.Tensor, int]:
        if self.is_distributed(distributed):
            return self.gather(features)
        return features, 0

    def global_count(self, features: torch.Tensor, distributed: bool) -> int:
        """How many rows all ranks hold together, for rows this loss does not gather."""
        if self.is_distributed(distributed):
            return self.gather(features.detach()[:, :1])[0].shape[0]
        return features.shape[0]

    def rank_weight(self, distributed: bool) -> int:
        """DDP averages the ranks' gradients: sums over global counts times this give the global mean's."""
        return self.world_size if self.is_distributed(distributed) else 1


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
        # In float32 whatever the autocast: ranks gather equal dtypes, a rank without rows included.
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
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
        image_term = F.cross_entropy(logits_per_image, image_targets, reduction="sum") / all_image_features.shape[0]
        caption_term = F.cross_entropy(logits_per_text, caption_labels, reduction="sum") / all_text_features.shape[0]
        return self.rank_weight(distributed) * (image_term + caption_term) / 2


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
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        all_text_features, caption_offset = self.global_rows(text_features, distributed)
        scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * image_features @ all_text_features.T + self.logit_bias
        # Every caption of an image is a positive ("yes, this is its caption"); all other pairs negatives.
        positives = positive_columns(caption_images, image_features.shape[0], text_features.shape[0],
                                     all_text_features.shape[0], caption_offset, logits.device)
        signs = positives.float() * 2 - 1
        # Summed over pairs, averaged over the batch's images (the paper's normalisation).
        all_images = self.global_count(image_features, distributed)
        return self.rank_weight(distributed) * -F.logsigmoid(signs * logits).sum() / all_images


LOSSES: dict[str, type[_GlobalBatchLoss]] = {"contrastive": ContrastiveLoss, "sigmoid": SigmoidLoss}
