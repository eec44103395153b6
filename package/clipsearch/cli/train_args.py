"""The flags every training door shares, checked and frozen into a TrainConfig; imports nothing heavy."""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipsearch.cli.common import (
    DEFAULT_DATASET,
    DEFAULT_LOGS_DIR,
    DEFAULT_MODELS_DIR,
    PRECISIONS,
    CommandParser,
    UserError,
    add_column_args,
    drop_rate,
    non_negative_int,
    positive_float,
    positive_int,
    unit_fraction,
)
from clipsearch.defaults import is_default_dataset, project_relative
from clipsearch.model_reference import OPENAI_WEIGHTS_DIR as LOCAL_WEIGHTS_DIR  # noqa: F401  the doors name it
from clipsearch.tables import TABLE_EXTENSIONS, check_columns, find_table, is_webdataset_path, table_columns
from clipsearch.train_config import CPU_TRAIN_IMAGE_SLICE, LOSS_NAMES, RESUME_CHOICES, TrainConfig

# Validation over the dev split is a whole pass: a 5-step run validating after every step spent
# 7 of its minutes there. The default interval is a fifth of the run but never below this, and
# the last step is always validated.
MIN_VAL_INTERVAL = 25
# Flags that set how long, where and how a run executes, not what it learns: a run resumes
# whatever they are. Every other flag (model, optimiser, the training stream) is its identity.
NOT_IDENTITY = frozenset({
    "max_steps", "val_path", "val_split", "num_workers", "accelerator", "devices", "num_nodes", "strategy",
    "precision", "val_check_interval", "fast_dev_run", "log_every_n_steps", "checkpoint_every_steps",
    "run_name", "resume", "models_dir", "logs_dir", "verbose", "cpu_image_slice",
})

# Model flags added after runs were made: left out of a run's identity while off, so those runs keep
# their folder and resume.
ADDED_MODEL_FLAGS = frozenset({"mirror_average", "image_drop_path"})


def add_training_args(parser: argparse.ArgumentParser, pretrained_towers: bool = False) -> argparse.ArgumentParser:
    """Flags every variant has (and --tower_lr for those with pretrained towers); each door adds a 'model' group."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_path", default=DEFAULT_DATASET,
                      help="dataset folder with train/dev tables, or webdataset shards (a .tar, a folder of them, "
                           "or a brace pattern like shards/{00000..00099}.tar) (default: the generated sample data)")
    data.add_argument("--val_path", default=None,
                      help="dataset folder holding the validation table (default: --dataset_path when it has one)")
    data.add_argument("--train_split", default="train", help="table name for training pairs")
    data.add_argument("--val_split", default="dev", help="table name for validation; missing -> no validation")
    data.add_argument("--batch_size", type=positive_int, default=64,
                      help="pairs (images, with --captions_per_image) per device per step (the contrastive batch "
                           "is this x devices x nodes)")
    data.add_argument("--num_workers", type=non_negative_int, default=None,
                      help="DataLoader workers per device (default: cores/devices - 1, at most 8)")
    data.add_argument("--flip_images", action="store_true",
                      help="mirror half of the training images at random (and of the cached crops with "
                           "--cache_image_views); captions that name a side are then wrong on those")
    data.add_argument("--caption_word_dropout", type=drop_rate, default=0.0,
                      help="drop each word of a training caption with this probability (one word always "
                           "stays), drawn anew each time the pair is read; validation reads whole captions")
    data.add_argument("--captions_per_image", type=positive_int, default=1,
                      help="1: one training pair per table row. N > 1: one item per image with up to N of its "
                           "captions, drawn anew each epoch; --batch_size then counts images, the loss takes "
                           "all of an image's captions as positives, and one image forward serves N captions")
    data.add_argument("--sample_num", type=positive_int, default=None, help="use only the first N training pairs (quick runs)")
    add_column_args(data)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the variant's)")
    if pretrained_towers:
        optim.add_argument("--tower_lr", type=positive_float, default=None,
                           help="learning rate of the pretrained towers; the new projections and the logit scale "
                                "train at --lr (default: --lr; lower it to keep more of what the towers know)")
        optim.add_argument("--head_only_steps", type=non_negative_int, default=0,
                           help="train only the new projections and temperature for the first N steps, then the "
                                "towers too, with their own warmup (linear probe, then finetune: the towers are "
                                "not pulled by untrained heads); their rate is zero until then")
        optim.add_argument("--layer_decay", type=unit_fraction, default=1.0,
                           help="layer-wise rate decay: the top layer of each tower trains at --tower_lr, each "
                                "layer below at this times the one above (embeddings lowest), so the general "
                                "early layers move least (BEiT's fine-tuning recipe; 1: off)")
    optim.add_argument("--weight_decay", type=float, default=0.2,
                       help="AdamW weight decay (never on biases, norms, embeddings, logit scale)")
    optim.add_argument("--loss", choices=LOSS_NAMES, default="contrastive",
                       help="contrastive: CLIP's softmax over the batch; sigmoid: SigLIP's loss, each pair on its "
                            "own with a learnt bias, which leans less on large batches")
    optim.add_argument("--warmup_steps", type=non_negative_int, default=None,
                       help="linear warmup steps before cosine decay (default: 10%% of max_steps)")
    optim.add_argument("--max_steps", type=positive_int, default=None, help="optimiser steps to train (default: the variant's)")
    optim.add_argument("--gradient_clip_val", type=positive_float, default=None, help="clip gradient norm to this value")
    optim.add_argument("--accumulate_grad_batches", type=positive_int, default=1, help="optimiser step every N batches")

    trainer = parser.add_argument_group("trainer")
    trainer.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, mps")
    trainer.add_argument("--devices", "--num_gpus", dest="devices", default="auto",
                         help="devices (processes) per node, an int or 'auto'; --num_gpus is an alias")
    trainer.add_argument("--num_nodes", type=positive_int, default=1, help="machines in the job (set by SLURM/torchrun launchers)")
    trainer.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, ddp_spawn, fsdp, ...")
    trainer.add_argument("--precision", default=None, choices=PRECISIONS,
                         help="32, 16-mixed (CUDA) or bf16-mixed; native torch AMP, no apex "
                              "(default: 16-mixed on CUDA, else 32)")
    trainer.add_argument("--cpu_image_slice", type=positive_int, default=None,
                         help="on a CPU, train the image tower on this many images of a batch at a time, which is "
                              "faster there for convolutional towers; a trained BatchNorm normalises each slice on "
                              f"its own, as under DDP (default: {CPU_TRAIN_IMAGE_SLICE}, or the whole batch for a "
                              "ViT; GPUs take the whole batch)")
    trainer.add_argument("--val_check_interval", type=positive_float, default=None,
                         help="validate every N steps (>= 1) or fraction of an epoch (< 1) "
                              f"(default: 5 times per run, at most every {MIN_VAL_INTERVAL} steps; the last step always)")
    trainer.add_argument("--fast_dev_run", type=non_negative_int, default=0,
                         help="run N train and val batches only, write nothing (no checkpoint, log or run folder)")
    trainer.add_argument("--log_every_n_steps", type=positive_int, default=10, help="scalar logging interval")
    trainer.add_argument("--checkpoint_every_steps", type=positive_int, default=100,
                         help="write last.ckpt this often (what a killed run resumes from)")

    program = parser.add_argument_group("program")
    program.add_argument("--seed", type=int, default=0,
                         help="random seed: the same seed and flags give the same initial weights, data order and metrics")
    program.add_argument("--run_name", default=None,
                         help="run folder name under models/ and logs/ (default: from key settings and a hash of "
                              "every model, optimiser and data flag)")
    program.add_argument("--resume", default="auto",
                         help="'auto' (continue models/<run>/last.ckpt when it was made with the same model, optimiser "
                              "and data flags), 'last', 'none', or a checkpoint path")
    program.add_argument("--models_dir", default=DEFAULT_MODELS_DIR, help="where run folders with checkpoints go")
    program.add_argument("--logs_dir", default=DEFAULT_LOGS_DIR, help="where TensorBoard run folders go")
    program.add_argument("--verbose", action="store_true",
                         help="show library messages too (model summary, Lightning tips and warnings, weight loading)")
    return parser


def add_lock_args(group) -> None:
    """Tower freezing flags for variants that start from pretrained towers (LiT and partial unlocking)."""
    group.add_argument("--lock_image", action="store_true", help="freeze the image tower (LiT)")
    group.add_argument("--lock_image_unlocked_groups", type=non_negative_int, default=0,
                       help="with --lock_image, leave the last N stages of the image tower trainable")
    group.add_argument("--lock_text", action="store_true", help="freeze the text tower")
    group.add_argument("--lock_text_unlocked_layers", type=non_negative_int, default=0,
                       help="with --lock_text, leave the last N transformer layers trainable")
    group.add_argument("--cache_image_views", type=non_negative_int, default=0,
                       help="with --lock_image, run the locked image stages once on N random crops of each training "
                            "image and train on their cached outputs (pretrained-towers variant; 0: off)")


def add_mirror_arg(group) -> None:
    group.add_argument("--mirror_average", action="store_true",
                       help="embed each image as the mean of its own and its mirror image's embedding, at "
                            "validation, encoding and image search alike (recorded in the checkpoint; twice the "
                            "image encoding work; training mirrors only with --flip_images)")


def training_parser(description: str) -> tuple[CommandParser, argparse._ArgumentGroup]:
    """A door's parser and its empty 'model' group, shown first in --help."""
    # Forty flags make a 28-line usage; an error should stay one line plus this.
    parser = CommandParser(description=description, usage="%(prog)s [flags]   (all flags: --help)")
    return parser, parser.add_argument_group("model")


@dataclass(frozen=True)
class VariantDefaults:
    """What a door sets as its own defaults for flags left as None."""

    lr: float
    max_steps: int


def _devices(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        devices = int(text)
    except ValueError:
        raise UserError(f"--devices must be an integer or 'auto', not {text!r}") from None
    if devices < 1:
        raise UserError("--devices must be at least 1")
    return devices


def check_dataset(dataset_path: str, split: str, flag: str = "--dataset_path", shards_allowed: bool = True,
                  image_column: str = "image", caption_column: str | None = "caption") -> None:
    """One line naming the flag when the split's table cannot be found or lacks the columns asked for
    (`caption_column` None: only images are read).

    The default sample data always passes: training generates it when it is missing or incomplete.
    """
    if is_default_dataset(dataset_path):
        return
    if shards_allowed and is_webdataset_path(dataset_path):
        return
    folder = Path(dataset_path)
    if not folder.exists():
        raise UserError(f"{flag} {dataset_path}: no such folder (prepare one, e.g. python dataset/flickr8k/prepare.py)")
    if not folder.is_dir():
        raise UserError(f"{flag} {dataset_path} is not a folder of tables or webdataset shards")
    try:
        table = find_table(folder, split)
    except FileNotFoundError:
        tried = ", ".join(f"{split}{extension}" for extension in TABLE_EXTENSIONS)
        raise UserError(f"{flag} {dataset_path} holds no '{split}' table (looked for {tried})") from None
    check_columns(table, table_columns(table), image_column, caption_column)


def _identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:6]


def default_run_name(variant: str, dataset_path: str, batch_size: int, lr: float, max_steps: int, identity: dict) -> str:
    """Readable key settings, then a hash of the whole identity so runs that differ never share a folder."""
    dataset = Path(dataset_path.rstrip("/")).name or "data"
    name = f"{variant}-{dataset}-bs{batch_size}-lr{lr:g}-steps{max_steps}-{_identity_hash(identity)}"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def training_config(args: argparse.Namespace, model_group, variant: str,
                    defaults: VariantDefaults) -> TrainConfig:
    """Fill the variant's defaults, check every flag and path (one line on error), freeze the result."""
    settings = vars(args).copy()
    model_flags = {action.dest for action in model_group._group_actions}
    model = {name: settings.pop(name) for name in sorted(model_flags)}
    lr = defaults.lr if settings["lr"] is None else settings["lr"]
    max_steps = defaults.max_steps if settings["max_steps"] is None else settings["max_steps"]
    # Doors with pretrained towers record the towers' effective rate, so "--tower_lr = --lr" and
    # no --tower_lr are one run identity.
    has_towers = "tower_lr" in settings
    tower_lr = settings.pop("tower_lr", None)
    if has_towers and tower_lr is None:
        tower_lr = lr
    head_only_steps = settings.pop("head_only_steps", 0)
    warmup_steps = max_steps // 10 if settings["warmup_steps"] is None else settings["warmup_steps"]
    if warmup_steps >= max_steps:
        raise UserError(f"--warmup_steps ({warmup_steps}) must be below --max_steps ({max_steps})")
    if head_only_steps + warmup_steps >= max_steps:
        raise UserError(f"--head_only_steps ({head_only_steps}) and then the towers' --warmup_steps ({warmup_steps}) "
                        f"must end before --max_steps ({max_steps})")
    batch_size = settings["batch_size"]
    if settings["sample_num"] is not None and settings["sample_num"] < batch_size:
        raise UserError(f"--sample_num ({settings['sample_num']}) is smaller than one batch ({batch_size})")
    resume = settings["resume"]
    if resume not in RESUME_CHOICES and not Path(resume).is_file():
        raise UserError(f"--resume: no checkpoint at {resume} (or pass one of {', '.join(RESUME_CHOICES)})")
    columns = {"image_column": settings["image_column"], "caption_column": settings["caption_column"]}
    check_dataset(settings["dataset_path"], settings["train_split"], **columns)
    if settings["val_path"] is not None:
        check_dataset(settings["val_path"], settings["val_split"], flag="--val_path", **columns)
    interval = settings["val_check_interval"]
    if interval is None:
        interval = max(MIN_VAL_INTERVAL, max_steps // 5)
    settings.update(lr=lr, max_steps=max_steps, warmup_steps=warmup_steps, val_check_interval=interval,
                    devices=_devices(str(settings["devices"])))
    # Flags added later leave identities when at their default, as they were before the flag.
    identity_model = {name: value for name, value in model.items() if name not in ADDED_MODEL_FLAGS or value}
    identity = {"variant": variant, "model": identity_model, "tower_lr": tower_lr}
    if head_only_steps:
        identity["head_only_steps"] = head_only_steps
    identity |= {name: value for name, value in settings.items() if name not in NOT_IDENTITY}
    identity["dataset_path"] = project_relative(identity["dataset_path"])
    if identity["loss"] == "contrastive":
        del identity["loss"]
    if identity.get("layer_decay") == 1.0:
        del identity["layer_decay"]
    if not identity["flip_images"]:
        del identity["flip_images"]
    if not identity["caption_word_dropout"]:
        del identity["caption_word_dropout"]
    if identity["captions_per_image"] == 1:
        del identity["captions_per_image"]
    for name, default in (("image_column", "image"), ("caption_column", "caption")):
        if identity[name] == default:
            del identity[name]
    run_name = settings.pop("run_name") or default_run_name(
        variant, settings["dataset_path"], batch_size, lr, max_steps, identity)
    return TrainConfig(variant=variant, model=model, tower_lr=tower_lr, head_only_steps=head_only_steps,
                       run_name=run_name, identity=identity, **settings)


def train_with(config: TrainConfig, build_name: str):
    """Run training with the named build function of `clipsearch.variants`, importing torch only now."""
    from clipsearch import variants
    from clipsearch.train import run_training

    return run_training(config, getattr(variants, build_name))


@dataclass(frozen=True)
class TrainingDoor:
    """One training variant's command: what differs between the three doors, and nothing else."""

    description: str
    defaults: VariantDefaults
    add_model_args: Callable[[argparse._ArgumentGroup], None]
    # The run-name tag from the parsed flags, e.g. "openai-scratch-ViT-B-32".
    variant: Callable[[argparse.Namespace], str]
    # The function of `clipsearch.variants` that builds (model, transforms, tokenizer).
    build: str
    # Towers start pretrained: the lock flags and --tower_lr apply.
    pretrained_towers: bool = False
    # Fills model flags whose default depends on other flags, before the run is named.
    complete: Callable[[argparse.Namespace], None] | None = None

    def parse_args(self, argv: list[str] | None = None) -> TrainConfig:
        parser, model = training_parser(self.description)
        self.add_model_args(model)
        if self.pretrained_towers:
            add_lock_args(model)
        add_mirror_arg(model)
        add_training_args(parser, pretrained_towers=self.pretrained_towers)
        args = parser.parse_args(argv)
        if self.complete is not None:
            self.complete(args)
        return training_config(args, model, self.variant(args), self.defaults)

    def main(self, argv: list[str] | None = None):
        return train_with(self.parse_args(argv), self.build)
