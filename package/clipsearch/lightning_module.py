"""The LightningModule every variant trains with: one step, the optimiser, validation recall and logging."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning as L
import torch

from clipsearch.checkpoint import META_KEY
from clipsearch.data_report import DataReport
from clipsearch.errors import UserError
from clipsearch.evaluate import concat_encoded, encode_groups, split_embeddings
from clipsearch.loss import LOSSES, MAX_LOGIT_SCALE, gather_rows
from clipsearch.metrics import retrieval_metrics
from clipsearch.models.bundle import ImageViews, in_cpu_chunks
from clipsearch.train_config import CPU_TRAIN_IMAGE_SLICE

logger = logging.getLogger(__name__)


def is_no_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases, norm gains, the temperature (all below 2-D) and embeddings get no weight decay:
    pulling them towards zero is not regularisation (CLIP's and open_clip's rule)."""
    return parameter.ndim < 2 or "embedding" in name


def warmup_cosine(warmup_steps: int, max_steps: int, start_step: int = 0):
    """Zero before `start_step`, then a linear warmup from 0 to 1 over `warmup_steps`, then cosine
    decay to 0 at `max_steps`."""

    def factor(step: int) -> float:
        if step < start_step:
            return 0.0
        step -= start_step
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - start_step - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class CLIPModule(L.LightningModule):
    """Contrastive training of any model with `encode_image`, `encode_text` and `logit_scale`,
    under CLIP's softmax loss or SigLIP's sigmoid loss (`loss`)."""

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
        cached_images: bool = False,
        loss: str = "contrastive",
        head_only_steps: int = 0,
        layer_decay: float = 1.0,
        cpu_image_slice: int | None = None,
        pixel_normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model = model
        self.spec = spec
        self.save_hyperparameters(ignore=["model", "spec", "cached_images", "pixel_normalize"])
        # Training batches hold cached outputs of the locked image stages instead of images.
        self.cached_images = cached_images
        # Training batches of uint8 pixels become the model's input here, on their device
        # (the loader's workers ship pixels: train._training_set).
        self.pixel_normalize = pixel_normalize
        # None trains the whole batch at once.
        whole_batch = getattr(model, "whole_batch_on_cpu", None)
        self.cpu_image_slice = cpu_image_slice if cpu_image_slice is not None else (
            None if whole_batch is not None and whole_batch() else CPU_TRAIN_IMAGE_SLICE)
        # The loss may hold parameters (the sigmoid loss's bias): made here, so a resumed run
        # restores them; setup() only tells it the world.
        self.loss_fn = LOSSES[loss]()
        self.data_report = DataReport()
        self._validation_outputs: list[dict] = []
        self.last_validated_step: int | None = None
        # The last validation's `split_embeddings` (image_ids, image_embeddings, text_embeddings,
        # caption_rows), for callbacks that show results (the TensorBoard panel).
        self.last_validation: tuple[torch.Tensor, ...] | None = None
        self.start_step = 0

    # ---- training -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.loss_fn.distribute(self.trainer.world_size, lambda features: self._gather(features, sync_grads=True))

    def _gather(self, rows: torch.Tensor, sync_grads: bool = False) -> tuple[torch.Tensor, int]:
        """All ranks' rows in rank order (any count per rank), and where this rank's rows start."""
        if self.trainer.world_size == 1:
            return rows, 0
        return gather_rows(rows, self.global_rank, self.all_gather, sync_grads=sync_grads)

    def on_train_start(self) -> None:
        self.start_step = self.global_step  # above zero when resumed

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        encode_image = self.model.encode_cached_image if self.cached_images else self.model.encode_image
        # On a CPU, batches above `cpu_image_slice` images train their image tower in slices, which
        # is faster there for convolutional towers (CPU_TRAIN_IMAGE_SLICE); a trained BatchNorm then
        # sees each slice alone.
        if self.cpu_image_slice is not None:
            return in_cpu_chunks(encode_image, images, self.cpu_image_slice), self.model.encode_text(tokens)
        return encode_image(images), self.model.encode_text(tokens)

    def training_step(self, batch: dict, batch_idx: int):
        self.data_report.merge(batch["skipped"])
        self.data_report.merge(batch.get("conversions", {}))
        rows = len(batch["image_paths"])
        # Ranks decide together: returning None on one rank alone would leave the others waiting
        # in the loss's gathers and DDP's gradient reduction.
        global_rows = rows if self.trainer.world_size == 1 else int(self.all_gather(torch.tensor(rows, device=self.device)).sum())
        if global_rows < 2:
            return None  # every image of the batch was bad: nothing to contrast, skip the step
        if rows == 0:
            loss = self._loss_without_rows()
        else:
            image_features, text_features = self(self._model_input(batch["images"]), batch["tokens"])
            loss = self.loss_fn(image_features, text_features, self.model.logit_scale,
                                caption_images=batch.get("caption_images"))
        batch_size = max(rows, 1)  # a rank without rows still logs its (zero) share
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        # The loss clamps the scale it applies at MAX_LOGIT_SCALE (OpenAI's 100); this is that value.
        self.log("train/logit_scale", self.model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE),
                 batch_size=batch_size)
        if hasattr(self.loss_fn, "logit_bias"):
            self.log("train/logit_bias", self.loss_fn.logit_bias.detach(), batch_size=batch_size)
        self.log("train/skipped", float(self.data_report.total_skipped()), batch_size=batch_size)
        return loss

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """A training batch as the image tower takes it: uint8 pixels normalised, anything else as it came."""
        if images.dtype != torch.uint8:
            return images
        if self.pixel_normalize is None:
            raise ValueError("a batch of uint8 pixels needs the normalisation split off its transform "
                             "(CLIPModule's pixel_normalize)")
        return self.pixel_normalize(images)

    def _loss_without_rows(self) -> torch.Tensor:
        """The share of a rank whose images all failed while other ranks have some: zero, with the
        backward of a rank that has rows.

        It joins the loss's gathers with no rows (adding nothing to the global batch). The empty
        features hang from every trained weight of the model, so, as on the other ranks, the
        gathers' backward runs first and DDP's reduction of the weights (zero here) after it:
        collectives met in another order would leave the ranks waiting on each other.
        """
        loss_inputs = {id(self.model.logit_scale)}  # the loss uses it directly, as on every rank
        weights = [p for p in self.model.parameters() if p.requires_grad and id(p) not in loss_inputs]
        zero = 0.0 * sum(weight.sum() for weight in weights)
        no_rows = torch.zeros(0, int(self.spec["embed_dim"]), device=self.device)
        return self.loss_fn(no_rows + zero, no_rows + zero, self.model.logit_scale)

    def configure_optimizers(self):
        """AdamW in named groups: new (projections, temperature, the loss's own bias) at --lr,
        pretrained tower weights at --tower_lr, each split into decayed and not decayed, and with
        --layer_decay the tower weights further by depth; frozen parameters stay out."""
        lr = self.hparams.lr
        tower_lr = self.hparams.tower_lr if self.hparams.tower_lr is not None else lr
        declared = getattr(self.model, "new_parameter_names", None)
        new_names = declared() if declared is not None else {name for name, _ in self.model.named_parameters()}
        if declared is None and tower_lr != lr:
            logger.warning("%s does not say which parameters are pretrained: all train at --lr, "
                           "--tower_lr is ignored", type(self.model).__name__)
        loss_parameters = list(self.loss_fn.named_parameters(prefix="loss_fn"))
        new_names = {*new_names, *(name for name, _ in loss_parameters)}
        depths = self._tower_depths()
        # Named parameters: the optimiser's state dict (and so every checkpoint) lists each group's
        # parameter names, and LearningRateMonitor logs lr-AdamW/<group name>.
        groups: dict[str, dict] = {}
        for name, parameter in [*self.model.named_parameters(), *loss_parameters]:
            if not parameter.requires_grad:
                continue
            new, no_decay = name in new_names, is_no_decay(name, parameter)
            group = ("new" if new else "pretrained") + ("_no_decay" if no_decay else "")
            rate = lr if new else tower_lr
            if not new and depths:
                group += f"_depth{depths[name]}"
                rate = tower_lr * self.hparams.layer_decay ** depths[name]
            groups.setdefault(group, {"name": group, "params": [], "lr": rate,
                                      "weight_decay": 0.0 if no_decay else self.hparams.weight_decay})
            groups[group]["params"].append((name, parameter))
        param_groups = [groups[name] for name in sorted(groups)]
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps,
                                      fused=self._fused_optimizer_fits(param_groups))
        # With --head_only_steps the towers' schedule starts later. Their gradients are still computed
        # (DDP expects every trainable parameter's) but a zero rate leaves them, and their decay, as they were.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
            warmup_cosine(self.hparams.warmup_steps, self.hparams.max_steps,
                          0 if group["name"].startswith("new") else self.hparams.head_only_steps)
            for group in param_groups
        ])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_optimizer_fits(self, param_groups: list[dict]) -> bool:
        """Whether AdamW may run as one fused kernel: every parameter on a CPU or CUDA device, and not
        under fp16 AMP with gradient clipping.

        Fused, one step of ViT-Small-16 takes a third of the per-parameter loop's time on 2 cores
        (the loop is torch's CPU default; BENCHMARKS.md). A fused AdamW unscales fp16 gradients
        itself, so Lightning refuses to clip them first: with --precision 16-mixed and
        --gradient_clip_val the loop stays.
        """
        parameters = [parameter for group in param_groups for _, parameter in group["params"]]
        if not all(parameter.device.type in ("cpu", "cuda") for parameter in parameters):
            return False
        trainer = self._trainer  # None when the module is used without a Trainer
        if trainer is not None and trainer.gradient_clip_val and str(trainer.precision).startswith("16"):
            return False
        return True

    def _tower_depths(self) -> dict[str, int]:
        """With --layer_decay, each tower parameter's depth below the top of its tower; else nothing."""
        if self.hparams.layer_decay == 1.0:
            return {}
        depths = getattr(self.model, "tower_depths", None)
        if depths is None:
            raise UserError(f"--layer_decay: {type(self.model).__name__} does not say how deep its layers are "
                            "(the pretrained-towers and OpenAI CLIP models do)")
        return depths()

    # ---- validation ----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._validation_outputs = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["image_paths"]) == 0:
            return
        encoded = encode_groups(self.model, batch, self.device, ImageViews.of(self.spec))
        caption_image_ids = encoded["caption_image_ids"]
        # The loss pairs each image with its first caption (captions of one image arrive together).
        first_caption = torch.ones_like(caption_image_ids, dtype=torch.bool)
        first_caption[1:] = caption_image_ids[1:] != caption_image_ids[:-1]
        loss = self.loss_fn(encoded["image_embeddings"], encoded["text_embeddings"][first_caption],
                            self.model.logit_scale, distributed=False)
        self.log("val/loss", loss, batch_size=len(batch["image_paths"]), sync_dist=True)
        self._validation_outputs.append(encoded)

    def on_validation_epoch_end(self) -> None:
        local = concat_encoded(self._validation_outputs, int(self.spec["embed_dim"]), self.device)
        self._validation_outputs = []
        encoded = {key: self._gather(value)[0] for key, value in local.items()}
        if encoded["image_ids"].numel() == 0 or encoded["caption_image_ids"].numel() == 0:
            return
        self.last_validated_step = self.global_step
        self.last_validation = split_embeddings(encoded)
        metrics = retrieval_metrics(*self.last_validation[1:])
        for name, value in metrics.items():
            self.log(f"val/{name}", value, rank_zero_only=True, sync_dist=False)

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[META_KEY] = {"spec": self.spec, "global_step": self.global_step}

    def on_train_end(self) -> None:
        if self.data_report.total_skipped():
            logger.warning("training skipped bad samples: %s", self.data_report.summary())

