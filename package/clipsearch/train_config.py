"""One training run's settings as data: built once from the flags (cli/train_args.py), read by the run."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESUME_CHOICES = ("auto", "last", "none")
# The keys of clipsearch.loss.LOSSES, named here so that parsing flags imports no torch.
LOSS_NAMES = ("contrastive", "sigmoid")
# On a CPU the image tower trains on slices of a batch (--cpu_image_slice), whose activations stay
# closer to the CPU's caches: EfficientNet-Lite2's trained stages (4 groups, from cached inputs)
# take 9.6 ms an image forward and backward in slices of 32 against 10.3 ms in slices of 128 at
# 224 px, and 12.8 against 14.7 at 256 px, on 2 cores (benchmarks/bench_cpu_chunks.py measures
# the default against one call). A trained BatchNorm then normalises each slice by its own
# statistics, as that many images per device would under DDP. Models whose image tower trains
# faster whole say so (`whole_batch_on_cpu`): a ViT has no BatchNorm and its matrix products like
# more rows (ViT-Small-16, 96 px, batch 64: 13% faster whole than in slices of 32).
CPU_TRAIN_IMAGE_SLICE = 32


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs, checked once after parsing; `model` holds the door's flags."""

    variant: str
    model: dict
    dataset_path: str
    val_path: str | None
    train_split: str
    val_split: str
    batch_size: int
    num_workers: int | None
    sample_num: int | None
    flip_images: bool
    lr: float
    tower_lr: float | None
    weight_decay: float
    loss: str
    warmup_steps: int
    max_steps: int
    gradient_clip_val: float | None
    accumulate_grad_batches: int
    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str
    precision: str | None
    val_check_interval: float
    fast_dev_run: int
    log_every_n_steps: int
    checkpoint_every_steps: int
    seed: int
    run_name: str
    resume: str
    models_dir: str
    logs_dir: str
    verbose: bool
    head_only_steps: int = 0
    layer_decay: float = 1.0
    caption_word_dropout: float = 0.0
    captions_per_image: int = 1
    image_column: str = "image"
    caption_column: str = "caption"
    cpu_image_slice: int | None = None  # None: the model's choice (see CPU_TRAIN_IMAGE_SLICE)
    identity: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.models_dir) / self.run_name

    @property
    def model_args(self) -> argparse.Namespace:
        """The door's model flags as the namespace its build function reads."""
        return argparse.Namespace(**self.model)

    def as_dict(self) -> dict:
        return asdict(self)
