"""A TensorBoard panel after each validation: the top dev images for a few fixed dev captions."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

# Captions whose top images are drawn, and how many images each.
PANEL_CAPTIONS = 3
PANEL_TOP_K = 5


class ResultPanel(Callback):
    """Draws what the module's last validation found, so progress can be seen, not only read.

    `image_paths` and `image_captions` are the validation dataset's, indexed by image id.
    """

    def __init__(self, image_paths: list[str], image_captions: list[list[str]]):
        self.image_paths = image_paths
        self.image_captions = image_captions

    def on_validation_end(self, trainer, module) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if (not trainer.is_global_zero or trainer.sanity_checking or module.last_validation is None
                or not hasattr(experiment, "add_image")):
            return
        from clipsearch.grid import make_grid

        image_ids, image_embeddings, text_embeddings, caption_rows = module.last_validation
        chosen = torch.linspace(0, len(caption_rows) - 1, PANEL_CAPTIONS).long().unique()
        scores = F.normalize(text_embeddings[chosen], dim=-1) @ F.normalize(image_embeddings, dim=-1).T
        top = scores.topk(min(PANEL_TOP_K, scores.shape[1]), dim=1)
        for panel, caption_index in enumerate(chosen.tolist()):
            row = int(caption_rows[caption_index])
            image_id = int(image_ids[row])
            # Captions of one image keep their table order: the ones before this one give its position.
            position = int((caption_rows[:caption_index] == row).sum())
            found = [int(image_ids[index]) for index in top.indices[panel]]
            labels = [f"{rank + 1}: {score:.2f}{' *' if found_id == image_id else ''}"
                      for rank, (found_id, score) in enumerate(zip(found, top.values[panel].tolist()))]
            title = f"{self.image_captions[image_id][position]}  (* = its image)"
            grid = make_grid([self.image_paths[i] for i in found], labels, title=title, thumb_size=96)
            experiment.add_image(f"val/top_images_{panel}", np.asarray(grid), module.global_step, dataformats="HWC")
