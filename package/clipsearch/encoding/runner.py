"""Runner: one rank's encoding loop, wiring the plan, reader, mapper and writer built elsewhere."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from clipsearch.allocator import reuse_freed_memory
from clipsearch.checkpoint import model_fingerprint
from clipsearch.data import IMAGE_EXTENSIONS
from clipsearch.defaults import default_num_workers
from clipsearch.encoding.mapper import ImageEmbedder, TextEmbedder
from clipsearch.encoding.plan import Layout, plan_update
from clipsearch.encoding.reader import (
    CaptionRow,
    caption_batches,
    caption_rows,
    collect_image_paths,
    fields_digest,
    make_loader,
    make_tar_loader,
    shard_batches,
    table_fields,
)
from clipsearch.encoding.writer import ShardWriter
from clipsearch.errors import UserError
from clipsearch.models.released import load_model
from clipsearch.models.transforms import split_normalize
from clipsearch.store import (
    MANIFEST_FILE,
    ROWS_CAPTIONS,
    check_model,
    clear_folder,
    done_file,
    file_stat,
    model_source,
    remove_stale_tmp,
    update_file,
    write_json,
)
from clipsearch.tables import encoding_splits
from clipsearch.tars import dataset_location, list_tars, looks_like_tars, tar_versions

logger = logging.getLogger(__name__)


@dataclass
class EncodeConfig:
    load_model: str
    dataset_path: str
    emb_path: str
    split: str = "auto"
    image_column: str = "image"
    caption_column: str = "caption"
    captions: bool = False  # encode the tables' captions (image -> text search) instead of the images
    batch_size: int = 64
    shard_size: int = 10_000
    num_workers: int | None = None  # None: this node's cores shared by its ranks (default_num_workers)
    cpu_threads: int | None = None  # None: this node's cores shared by its ranks
    precision: str = "32"
    accelerator: str = "auto"
    overwrite: bool = False
    recheck_content: bool = False
    progress: bool = True


def use_rank_device(accelerator: str, local_rank: int) -> torch.device:
    """This rank's device: the CPU, or GPU `local_rank` (modulo the GPUs seen), made the current one.

    Whatever allocates on "the current device" (the loader's pin-memory thread, pinned buffers)
    would otherwise open a CUDA context of a few hundred MB on GPU 0 in every rank.
    """
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--accelerator gpu was asked for, but PyTorch sees no CUDA device")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


@dataclass
class CollectionRows:
    """What a run encodes: each row's name (an image's path, or a caption's key), its change test and its fields."""

    names: list[str]
    stat_of: dict[str, tuple | None]
    fields_of: dict[str, dict]
    captions: dict[str, CaptionRow] = field(default_factory=dict)
    tars: bool = False  # `names` are webdataset tars and `stat_of` their versions; rows are their samples


def collection_rows(config: EncodeConfig) -> CollectionRows:
    """The images of the folder or tables with their files' stats and table fields, or (--captions) the
    tables' captions, whose change test is a digest of their fields (the text is in the name), or the
    webdataset tars --dataset_path names, with their versions."""
    if looks_like_tars(config.dataset_path):
        if config.captions:
            raise UserError("--captions encodes the captions of a table; encoding tars keeps each sample's caption "
                            "as a field of its image's row")
        tars = list_tars(config.dataset_path)
        versions = tar_versions(tars)
        for tar in (tar for tar, version in versions.items() if version is None):
            logger.warning("cannot find or reach %s now: rows it already has are kept; otherwise reading it is "
                           "tried when its turn comes", tar)
        return CollectionRows(tars, versions, {}, tars=True)
    if config.captions:
        if not encoding_splits(config.dataset_path, config.split):
            raise UserError(f"--captions encodes a table's captions, and {config.dataset_path} has no tables "
                            f"for --split {config.split}")
        captions = caption_rows(config.dataset_path, config.split, config.image_column, config.caption_column)
        if not captions:
            raise UserError(f"no captions to encode in the tables of {config.dataset_path} (split {config.split!r})")
        names = sorted(captions)
        fields_of = {name: captions[name].fields for name in names}
        stat_of = {name: (0, 0, fields_digest(fields_of[name])) for name in names}
        return CollectionRows(names, stat_of, fields_of, captions)
    image_paths = collect_image_paths(config.dataset_path, config.split, config.image_column)
    if not image_paths:
        raise UserError(
            f"no images to encode in {config.dataset_path} (split {config.split!r}; looked for "
            f"{', '.join(IMAGE_EXTENSIONS)} files or split tables)"
        )
    fields_of = table_fields(config.dataset_path, config.split, config.image_column, config.caption_column)
    stat_of = {}
    for path in image_paths:
        stat = file_stat(path)
        if stat is not None and path in fields_of:
            stat = (*stat, fields_digest(fields_of[path]))  # an edited caption or column re-reads the row
        stat_of[path] = stat
    return CollectionRows(image_paths, stat_of, fields_of)


def rank_work(config: EncodeConfig, bundle, device: torch.device, rows: CollectionRows, rank_paths: list[str],
              pending: list[tuple[int, int, int]], workers: int):
    """The model stage, and (step, whether the batch ends its shard, batch) over this rank's pending shards."""
    # Loader workers stop at uint8 pixels; the model stage normalises whole batches (PixelNormalize).
    pixels, normalize = split_normalize(bundle.eval_transform)
    if rows.tars:
        # A tar's sample count is known only once it is read: each batch says whether it ends its tar's shard.
        assigned = [(step, rank_paths[start]) for step, start, _ in pending]
        loader = make_tar_loader(assigned, pixels, config.batch_size, workers, device.type == "cuda")
        embedder = ImageEmbedder(bundle.model, device, config.precision, bundle.image_views, normalize)
        return embedder, ((batch.step, batch.ends_shard, batch) for batch in loader)
    batches, batch_steps = shard_batches(pending, config.batch_size)
    ends_shard = [index + 1 == len(batch_steps) or batch_steps[index + 1] != step for index, step in enumerate(batch_steps)]
    if config.captions:
        embedder = TextEmbedder(bundle.model, device, config.precision)
        loader = caption_batches(rank_paths, rows.captions, bundle.tokenizer, batches)
    else:
        embedder = ImageEmbedder(bundle.model, device, config.precision, bundle.image_views, normalize)
        loader = make_loader(rank_paths, pixels, batches, workers, pin_memory=device.type == "cuda")
    return embedder, zip(batch_steps, ends_shard, loader)


def encode_rank(config: EncodeConfig, rank: int, world_size: int, local_rank: int = 0, local_world_size: int = 1) -> dict:
    """Encode this rank's share of the folder's update, skipping shards a killed run finished; returns its record."""
    reuse_freed_memory()  # every batch's activations and tensors are the same sizes again (allocator.py)
    device = use_rank_device(config.accelerator, local_rank)
    if device.type == "cpu":
        # Ranks on one machine share its cores; oversubscribed BLAS threads slow every rank down.
        torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // local_world_size))
    bundle = load_model(config.load_model)
    rows = collection_rows(config)
    emb_path = Path(config.emb_path)
    emb_path.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        clear_folder(emb_path, rank, world_size)
    identity = {
        **model_source(config.load_model),
        "fingerprint": model_fingerprint(bundle),
        "embed_dim": bundle.embed_dim,
        # Recorded from the first run on, so the folder names its images before any manifest.
        "dataset_path": dataset_location(config.dataset_path),
        **({"rows": ROWS_CAPTIONS} if config.captions else {}),
    }
    check_model(emb_path, identity, config.overwrite)
    # Whatever this rank recorded before may be incomplete now; records are rebuilt at the end.
    (emb_path / done_file(rank)).unlink(missing_ok=True)
    (emb_path / MANIFEST_FILE).unlink(missing_ok=True)
    remove_stale_tmp(emb_path, rank)
    layout = Layout(world_size, config.batch_size, config.shard_size)
    update = plan_update(emb_path, rows.names, layout, config.overwrite, config.recheck_content, rows.stat_of,
                         rows.tars)
    write_json(emb_path / update_file(update.number), update.record)  # listed before any shard is written
    if "content_recheck" in update.record:
        recheck = update.record["content_recheck"]
        logger.info("rank %d: %d of %d files with unchanged size and mtime have new bytes", rank, recheck["changed"], recheck["rechecked"])

    rank_paths, shards = update.rank_paths(rank), update.rank_shards(rank)
    tar_of_step = {step: (rank_paths[start], update.stat_of[rank_paths[start]]) for step, start, _ in shards} \
        if rows.tars else None
    writer = ShardWriter(emb_path, rank, config.batch_size, bundle.embed_dim, update.stat_of, rows.fields_of,
                         file_facts=not (config.captions or rows.tars), tar_of_step=tar_of_step)
    pending = [shard for shard in shards if not writer.is_done(shard[0])]
    if len(pending) < len(shards):
        logger.info("rank %d: resuming, %d of %d shards already done", rank, len(shards) - len(pending), len(shards))
    # Decided here, where the ranks on this node are known whichever launcher started them (torchrun
    # passes no --devices).
    workers = default_num_workers(local_world_size) if config.num_workers is None else config.num_workers
    embedder, work = rank_work(config, bundle, device, rows, rank_paths, pending, workers)
    pending_images = None if rows.tars else sum(length for _, _, length in pending)
    progress = tqdm(
        total=pending_images,
        unit="caption" if config.captions else "img",
        desc=f"encoding ({world_size} process{'es' if world_size > 1 else ''})",
        disable=not config.progress or rank != 0,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    encoded, read = 0, 0
    missing: list[list[str]] = []  # [tar, why] of each tar that could not be read to its end
    for step, ends_shard, batch in work:
        if getattr(batch, "failure", None):
            encoded -= writer.discard(step)
            missing.append([batch.tar, batch.failure])
            logger.error("rank %d: %s could not be read: %s", rank, batch.tar, batch.failure)
            continue
        writer.add(step, embedder(batch.inputs) if batch.image_paths else None, batch)
        encoded += len(batch.image_paths)
        read += len(batch.image_paths) + len(batch.skipped)
        progress.update(len(batch.image_paths) + len(batch.skipped))
        if ends_shard:
            writer.finish(step)
    progress.close()
    seconds = time.perf_counter() - started
    pending_images = read if pending_images is None else pending_images
    record = {
        "update": update.number,
        "plan": update.record["plan"],
        "rank": rank,
        "precision": config.precision,
        "encoded": encoded,
        "images_this_run": pending_images,
        "seconds_this_run": round(seconds, 3),
        "images_per_second": round(pending_images / seconds, 1) if seconds > 0 and pending_images else None,
        **({"missing": missing} if missing else {}),
    }
    write_json(emb_path / done_file(rank), record)
    return record
