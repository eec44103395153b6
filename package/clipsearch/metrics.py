"""Retrieval recall in both directions, with captions grouped by the image they describe."""
from __future__ import annotations

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


def _ranks_summary(prefix: str, ranks: torch.Tensor) -> dict[str, float]:
    """`ranks` are 0-based positions of the first correct item; R@K counts ranks below K."""
    summary = {f"{prefix}_R@{k}": 100.0 * (ranks < k).float().mean().item() for k in RECALL_KS}
    summary[f"{prefix}_median_rank"] = ranks.float().median().item() + 1
    summary[f"{prefix}_mean_rank"] = ranks.float().mean().item() + 1
    return summary


@torch.no_grad()
def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_image_ids: torch.Tensor,
    chunk_size: int = 4096,
    image_bias: torch.Tensor | None = None,
) -> dict[str, float]:
    """R@1/5/10, median and mean rank for text->image and image->text.

    image_embeddings [N, D], one row per unique image; text_embeddings [M, D], one row per caption;
    caption_image_ids [M] gives the row of each caption's image. An image counts as found from a
    caption when it is the caption's image; a caption counts as found from an image when any of
    the image's captions is (the Flickr/COCO convention). `image_bias` [N] is added to every
    caption's score for each image (querybank normalisation, querybank.py); image->text ranks are
    the same either way, since it moves all of one image's scores alike.
    """
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    caption_image_ids = caption_image_ids.long().to(images.device)
    num_images, num_captions = images.shape[0], texts.shape[0]
    # Each direction compares scores taken from one product only: the same cosine computed by two
    # products of different shapes can round differently (BLAS picks kernels by shape), and then a
    # caption identical to its image's embedding outscores itself.
    text_to_image_ranks = []
    for start in range(0, num_captions, chunk_size):
        chunk_ids = caption_image_ids[start : start + chunk_size]
        scores = texts[start : start + chunk_size] @ images.T  # [m, N]
        # Text->image ranks by what search ranks by: the cosine, plus the image's bias when given.
        if image_bias is not None:
            scores = scores + image_bias.to(scores)[None, :]
        text_to_image_ranks.append((scores > scores.gather(1, chunk_ids[:, None])).sum(dim=1))
    # Image->text: an image's rank is that of its best-scoring caption, i.e. how many captions
    # outscore the best of its own.
    image_to_text_ranks = []
    for start in range(0, num_images, chunk_size):
        scores = images[start : start + chunk_size] @ texts.T  # [n, M]
        rows = torch.arange(start, start + scores.shape[0], device=images.device)
        own = caption_image_ids[None, :] == rows[:, None]
        best_own = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        image_to_text_ranks.append((scores > best_own).sum(dim=1))
    text_to_image = torch.cat(text_to_image_ranks)
    image_to_text = torch.cat(image_to_text_ranks)
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=images.device)
    has_caption[caption_image_ids] = True
    metrics = {
        **_ranks_summary("text_to_image", text_to_image),
        **_ranks_summary("image_to_text", image_to_text[has_caption]),
    }
    metrics["mean_recall"] = sum(metrics[f"{d}_R@{k}"] for d in ("text_to_image", "image_to_text") for k in RECALL_KS) / 6
    return metrics
