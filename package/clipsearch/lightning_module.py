"""The LightningModule every variant trains with: one step, the optimiser, validation recall and logging."""
from __future__ import annotations

import logging
import math

import lightning as L
import numpy as np
import torch

from clipsearch.checkpoint import META_KEY
from clipsearch.data import DataReport
from clipsearch.loss import MAX_LOGIT_SCALE, ContrastiveLoss
from clipsearch.metrics import retrieval_metrics

logger = logging.getLogger(__name__)

# Captions whose top images are drawn into TensorBoard after each validation.
PANEL_CAPTIONS = 3
PANEL_TOP_K = 5


def is_no_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases, norm gains, the temperature (all below 2-D) and embeddings get no weight decay:
    pulling them towards zero is not regularisation (CLIP's and open_clip's rule)."""
    return parameter.ndim < 2 or "embedding" in name


def warmup_cosine(warmup_steps: int, max_steps: int):
    """Linear warmup from 0 to 1 over `warmup_steps`, then cosine decay to 0 at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class CLIPModule(L.LightningModule):
    """Contrastive training of any model with `encode_image`, `encode_text` and `logit_scale`."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: dict,
        lr: float = 5e-4,
        tower_lr: float | None = None,
        weight_decay: float = 0.2,
        warmup_steps: int = 100,
        max_steps: int = 1000,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        panel_image_paths: list[str] | None = None,
        panel_captions: list[list[str]] | None = None,
    ):
        super().__init__()
        self.model = model
        self.spec = spec
        self.save_hyperparameters(ignore=["model", "spec", "panel_image_paths", "panel_captions"])
        # Dev images and their captions, in the validation dataset's image-id order, for the panel.
        self.panel_image_paths = panel_image_paths or []
        self.panel_captions = panel_captions or []
        self.loss_fn = ContrastiveLoss()
        self.data_report = DataReport()
        self._validation_outputs: list[dict] = []
        self.last_validated_step: int | None = None
        self.start_step = 0

    # ---- training -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.loss_fn = ContrastiveLoss(world_size=self.trainer.world_size, gather=self._gather_with_grad)

    def _gather_with_grad(self, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All ranks' rows (gradients flow back to each rank) and where this rank's rows start.

        Ranks normally hold equal batches (drop_last), but a skipped bad image shrinks one, and
        all_gather needs equal shapes: so sizes travel first and short batches are padded.
        """
        sizes = self.all_gather(torch.tensor([features.shape[0]], device=features.device)).flatten().tolist()
        offset = sum(sizes[: self.global_rank])
        if len(set(sizes)) == 1:
            return self.all_gather(features, sync_grads=True).flatten(0, 1), offset
        padded = torch.cat([features, features.new_zeros((max(sizes) - features.shape[0], *features.shape[1:]))])
        gathered = self.all_gather(padded, sync_grads=True)
        return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)]), offset

    def on_train_start(self) -> None:
        self.start_step = self.global_step  # above zero when resumed

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.model.encode_image(images), self.model.encode_text(tokens)

    def training_step(self, batch: dict, batch_idx: int):
        self.data_report.merge(batch["skipped"])
        self.data_report.merge(batch.get("conversions", {}))
        if len(batch["image_paths"]) < 2 and self.trainer.world_size == 1:
            return None  # every image of the batch was bad: nothing to contrast, skip the step
        image_features, text_features = self(batch["images"], batch["tokens"])
        loss = self.loss_fn(image_features, text_features, self.model.logit_scale)
        batch_size = len(batch["image_paths"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=batch_size)
        self.log("train/skipped", float(self.data_report.total_skipped()), batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # OpenAI's clamp: keep the learnable temperature where logits stay below 100.
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def configure_optimizers(self):
        """AdamW in up to four named groups: new (projections, temperature) at --lr, pretrained tower
        weights at --tower_lr, each split into decayed and not decayed; frozen parameters stay out."""
        lr = self.hparams.lr
        tower_lr = self.hparams.tower_lr if self.hparams.tower_lr is not None else lr
        declared = getattr(self.model, "new_parameter_names", None)
        new_names = declared() if declared is not None else {name for name, _ in self.model.named_parameters()}
        if declared is None and tower_lr != lr:
            logger.warning("%s does not say which parameters are pretrained: all train at --lr, "
                           "--tower_lr is ignored", type(self.model).__name__)
        groups: dict[str, list] = {}
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                kind = "new" if name in new_names else "pretrained"
                groups.setdefault(kind + ("_no_decay" if is_no_decay(name, parameter) else ""), []).append((name, parameter))
        # Named parameters: the optimiser's state dict (and so every checkpoint) lists each group's
        # parameter names, and LearningRateMonitor logs lr-AdamW/<group name>.
        param_groups = [
            {
                "name": group,
                "params": named,
                "lr": lr if group.startswith("new") else tower_lr,
                "weight_decay": 0.0 if group.endswith("no_decay") else self.hparams.weight_decay,
            }
            for group, named in sorted(groups.items())
        ]
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- validation -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._validation_outputs = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["image_paths"]) == 0:
            return
        image_features = self.model.encode_image(batch["images"]).float()
        text_features = self.model.encode_text(batch["tokens"]).float()
        caption_image_ids = batch["caption_image_ids"]
        # Within-image caption positions make (image, caption) keys unique, so the copies that a
        # distributed sampler pads with can be dropped after gathering.
        positions = torch.zeros_like(caption_image_ids)
        for index in range(1, len(caption_image_ids)):
            if caption_image_ids[index] == caption_image_ids[index - 1]:
                positions[index] = positions[index - 1] + 1
        first_caption = torch.cat([torch.ones(1, dtype=torch.bool, device=positions.device), positions[1:] == 0])
        loss = ContrastiveLoss()(image_features, text_features[first_caption], self.model.logit_scale)
        self.log("val/loss", loss, batch_size=len(batch["image_paths"]), sync_dist=True)
        self._validation_outputs.append({
            "image_ids": batch["image_ids"],
            "image_features": image_features,
            "caption_keys": caption_image_ids * 1_000_000 + positions,
            "caption_image_ids": caption_image_ids,
            "text_features": text_features,
        })

    def _gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor whose first dimension differs across ranks."""
        if self.trainer.world_size == 1:
            return tensor
        sizes = self.all_gather(torch.tensor([tensor.shape[0]], device=self.device)).flatten().tolist()
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded)
        return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])

    def on_validation_epoch_end(self) -> None:
        outputs = self._validation_outputs
        empty_features = torch.zeros((0, self.spec["embed_dim"]), device=self.device)
        empty_ids = torch.zeros(0, dtype=torch.long, device=self.device)

        def collect(key: str, empty: torch.Tensor) -> torch.Tensor:
            return self._gather_rows(torch.cat([o[key] for o in outputs]) if outputs else empty)

        image_ids = collect("image_ids", empty_ids)
        image_features = collect("image_features", empty_features)
        caption_keys = collect("caption_keys", empty_ids)
        caption_image_ids = collect("caption_image_ids", empty_ids)
        text_features = collect("text_features", empty_features)
        self._validation_outputs = []
        if image_ids.numel() == 0 or caption_keys.numel() == 0:
            return
        self.last_validated_step = self.global_step
        image_ids, image_rows = _first_occurrences(image_ids)
        image_features = image_features[image_rows]
        caption_keys, caption_rows = _first_occurrences(caption_keys)
        text_features, caption_image_ids = text_features[caption_rows], caption_image_ids[caption_rows]
        caption_rows_in_images = torch.searchsorted(image_ids, caption_image_ids)
        metrics = retrieval_metrics(image_features, text_features, caption_rows_in_images)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, rank_zero_only=True, sync_dist=False)
        if self.global_rank == 0 and not self.trainer.sanity_checking:
            self._log_result_panel(image_ids, image_features, text_features, caption_keys, caption_rows_in_images)

    def _log_result_panel(self, image_ids, image_features, text_features, caption_keys, caption_rows_in_images) -> None:
        """Top dev images for a few fixed dev captions, so progress can be seen, not only read."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not self.panel_image_paths:
            return
        from clipsearch.grid import make_grid

        chosen = torch.linspace(0, len(caption_rows_in_images) - 1, PANEL_CAPTIONS).long().unique()
        scores = torch.nn.functional.normalize(text_features[chosen], dim=-1) @ torch.nn.functional.normalize(
            image_features, dim=-1
        ).T
        top = scores.topk(min(PANEL_TOP_K, scores.shape[1]), dim=1)
        for panel, caption_row in enumerate(chosen.tolist()):
            target = int(image_ids[caption_rows_in_images[caption_row]])
            found = [int(image_ids[i]) for i in top.indices[panel]]
            labels = [
                f"{rank + 1}: {score:.2f}{' *' if image_id == target else ''}"
                for rank, (image_id, score) in enumerate(zip(found, top.values[panel].tolist()))
            ]
            image_id, position = divmod(int(caption_keys[caption_row]), 1_000_000)
            title = f"{self.panel_captions[image_id][position]}  (* = its image)"
            grid = make_grid([self.panel_image_paths[i] for i in found], labels, title=title, thumb_size=96)
            experiment.add_image(f"val/top_images_{panel}", np.asarray(grid), self.global_step, dataformats="HWC")

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[META_KEY] = {"spec": self.spec, "global_step": self.global_step}

    def on_train_end(self) -> None:
        if self.data_report.total_skipped():
            logger.warning("training skipped bad samples: %s", self.data_report.summary())


def _first_occurrences(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys and, for each, the row of its first occurrence."""
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    rows = torch.full((unique.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    rows = rows.scatter_reduce(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amin")
    return unique, rows
