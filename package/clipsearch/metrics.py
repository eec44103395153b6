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
    num_images = images.shape[0]
    text_to_image_ranks, caption_ranks_for_own_image = [], []
    for start in range(0, texts.shape[0], chunk_size):
        chunk_ids = caption_image_ids[start : start + chunk_size]
        scores = texts[start : start + chunk_size] @ images.T  # [m, N]
        correct = scores.gather(1, chunk_ids[:, None])
        # Text->image ranks by what search ranks by: the cosine, plus the image's bias when given.
        ranked = scores if image_bias is None else scores + image_bias.to(scores)[None, :]
        text_to_image_ranks.append((ranked > ranked.gather(1, chunk_ids[:, None])).sum(dim=1))
        # For image->text: how many captions outscore this caption on its own image.
        column_scores = texts @ images[chunk_ids].T  # [M, m]
        caption_ranks_for_own_image.append((column_scores > correct.T).sum(dim=0))
    text_to_image = torch.cat(text_to_image_ranks)
    per_caption = torch.cat(caption_ranks_for_own_image)
    image_to_text = torch.full((num_images,), texts.shape[0], dtype=per_caption.dtype, device=per_caption.device)
    image_to_text = image_to_text.scatter_reduce(0, caption_image_ids, per_caption, reduce="amin")
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=images.device)
    has_caption[caption_image_ids] = True
    metrics = {
        **_ranks_summary("text_to_image", text_to_image),
        **_ranks_summary("image_to_text", image_to_text[has_caption]),
    }
    metrics["mean_recall"] = sum(metrics[f"{d}_R@{k}"] for d in ("text_to_image", "image_to_text") for k in RECALL_KS) / 6
    return metrics
