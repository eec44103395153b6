"""The training run every variant shares: common flags, data loaders, Trainer, checkpoints and resume."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from clipsearch.data import (
    DataReport,
    ImageCaptionDataset,
    ImageGroupDataset,
    collate_groups,
    collate_pairs,
    find_table,
    read_table,
)
from clipsearch.lightning_module import CLIPModule
from clipsearch.models import ModelBundle
from clipsearch.training_order import ResumableLoader, ResumableSampler
from clipsearch.webdataset_source import is_webdataset_path, make_webdataset

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "dataset/sample"
PRECISIONS = ("32", "16-mixed", "bf16-mixed")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every variant has; each door adds a 'model' group of its own."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_path", default=DEFAULT_DATASET,
                      help="dataset folder with train/dev tables, or webdataset shards (a .tar, a folder of them, "
                           "or a brace pattern like shards/{00000..00099}.tar) (default: the generated sample data)")
    data.add_argument("--val_path", default=None,
                      help="dataset folder holding the validation table (default: --dataset_path when it has one)")
    data.add_argument("--train_split", default="train", help="table name for training pairs")
    data.add_argument("--val_split", default="dev", help="table name for validation; missing -> no validation")
    data.add_argument("--batch_size", type=int, default=64, help="pairs per device per step (the contrastive batch is this x devices x nodes)")
    data.add_argument("--num_workers", type=int, default=None, help="DataLoader workers per device (default: cores/devices - 1, at most 8)")
    data.add_argument("--sample_num", type=int, default=None, help="use only the first N training pairs (quick runs)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the variant's)")
    optim.add_argument("--tower_lr", type=float, default=None, help="learning rate of pretrained towers (default: --lr)")
    optim.add_argument("--weight_decay", type=float, default=0.2, help="AdamW weight decay (never on biases, norms, embeddings, logit scale)")
    optim.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps before cosine decay (default: 10%% of max_steps)")
    optim.add_argument("--max_steps", type=int, default=None, help="optimiser steps to train (default: the variant's)")
    optim.add_argument("--gradient_clip_val", type=float, default=None, help="clip gradient norm to this value")
    optim.add_argument("--accumulate_grad_batches", type=int, default=1, help="optimiser step every N batches")

    trainer = parser.add_argument_group("trainer")
    trainer.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, mps")
    trainer.add_argument("--devices", "--num_gpus", dest="devices", default="auto",
                         help="devices (processes) per node, an int or 'auto'; --num_gpus is an alias")
    trainer.add_argument("--num_nodes", type=int, default=1, help="machines in the job (set by SLURM/torchrun launchers)")
    trainer.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, ddp_spawn, fsdp, ...")
    trainer.add_argument("--precision", default=None, choices=PRECISIONS,
                         help="32, 16-mixed (CUDA) or bf16-mixed; native torch AMP, no apex (default: 16-mixed on CUDA, else 32)")
    trainer.add_argument("--val_check_interval", type=float, default=None,
                         help="validate every N steps (>= 1) or fraction of an epoch (< 1) (default: 5 times per run)")
    trainer.add_argument("--fast_dev_run", type=int, default=0, help="run N train and val batches only, write nothing")
    trainer.add_argument("--log_every_n_steps", type=int, default=10, help="scalar logging interval")
    trainer.add_argument("--checkpoint_every_steps", type=int, default=100, help="write last.ckpt this often (what a killed run resumes from)")

    program = parser.add_argument_group("program")
    program.add_argument("--seed", type=int, default=0, help="random seed")
    program.add_argument("--run_name", default=None, help="run folder name under models/ and logs/ (default: from key settings)")
    program.add_argument("--resume", default="auto",
                         help="'auto' (continue models/<run>/last.ckpt if present), 'last', 'none', or a checkpoint path")
    program.add_argument("--models_dir", default="models", help="where run folders with checkpoints go")
    program.add_argument("--logs_dir", default="logs", help="where TensorBoard run folders go")
    return parser


@dataclass
class VariantDefaults:
    """What a door sets as its own defaults for flags left as None."""

    lr: float
    max_steps: int
    batch_size: int | None = None


def finish_args(args: argparse.Namespace, defaults: VariantDefaults) -> argparse.Namespace:
    """Fill variant defaults and reject unusable combinations with a message naming the flag."""
    args.lr = defaults.lr if args.lr is None else args.lr
    args.max_steps = defaults.max_steps if args.max_steps is None else args.max_steps
    if args.devices != "auto":
        try:
            args.devices = int(args.devices)
        except ValueError:
            raise SystemExit(f"--devices must be an integer or 'auto', not {args.devices!r}") from None
        if args.devices < 1:
            raise SystemExit("--devices must be at least 1")
    for flag in ("batch_size", "max_steps", "accumulate_grad_batches", "num_nodes", "checkpoint_every_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.lr <= 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")
    if args.warmup_steps is None:
        args.warmup_steps = args.max_steps // 10
    if not 0 <= args.warmup_steps < args.max_steps:
        raise SystemExit(f"--warmup_steps ({args.warmup_steps}) must be below --max_steps ({args.max_steps})")
    if args.sample_num is not None and args.sample_num < args.batch_size:
        raise SystemExit(f"--sample_num ({args.sample_num}) is smaller than one batch ({args.batch_size})")
    cuda = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
    if args.precision is None:
        args.precision = "16-mixed" if cuda else "32"
    if args.precision == "16-mixed" and not cuda:
        raise SystemExit("--precision=16-mixed needs a CUDA GPU; on the CPU use 32 or bf16-mixed")
    if args.val_check_interval is None:
        args.val_check_interval = max(1, args.max_steps // 5)
    if args.resume not in ("auto", "last", "none") and not Path(args.resume).is_file():
        raise SystemExit(f"--resume: no checkpoint at {args.resume}")
    # Generated now rather than at loading time, so doors can read its native image size.
    _ensure_data(args.dataset_path)
    return args


def default_run_name(args: argparse.Namespace, variant_tag: str) -> str:
    dataset = Path(args.dataset_path.rstrip("/")).name or "data"
    name = f"{variant_tag}-{dataset}-bs{args.batch_size}-lr{args.lr:g}-steps{args.max_steps}"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


class ReproducibleSteps(Callback):
    """Makes each step's randomness a function of (seed, step, rank), and tracks the sampler.

    Dropout draws from torch's global generator, whose state no checkpoint holds; seeding it per
    step means a resumed run draws what the uninterrupted one drew. The sampler learns how far
    the epoch got from the batches the loop finished (not from what the loader fetched ahead), so
    a checkpoint resumes at the next pair.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.manual_seed(self.seed * 1_000_003 + trainer.global_step * 1_009 + trainer.global_rank)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.sampler.position = (batch_idx + 1) * loader.batch_size


class ThroughputLogger(Callback):
    """Samples per second over the last logging window, the figure the benchmarks compare."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._started = None
        self._samples = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._started is None:  # the first batch pays for worker start-up; leave it out
            self._started, self._samples = time.perf_counter(), 0
            return
        self._samples += len(batch["image_paths"]) * trainer.world_size
        if (batch_idx + 1) % self.every_n_steps == 0:
            elapsed = time.perf_counter() - self._started
            module.log("train/samples_per_sec", self._samples / max(elapsed, 1e-9), rank_zero_only=True)
            self._started, self._samples = time.perf_counter(), 0


def _ensure_data(dataset_path: str) -> None:
    if dataset_path.rstrip("/") == DEFAULT_DATASET:
        from clipsearch.sample_data import ensure_sample_dataset

        ensure_sample_dataset(DEFAULT_DATASET)


def _training_set(args: argparse.Namespace, bundle: ModelBundle, report: DataReport):
    """Map-style pairs from a table, or a stream from webdataset shards (YFCC-scale runs)."""
    if is_webdataset_path(args.dataset_path):
        # A stream has no length: every rank and worker yields the same count so DDP steps stay in lockstep.
        samples = args.sample_num or args.max_steps * args.batch_size * args.accumulate_grad_batches
        return make_webdataset(args.dataset_path, bundle.train_transform, bundle.tokenizer, epoch_samples=samples)
    table = read_table(args.dataset_path, args.train_split, report=report)
    if args.sample_num is not None:
        table = table.iloc[: args.sample_num]
    if len(table) < args.batch_size:
        raise SystemExit(f"{args.dataset_path}: {len(table)} usable training pairs, fewer than one batch ({args.batch_size})")
    return ImageCaptionDataset(table, bundle.train_transform, bundle.tokenizer)


def make_loaders(args: argparse.Namespace, bundle: ModelBundle):
    """Training pairs (shuffled, full batches so every rank gathers equal shapes) and dev groups."""
    report = DataReport()
    train_set = _training_set(args, bundle, report)
    streaming = isinstance(train_set, IterableDataset)
    workers = args.num_workers
    if workers is None:
        per_device = (os.cpu_count() or 2) // (args.devices if isinstance(args.devices, int) else 1)
        workers = max(0, min(8, per_device - 1))
    loader_options = {
        "batch_size": args.batch_size,
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    if streaming:
        train_loader = DataLoader(train_set, drop_last=True, collate_fn=collate_pairs, **loader_options)
    else:
        train_loader = ResumableLoader(train_set, sampler=ResumableSampler(len(train_set), args.seed), drop_last=True,
                                       collate_fn=collate_pairs, **loader_options)
    val_path = args.val_path or args.dataset_path
    val_set = None
    try:
        find_table(val_path, args.val_split)
    except (FileNotFoundError, NotADirectoryError):
        if args.val_path:
            raise SystemExit(f"--val_path: no '{args.val_split}' table in {args.val_path}") from None
        logger.warning("no '%s' table in %s: training without validation", args.val_split, val_path)
    else:
        val_set = ImageGroupDataset(read_table(val_path, args.val_split, report=report),
                                    bundle.eval_transform, bundle.tokenizer)
    val_loader = (
        DataLoader(val_set, shuffle=False, collate_fn=collate_groups, **loader_options) if val_set is not None else None
    )
    if report.total_skipped():
        logger.warning("tables: %s", report.summary())
    return train_loader, val_loader, val_set


def _resume_path(args: argparse.Namespace, run_dir: Path) -> str | None:
    last = run_dir / "last.ckpt"
    if args.resume == "none":
        if last.exists():
            raise SystemExit(f"{run_dir} already holds a run; pass --resume auto to continue it or another --run_name")
        return None
    if args.resume == "auto":
        return str(last) if last.exists() else None
    if args.resume == "last":
        if not last.exists():
            raise SystemExit(f"--resume last: no {last} to continue from")
        return str(last)
    return args.resume


@dataclass
class RunResult:
    run_dir: Path
    start_step: int  # above zero when the run resumed
    global_step: int
    metrics: dict  # final validation metrics, empty without a dev split


def run_training(args: argparse.Namespace, build: Callable[[argparse.Namespace], ModelBundle],
                 variant_tag: str) -> RunResult:
    """Build the model with `build(args)`, train it and write its checkpoints.

    Returns where, from which step, and how well. Seeds before building, so new layers start
    from the same weights in every run with the same --seed.
    """
    L.seed_everything(args.seed, workers=True, verbose=False)
    bundle = build(args)
    run_name = args.run_name or default_run_name(args, variant_tag)
    run_dir = Path(args.models_dir) / run_name
    resume_from = _resume_path(args, run_dir)
    train_loader, val_loader, val_set = make_loaders(args, bundle)
    module = CLIPModule(
        bundle.model,
        bundle.spec,
        lr=args.lr,
        tower_lr=args.tower_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        panel_image_paths=val_set.image_paths if val_set is not None else None,
        panel_captions=val_set.captions_per_image if val_set is not None else None,
    )
    best_checkpoint = ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val/mean_recall", mode="max",
                                      save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False)
    last_checkpoint = ModelCheckpoint(dirpath=run_dir, save_top_k=0, save_last=True,
                                      every_n_train_steps=args.checkpoint_every_steps, enable_version_counter=False)
    callbacks = [last_checkpoint, LearningRateMonitor(logging_interval="step"), ThroughputLogger(args.log_every_n_steps),
                 ReproducibleSteps(args.seed)]
    if val_loader is not None:
        callbacks.insert(0, best_checkpoint)
    interval = args.val_check_interval
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        max_steps=args.max_steps,
        max_epochs=-1,
        gradient_clip_val=args.gradient_clip_val,
        accumulate_grad_batches=args.accumulate_grad_batches,
        val_check_interval=int(interval) if interval >= 1 else interval,
        check_val_every_n_epoch=None if interval >= 1 else 1,
        num_sanity_val_steps=0,
        limit_val_batches=None if val_loader is not None else 0,
        fast_dev_run=args.fast_dev_run or False,
        log_every_n_steps=args.log_every_n_steps,
        logger=TensorBoardLogger(args.logs_dir, name=run_name, version="", default_hp_metric=False),
        callbacks=callbacks,
        # Streams split their shards over ranks themselves; tables get Lightning's distributed sampler.
        use_distributed_sampler=not isinstance(train_loader.dataset, IterableDataset),
    )
    if trainer.is_global_zero and not args.fast_dev_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        params = {k: v for k, v in vars(args).items()} | {"run_name": run_name, "variant": variant_tag}
        (run_dir / "params.json").write_text(json.dumps(params, indent=2, default=str))
    if resume_from:
        logger.info("resuming from %s", resume_from)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from)
    if args.fast_dev_run:
        return RunResult(run_dir, module.start_step, trainer.global_step, {})
    metrics = _finish_run(trainer, module, val_loader, best_checkpoint, run_dir)
    if trainer.is_global_zero:
        _point_latest(Path(args.models_dir), run_name)
        summary = ", ".join(f"{k.removeprefix('val/')} {v:.1f}" for k, v in metrics.items() if "R@" in k)
        print(f"run {run_name}: step {trainer.global_step}, checkpoints in {run_dir}; dev {summary or 'not validated'}")
    return RunResult(run_dir, module.start_step, trainer.global_step, metrics)


def _finish_run(trainer, module, val_loader, best_checkpoint, run_dir: Path) -> dict:
    """Make last.ckpt the final state and best.ckpt the best validated one, the final model included."""
    trainer.save_checkpoint(run_dir / "last.ckpt")
    if val_loader is None:
        trainer.save_checkpoint(run_dir / "best.ckpt")
        return {}
    validated_at = getattr(module, "last_validated_step", None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if validated_at != trainer.global_step or "val/mean_recall" not in metrics:
        results = trainer.validate(module, val_loader, verbose=False)
        metrics = {k: float(v) for k, v in results[0].items()} if results else {}
        best = best_checkpoint.best_model_score
        score = metrics.get("val/mean_recall")
        if score is not None and (best is None or score > float(best)):
            trainer.save_checkpoint(run_dir / "best.ckpt")
    return metrics


def _point_latest(models_dir: Path, run_name: str) -> None:
    """models/latest -> the newest run, so encoding and search find a model without flags."""
    latest = models_dir / "latest"
    temporary = models_dir / f".latest-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(run_name, target_is_directory=True)
    os.replace(temporary, latest)


def make_parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_lock_args(group) -> None:
    """Tower freezing flags for variants that start from pretrained towers (LiT and partial unlocking)."""
    group.add_argument("--lock_image", action="store_true", help="freeze the image tower (LiT)")
    group.add_argument("--lock_image_unlocked_groups", type=int, default=0,
                       help="with --lock_image, leave the last N stages of the image tower trainable")
    group.add_argument("--lock_text", action="store_true", help="freeze the text tower")
    group.add_argument("--lock_text_unlocked_layers", type=int, default=0,
                       help="with --lock_text, leave the last N transformer layers trainable")


def apply_locks(model, args: argparse.Namespace) -> None:
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups)
    if args.lock_text:
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %.1fM of %.1fM", trainable / 1e6, total / 1e6)
