"""The training run every variant shares: data loaders, Trainer, checkpoints, resume and the run folder."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from clipsearch.allocator import reuse_freed_memory
from clipsearch.data_report import DataReport
from clipsearch.datasets import (
    CachedImageCaptionDataset,
    ImageCaptionDataset,
    ImageGroupDataset,
    WordDropout,
    collate_groups,
    collate_pairs,
)
from clipsearch.defaults import default_num_workers
from clipsearch.durable import FolderLock, atomic_write, fsync_folder, write_json
from clipsearch.errors import UserError
from clipsearch.evaluate import format_metrics
from clipsearch.image_cache import ImageFeatureCache
from clipsearch.lightning_module import CLIPModule
from clipsearch.models import ModelBundle
from clipsearch.models.transforms import TRAIN_CROP, split_normalize, with_random_mirror
from clipsearch.result_panel import ResultPanel
from clipsearch.sample_data import prepare_default_sample
from clipsearch.tables import find_table, is_webdataset_path, read_table
from clipsearch.train_config import RESUME_CHOICES, TrainConfig
from clipsearch.training_order import ResumableLoader, ResumableSampler, seed_generators
from clipsearch.webdataset_source import make_webdataset

logger = logging.getLogger(__name__)

# What a run folder says about itself: the identity that --resume auto compares, and whether it finished.
RUN_FILE = "run.json"
LAST_CHECKPOINT = "last.ckpt"
# The last.ckpt before the current one, kept so that a resume has a good checkpoint to fall back on.
PREVIOUS_CHECKPOINT = "last-previous.ckpt"
# Where an unreadable last.ckpt is put aside when a resume falls back on the previous one.
UNREADABLE_SUFFIX = ".unreadable"
# Model flags that leave the locked image stages' outputs as they are: the image cache ignores them.
FLAGS_NOT_IN_IMAGE_FEATURES = frozenset({
    "pretrain_text", "text_length", "text_pooling", "lock_text", "lock_text_unlocked_layers", "embed_dim",
    "mirror_average", "image_drop_path",  # stochastic depth acts only in the trained stages, after the cache
})
# A run that ends below this many steps (or any --fast_dev_run) is a smoke test: it keeps its run
# folder but never becomes models/latest, which encoding and search use by default.
SMOKE_STEPS = 50
# How long ranks wait for each other to finish their shares of the image cache (see wait_for_every_rank).
CACHE_WAIT = timedelta(hours=12)


def quiet_libraries(verbose: bool) -> None:
    """Leave the user what they need (run folder, progress, validation, where things went).

    Without --verbose, library chatter is silenced: Lightning's info lines and tips, the model
    summary (turned off in the Trainer), warnings a user cannot act on, and transformers' weight
    loading report and progress bars.
    """
    if verbose:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (r"Checkpoint directory .* exists and is not empty", r".*LeafSpec.*deprecated",
                    r"The number of training batches .* is smaller",
                    r".*does not have many workers", r".*module\(s\) in eval mode", r".*sync_dist=True"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported: the variables above came too late
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


class CtrlC(Callback):
    """Ctrl-C stops the run even when Python lost the first KeyboardInterrupt.

    Python raises KeyboardInterrupt wherever the main thread is; inside a finalizer (a DataLoader
    iterator's `__del__` joins its workers, which takes a while) it is printed as "Exception
    ignored" and dropped, and the run would go on to its end. The handler also remembers the key,
    and the next batch raises it again, from where Lightning's graceful shutdown catches it. A
    process started with SIGINT ignored (a background job of a script) keeps ignoring it.
    """

    def __init__(self):
        self.pressed = False
        self.previous = None

    def _handle(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def install(self) -> None:
        """Take over SIGINT from Python's default handler (only that one, only in the main thread)."""
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self.previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self.previous)
        self.previous = None

    def _raise_if_pressed(self, *args) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    on_train_batch_start = on_train_batch_end = on_validation_batch_start = _raise_if_pressed


class ReproducibleSteps(Callback):
    """Makes each step's randomness a function of (seed, step, rank), and keeps the sampler's place.

    Dropout draws from torch's global generator, whose state no checkpoint holds; seeding it per
    step means a resumed run draws what the uninterrupted one drew. The sampler learns how far
    the epoch got from the batches the loop finished (not from what the loader fetched ahead),
    and its state travels in this callback's checkpoint entry: Lightning's own loader entry is
    missing from a checkpoint saved after `fit` returns, as the final last.ckpt is.
    """

    def __init__(self, seed: int, sampler: ResumableSampler | None):
        self.seed = seed
        self.sampler = sampler

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        seed_generators(self.seed * 1_000_003 + trainer.global_step * 1_009 + trainer.global_rank, module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.sampler is not None:
            self.sampler.position = (batch_idx + 1) * trainer.train_dataloader.batch_size

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, committing each file in its own folder (durable.atomic_write).

    Lightning stages a checkpoint in $TMPDIR and moves it into place: across filesystems the move
    is a copy into the final name, which a kill or a full disk cuts short (a truncated last.ckpt
    that blocks resuming, and a temporary left in $TMPDIR). Here the file is serialised straight
    into a temporary beside its final name (not into memory first, which would add the whole
    checkpoint to the run's peak memory), flushed and renamed; a full disk is one line naming the
    folder. Before last.ckpt is replaced, the current one becomes last-previous.ckpt (a hard link:
    no copy).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name == LAST_CHECKPOINT and path.is_file():
            keep_as_previous(path)
        tensor_bytes = sum(value.nbytes for value in _tensors(checkpoint))
        atomic_write(path, lambda stream: torch.save(checkpoint, stream), size_hint=tensor_bytes)


def _tensors(value):
    """Every tensor inside nested dicts, lists and tuples (a checkpoint's weights and optimiser state)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def keep_as_previous(last: Path) -> None:
    """Make last-previous.ckpt the current last.ckpt, which stays in place meanwhile.

    Done before the new last.ckpt is written, so at most two checkpoints are ever on disk.
    """
    previous = last.with_name(PREVIOUS_CHECKPOINT)
    linked = last.with_name(f".{PREVIOUS_CHECKPOINT}.{os.getpid()}")
    linked.unlink(missing_ok=True)
    try:
        os.link(last, linked)
    except OSError:  # a filesystem without hard links: the previous checkpoint is not kept
        return
    os.replace(linked, previous)
    fsync_folder(last.parent)


def checkpoint_problem(path: Path) -> tuple[str | None, int | None]:
    """(why the checkpoint cannot be resumed from, or None; its global step when it can)."""
    try:
        # Memory-mapped: only the record index and the small entries are read, not the weights.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - a cut or foreign file fails in many ways
        return (str(error).strip().splitlines() or [type(error).__name__])[0][:160], None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a training checkpoint", None
    return None, int(checkpoint.get("global_step", 0))


def readable_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a resume continues from: last.ckpt, or the previous one when last.ckpt cannot be read."""
    last, previous = run_dir / LAST_CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT
    problem = checkpoint_problem(last)[0] if last.is_file() else "missing"
    if problem is None:
        return last
    fallback_problem, step = checkpoint_problem(previous) if previous.is_file() else ("missing", None)
    if fallback_problem is None:
        print(f"warning: {last} cannot be read ({problem}); resuming from {previous} (step {step}), the checkpoint "
              "before it", file=sys.stderr, flush=True)
        return previous
    raise UserError(f"--resume {resume}: {last} cannot be read ({problem}) and there is no earlier good checkpoint "
                    f"({previous.name}: {fallback_problem}); pass another --run_name to start again")


def set_aside_unreadable(run_dir: Path, resume_from: str | None) -> None:
    """Before a run resumes from the previous checkpoint, move the unreadable last.ckpt out of its way.

    Otherwise the next save would keep it as the previous checkpoint, replacing the good one.
    """
    last = run_dir / LAST_CHECKPOINT
    if resume_from is None or Path(resume_from) != run_dir / PREVIOUS_CHECKPOINT or not last.exists():
        return
    if checkpoint_problem(last)[0] is None:  # the previous one was asked for by name; the last is fine
        return
    aside = last.with_name(LAST_CHECKPOINT + UNREADABLE_SUFFIX)
    os.replace(last, aside)
    print(f"warning: the unreadable checkpoint is kept as {aside}; delete it when you no longer need it",
          file=sys.stderr, flush=True)


class PeriodicLastCheckpoint(ModelCheckpoint):
    """Lightning's last.ckpt every --checkpoint_every_steps, without its own save when fit ends: the
    run writes the final last.ckpt once fit has returned (`_finish_run`), and a second copy of the
    weights and optimiser state just before it only cost a serialisation and an fsync."""

    def on_train_end(self, trainer, pl_module) -> None:
        pass


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


if _RICH_AVAILABLE:
    class StepProgressBar(RichProgressBar):
        """Lightning's bar without "Epoch 0/-2": runs are counted in steps, so epochs have no end."""

        def _get_train_description(self, current_epoch: int) -> str:
            return f"epoch {current_epoch}"
else:
    StepProgressBar = None


class BuildImageCache(Callback):
    """Before the first step, each rank caches its share of the locked image stages' outputs, then all wait.

    It runs in `on_fit_start`, when the ranks and the device are known and before any training
    batch is read; a resumed run finds the cache complete (or half-made by a killed run, and
    finishes it). A smoke run's cache (no folder given) goes to a temporary folder that rank 0
    makes and names to the others, so every rank reads the rows the others cached; rank 0 removes
    it (`remove_temporary_folder`).
    """

    def __init__(self, cache: ImageFeatureCache, bundle: ModelBundle, config: TrainConfig):
        self.cache, self.bundle, self.config = cache, bundle, config
        self.temporary_folder: Path | None = None  # made by this process, so removed by it

    def on_fit_start(self, trainer, module):
        self.cache.world_size = trainer.world_size
        if self.cache.folder is None:
            if trainer.is_global_zero:
                self.temporary_folder = _temporary_cache_folder(trainer.num_nodes, Path(self.config.models_dir))
            self.cache.folder = Path(trainer.strategy.broadcast(str(self.temporary_folder), src=0))
        image_size = int(self.bundle.train_transform(Image.new("RGB", (8, 8))).shape[-1])
        try:
            split = module.model.image_cache_split(image_size)
        except ValueError as error:  # e.g. a ViT tower: one line for the user, not a traceback
            raise UserError(f"--cache_image_views: {error}") from error
        if not self.cache.is_complete():
            workers = loader_workers(self.config)
            if module.device.type == "cpu" and torch.get_num_threads() >= (os.cpu_count() or 1):
                # The locked stages keep every core busy, so a decoding process would only take turns
                # with them: EfficientNet-Lite2 on 2 cores caches a photo in 47 ms in one process, 52 ms
                # with one decoder (bench_cpu_chunks.py). The crops are seeded per image: the same cache.
                workers = 0
            self.cache.build(split, self.bundle.train_transform, trainer.global_rank, self.config.seed, image_size,
                             batch_size=self.config.batch_size, num_workers=workers)
        wait_for_every_rank(trainer.world_size, "image cache")

    def remove_temporary_folder(self) -> None:
        if self.temporary_folder is not None:
            shutil.rmtree(self.temporary_folder, ignore_errors=True)
            self.temporary_folder = None


def _temporary_cache_folder(num_nodes: int, models_dir: Path) -> Path:
    """Where a smoke run caches: the system's temporary folder, which every rank of one machine
    sees; across machines, a hidden folder in --models_dir, which they share as they share run folders."""
    if num_nodes == 1:
        return Path(tempfile.mkdtemp(prefix="image-cache-"))
    models_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".image-cache-smoke-", dir=models_dir))


def wait_for_every_rank(world_size: int, reason: str) -> None:
    """A barrier for work that may keep ranks apart for hours (building a share of the image cache).

    The trainer's process group times out after 30 minutes (Lightning's default); a rank that
    finds its share done, in a resumed run, can wait much longer for one that is far behind. This
    barrier runs on its own CPU (gloo) group, timed out only after CACHE_WAIT; a rank that dies
    still ends the others' wait at once, as its connection closes.
    """
    if world_size == 1 or not torch.distributed.is_initialized():
        return
    group = torch.distributed.new_group(backend="gloo", timeout=CACHE_WAIT)
    try:
        torch.distributed.barrier(group=group)
    except RuntimeError as error:
        raise RuntimeError(f"waiting for every rank ({reason}): {error}") from error
    finally:
        torch.distributed.destroy_process_group(group)


def _cached_image_pairs(config: TrainConfig, bundle: ModelBundle, table) -> tuple[CachedImageCaptionDataset,
                                                                                   ImageFeatureCache]:
    model_flags = config.model
    if not model_flags.get("lock_image"):
        raise UserError("--cache_image_views caches the locked image stages: pass --lock_image too "
                        "(with --lock_image_unlocked_groups N to train the last N)")
    if not hasattr(bundle.model, "image_cache_split"):
        raise UserError(f"--cache_image_views: the {config.variant} model cannot cache its image stages "
                        "(only the pretrained-towers variant, 1_pretrain_our.sh, can)")
    # Under the run folder, so --resume finds it; a smoke run writes nothing there: BuildImageCache
    # gives it a temporary folder once the ranks are known.
    folder = config.run_dir / "image_cache" if not config.fast_dev_run else None
    # Only what changes the cached features: a run that changes the text tower or the head reuses the cache.
    image_flags = {name: value for name, value in model_flags.items() if name not in FLAGS_NOT_IN_IMAGE_FEATURES}
    # The cache holds training crops: a run that trains at 224 px and encodes at 256 (--train_resolution)
    # caches what a run at 224 does, and reuses its cache.
    if image_flags.get("train_resolution"):
        image_flags |= {"image_resolution": image_flags["train_resolution"], "train_resolution": None}
    identity = {"dataset_path": str(Path(config.dataset_path).resolve()), "split": config.train_split,
                "sample_num": config.sample_num, "seed": config.seed, "model": image_flags, "crop": TRAIN_CROP}
    if config.flip_images:  # only when on, so caches made before the flag keep matching
        identity["flip_images"] = True
    image_paths = list(dict.fromkeys(str(path) for path in table["image"]))
    cache = ImageFeatureCache(folder, image_paths, model_flags["cache_image_views"], identity)
    return CachedImageCaptionDataset(table, cache, training_tokenizer(config, bundle), config.captions_per_image), cache


def training_tokenizer(config: TrainConfig, bundle: ModelBundle):
    """The bundle's tokenizer, dropping words first with --caption_word_dropout (training pairs only)."""
    if config.caption_word_dropout:
        return WordDropout(bundle.tokenizer, config.caption_word_dropout)
    return bundle.tokenizer


def _training_set(config: TrainConfig, bundle: ModelBundle, report: DataReport):
    """Map-style pairs from a table (images or cached image features), or a stream from webdataset
    shards; the image cache, if any; and what the module does to each batch of uint8 pixels (None:
    the batches arrive as the model takes them)."""
    caching = bool(config.model.get("cache_image_views"))
    # The loader's workers stop at uint8 pixels and the module normalises each batch where it trains:
    # a quarter of the bytes cross between processes (and to a GPU), and the workers skip a float
    # pass over every image. Equal, bit for bit, to the whole transform (transforms.split_normalize).
    pixels, pixel_normalize = split_normalize(bundle.train_transform)
    if is_webdataset_path(config.dataset_path):
        if caching:
            raise UserError("--cache_image_views needs a table of training pairs, not webdataset shards")
        if config.captions_per_image > 1:
            raise UserError("--captions_per_image groups a table's captions by image; webdataset shards hold "
                            "one caption per sample: leave it at 1")
        # A stream has no length: every rank and worker yields the same count so DDP steps stay in lockstep.
        samples = config.sample_num or config.max_steps * config.batch_size * config.accumulate_grad_batches
        return make_webdataset(config.dataset_path, pixels, training_tokenizer(config, bundle),
                               epoch_samples=samples), None, pixel_normalize
    table = read_table(config.dataset_path, config.train_split, config.image_column, config.caption_column,
                       report=report)
    if config.sample_num is not None:
        table = table.iloc[: config.sample_num]
    if caching:
        (train_set, cache), pixel_normalize = _cached_image_pairs(config, bundle, table), None
    else:
        train_set, cache = ImageCaptionDataset(table, pixels, training_tokenizer(config, bundle),
                                               config.captions_per_image), None
    if len(train_set) < config.batch_size:
        unit = "training pairs" if config.captions_per_image == 1 else "training images (--captions_per_image)"
        raise UserError(f"--dataset_path {config.dataset_path}: {len(train_set)} usable {unit}, "
                        f"fewer than one batch (--batch_size {config.batch_size})")
    return train_set, cache, pixel_normalize


def _uses_cuda(config: TrainConfig) -> bool:
    return torch.cuda.is_available() and config.accelerator in ("auto", "gpu", "cuda")


def processes_per_node(config: TrainConfig, env=os.environ) -> int:
    """How many training processes share this machine's cores: --devices, or what 'auto' becomes."""
    if isinstance(config.devices, int):
        return config.devices
    started_here = env.get("LOCAL_WORLD_SIZE", "")  # torchrun says how many processes it started on this node
    if started_here.isdigit():
        return int(started_here)
    # Lightning's 'auto': one process per visible GPU, or a single process on the CPU.
    return torch.cuda.device_count() if _uses_cuda(config) else 1


def loader_workers(config: TrainConfig, env=os.environ) -> int:
    """Decoding processes per loader of each rank: --num_workers, or the node's cores shared by its ranks."""
    if config.num_workers is not None:
        return config.num_workers
    return default_num_workers(processes_per_node(config, env))


def make_loaders(config: TrainConfig, bundle: ModelBundle):
    """Training pairs (seeded, resumable order; full batches so every rank gathers equal shapes) and dev
    groups: (train loader, val loader, val set, image cache, the normalisation of uint8 training batches)."""
    report = DataReport()
    train_set, image_cache, pixel_normalize = _training_set(config, bundle, report)
    workers = loader_workers(config)
    loader_options = {
        "batch_size": config.batch_size,
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    if isinstance(train_set, IterableDataset):
        train_loader = DataLoader(train_set, drop_last=True, collate_fn=collate_pairs, **loader_options)
    else:
        train_loader = ResumableLoader(train_set, sampler=ResumableSampler(len(train_set), config.seed), drop_last=True,
                                       collate_fn=collate_pairs, **loader_options)
    val_path = config.val_path or config.dataset_path
    val_set = None
    try:
        find_table(val_path, config.val_split)
    except (FileNotFoundError, NotADirectoryError):
        logger.warning("no '%s' table in %s: training without validation", config.val_split, val_path)
    else:
        val_set = ImageGroupDataset(read_table(val_path, config.val_split, config.image_column, config.caption_column,
                                               report=report),
                                    bundle.eval_transform, bundle.tokenizer)
    val_loader = (
        DataLoader(val_set, shuffle=False, collate_fn=collate_groups, **loader_options) if val_set is not None else None
    )
    if report.total_skipped():
        logger.warning("tables: %s", report.summary())
    return train_loader, val_loader, val_set, image_cache, pixel_normalize


def _as_stored(identity: dict) -> dict:
    """The identity as it reads back from run.json (tuples become lists, and so on)."""
    return json.loads(json.dumps(identity, default=str))


def _identity_changes(stored: dict, current: dict) -> list[str]:
    """'--flag old -> new' for every setting that differs, model flags included."""
    flatten = lambda identity: {**{k: v for k, v in identity.items() if k != "model"}, **identity.get("model", {})}  # noqa: E731
    old, new = flatten(stored), flatten(current)
    return [f"--{name} {old.get(name)} -> {new.get(name)}" for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name)]


def _resume_path(config: TrainConfig) -> str | None:
    """The checkpoint this run continues from, or None; refuses a run folder made with other settings."""
    if config.resume not in RESUME_CHOICES:
        return config.resume  # an explicit checkpoint: the user chose it
    run_dir = config.run_dir
    last = run_dir / LAST_CHECKPOINT
    held = last.exists() or (run_dir / PREVIOUS_CHECKPOINT).exists()
    if config.resume == "none":
        if held:
            raise UserError(f"{run_dir} already holds a run; pass --resume auto to continue it or another --run_name")
        return None
    if not held:
        if config.resume == "last":
            raise UserError(f"--resume last: no {last} to continue from")
        return None
    try:
        stored = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run_dir} holds a checkpoint without {RUN_FILE} (an older version made it); pass another "
                        f"--run_name, or --resume {last} to continue it anyway") from None
    changes = _identity_changes(stored, _as_stored(config.identity))
    if changes:
        raise UserError(f"{run_dir} holds a run made with other settings ({'; '.join(changes)}); pass another "
                        "--run_name, or leave it out (the default name carries a hash of these settings)")
    return str(readable_checkpoint(run_dir, config.resume))


@dataclass(frozen=True)
class RunClock:
    """When the run began (Unix time), and when each resumed process took over.

    Minutes-of-training figures count from `started_at`, so they include set-up and image caching,
    which happen before the first logged step. A resume keeps the first start: the run's wall time
    then includes the time it lay stopped, which `resumed_at` makes visible.
    """

    started_at: float
    resumed_at: tuple[float, ...] = ()

    @classmethod
    def for_process(cls, run_dir: Path, resuming: bool) -> RunClock:
        now = time.time()
        if resuming:
            try:
                stored = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
                return cls(float(stored["started_at"]), (*stored.get("resumed_at", ()), now))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a run.json from before the clock was recorded: this process starts it
        return cls(now)


def _write_run_file(config: TrainConfig, finished: bool, global_step: int, clock: RunClock) -> None:
    record = {"identity": _as_stored(config.identity), "finished": finished, "global_step": global_step,
              "smoke": global_step < SMOKE_STEPS, "started_at": clock.started_at, "resumed_at": list(clock.resumed_at)}
    write_json(config.run_dir / RUN_FILE, record)


def _precision(config: TrainConfig) -> str:
    cuda = _uses_cuda(config)
    if config.precision is None:
        return "16-mixed" if cuda else "32"
    if config.precision == "16-mixed" and not cuda:
        raise UserError("--precision=16-mixed needs a CUDA GPU; on the CPU use 32 or bf16-mixed")
    return config.precision


@dataclass
class RunResult:
    run_dir: Path
    start_step: int  # above zero when the run resumed
    global_step: int
    metrics: dict  # final validation metrics, empty without a dev split


def run_training(config: TrainConfig, build: Callable[[object], ModelBundle]) -> RunResult:
    """Build the model with `build(config.model_args)`, train it and write its run folder.

    Seeds before building, so new layers start from the same weights in every run with the same
    --seed. With --fast_dev_run nothing is written: no run folder, checkpoint or log.
    """
    quiet_libraries(config.verbose)
    reuse_freed_memory()  # before the loaders fork their workers, which inherit it
    precision = _precision(config)
    smoke_test = bool(config.fast_dev_run)
    resume_from = None if smoke_test else _resume_path(config)
    clock = RunClock.for_process(config.run_dir, resuming=resume_from is not None)
    prepare_default_sample(config.dataset_path)
    L.seed_everything(config.seed, workers=True, verbose=False)
    bundle = build(config.model_args)
    # How images are embedded belongs to the checkpoint, so that encoding and search embed as validation did.
    bundle.set_mirror_average(bool(config.model.get("mirror_average")))
    if config.flip_images:
        bundle.train_transform = with_random_mirror(bundle.train_transform)
    train_loader, val_loader, val_set, image_cache, pixel_normalize = make_loaders(config, bundle)
    module = CLIPModule(
        bundle.model,
        bundle.spec,
        lr=config.lr,
        tower_lr=config.tower_lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        max_steps=config.max_steps,
        cached_images=image_cache is not None,
        pixel_normalize=pixel_normalize,
        loss=config.loss,
        head_only_steps=config.head_only_steps,
        layer_decay=config.layer_decay,
        cpu_image_slice=config.cpu_image_slice,
    )
    run_dir = config.run_dir
    # best.ckpt holds the weights alone (a third of last.ckpt's size); last.ckpt keeps what resuming needs.
    best_checkpoint = ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val/mean_recall", mode="max",
                                      save_top_k=1, save_weights_only=True, enable_version_counter=False,
                                      auto_insert_metric_name=False)
    last_checkpoint = PeriodicLastCheckpoint(dirpath=run_dir, save_top_k=0, save_last=True,
                                      every_n_train_steps=config.checkpoint_every_steps, enable_version_counter=False)
    sampler = train_loader.sampler if isinstance(train_loader, ResumableLoader) else None
    ctrl_c = CtrlC()
    callbacks = [ctrl_c, ThroughputLogger(config.log_every_n_steps), ReproducibleSteps(config.seed, sampler)]
    cache_builder = BuildImageCache(image_cache, bundle, config) if image_cache is not None else None
    if cache_builder is not None:
        callbacks.insert(0, cache_builder)
    if not smoke_test:
        callbacks += [LearningRateMonitor(logging_interval="step"), last_checkpoint]
        if val_set is not None:
            callbacks += [best_checkpoint, ResultPanel(val_set.image_paths, val_set.captions)]
    if StepProgressBar is not None:
        callbacks.append(StepProgressBar())
    interval = config.val_check_interval
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=precision,
        max_steps=config.max_steps,
        max_epochs=-1,
        gradient_clip_val=config.gradient_clip_val,
        accumulate_grad_batches=config.accumulate_grad_batches,
        val_check_interval=int(interval) if interval >= 1 else interval,
        check_val_every_n_epoch=None if interval >= 1 else 1,
        num_sanity_val_steps=0,
        limit_val_batches=None if val_loader is not None else 0,
        fast_dev_run=config.fast_dev_run or False,
        log_every_n_steps=config.log_every_n_steps,
        logger=False if smoke_test else TensorBoardLogger(config.logs_dir, name=config.run_name, version="",
                                                          default_hp_metric=False),
        enable_checkpointing=not smoke_test,
        enable_model_summary=config.verbose,
        callbacks=callbacks,
        plugins=[DurableCheckpointIO()],
        # Streams split their shards over ranks themselves; tables get Lightning's distributed sampler.
        use_distributed_sampler=not isinstance(train_loader.dataset, IterableDataset),
    )
    # The process that writes the run folder holds its lock for the whole run: a second run into the
    # same folder is refused in one line naming this one.
    writes_run_folder = trainer.is_global_zero and not smoke_test
    ctrl_c.install()
    try:
        with FolderLock(run_dir, "train", "training") if writes_run_folder else contextlib.nullcontext():
            return _fit(config, trainer, module, train_loader, val_loader, best_checkpoint, cache_builder, resume_from,
                        clock)
    finally:
        ctrl_c.restore()


def _fit(config: TrainConfig, trainer, module, train_loader, val_loader, best_checkpoint, cache_builder, resume_from,
         clock: RunClock) -> RunResult:
    run_dir, smoke_test = config.run_dir, bool(config.fast_dev_run)
    if trainer.is_global_zero and not smoke_test:
        set_aside_unreadable(run_dir, resume_from)
        write_json(run_dir / "params.json", json.loads(json.dumps(config.as_dict(), default=str)))
        _write_run_file(config, finished=False, global_step=0, clock=clock)
        resumed = f", resuming from {resume_from}" if resume_from else ""
        print(f"run {config.run_name}: checkpoints in {run_dir}, TensorBoard logs in "
              f"{Path(config.logs_dir) / config.run_name}{resumed}", flush=True)
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from, weights_only=True)
    finally:
        if cache_builder is not None:  # a smoke run's temporary cache folder, on the rank that made it
            cache_builder.remove_temporary_folder()
    if smoke_test:
        if trainer.is_global_zero:
            print(f"fast_dev_run: {trainer.global_step} steps ran; nothing was written")
        return RunResult(run_dir, module.start_step, trainer.global_step, {})
    metrics = _finish_run(trainer, module, val_loader, best_checkpoint, run_dir)
    if trainer.is_global_zero:
        _write_run_file(config, finished=True, global_step=trainer.global_step, clock=clock)
        _report(config, trainer.global_step, metrics)
    return RunResult(run_dir, module.start_step, trainer.global_step, metrics)


def _report(config: TrainConfig, global_step: int, metrics: dict) -> None:
    """The validation table and where everything went; models/latest moves for a real run only."""
    run_dir = config.run_dir
    if "val/mean_recall" in metrics:
        print(format_metrics({name.removeprefix("val/"): value for name, value in metrics.items()}))
    print(f"run {config.run_name}: step {global_step}; {run_dir / 'best.ckpt'} (best dev mean recall, weights only), "
          f"{run_dir / LAST_CHECKPOINT} (to resume)")
    if global_step >= SMOKE_STEPS:
        _point_latest(Path(config.models_dir), config.run_name)
        print(f"{Path(config.models_dir) / 'latest'} -> {config.run_name}")
    else:
        print(f"a smoke run (under {SMOKE_STEPS} steps): {Path(config.models_dir) / 'latest'} left as it was")


def _finish_run(trainer, module, val_loader, best_checkpoint, run_dir: Path) -> dict:
    """Make last.ckpt the final state and best.ckpt the best validated one, the final model included."""
    trainer.save_checkpoint(run_dir / LAST_CHECKPOINT, weights_only=False)
    if val_loader is None:
        trainer.save_checkpoint(run_dir / "best.ckpt", weights_only=True)
        return {}
    validated_at = getattr(module, "last_validated_step", None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if validated_at != trainer.global_step or "val/mean_recall" not in metrics:
        results = trainer.validate(module, val_loader, verbose=False)
        metrics = {k: float(v) for k, v in results[0].items()} if results else {}
        best = best_checkpoint.best_model_score
        score = metrics.get("val/mean_recall")
        if score is not None and (best is None or score > float(best)):
            trainer.save_checkpoint(run_dir / "best.ckpt", weights_only=True)
    return metrics


def _point_latest(models_dir: Path, run_name: str) -> None:
    """models/latest -> the newest finished run that is not a smoke run, so encoding and search find it."""
    latest = models_dir / "latest"
    temporary = models_dir / f".latest-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(run_name, target_is_directory=True)
    os.replace(temporary, latest)
