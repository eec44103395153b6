"""Runner: one rank's resumable encoding loop, its run records, and launching ranks on one or many machines."""
from __future__ import annotations

import csv
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from clipsearch.checkpoint import model_fingerprint
from clipsearch.data import IMAGE_EXTENSIONS
from clipsearch.encoding.mapper import ImageEmbedder
from clipsearch.encoding.reader import (
    collect_image_paths,
    make_loader,
    partition,
    paths_digest,
    shard_batches,
)
from clipsearch.encoding.writer import (
    TMP_SUFFIX,
    ShardWriter,
    atomic_replace,
    parse_shard_name,
    read_json,
    read_shard,
    remove_stale_tmp,
    write_json,
)
from clipsearch.model_reference import model_label
from clipsearch.models.released import load_model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.json"
MANIFEST_FILE = "manifest.json"
INDEX_FILES = ("index.faiss", "index.json")
# Settings that fix the shard names and contents: a resume must use the same ones.
LAYOUT_KEYS = ("world_size", "batch_size", "shard_size", "paths_digest")
# The only collective is the final barrier; ranks finish close together, but a rank that meets
# many slow images should not time the others out.
BARRIER_TIMEOUT = timedelta(hours=6)


class EncodingMismatchError(RuntimeError):
    """The embedding folder was made by another model or with settings that give other shard names."""


@dataclass
class EncodeConfig:
    load_model: str
    dataset_path: str
    emb_path: str
    split: str = "auto"
    batch_size: int = 64
    shard_size: int = 10_000
    num_workers: int = 0
    precision: str = "32"
    accelerator: str = "auto"
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class ProcessLayout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    use_process_group: bool = False


def errors_file(rank: int) -> str:
    return f"errors-{rank}.tsv"


def done_file(rank: int) -> str:
    return f"rank-{rank}.done.json"


def choose_device(accelerator: str, local_rank: int) -> torch.device:
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--accelerator gpu was asked for, but PyTorch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if accelerator == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    raise ValueError(f"unknown accelerator {accelerator!r}; expected auto, cpu or gpu")


# ---------------------------------------------------------------------------------------------
# The folder's identity: one model, one shard layout
# ---------------------------------------------------------------------------------------------


def check_identity(emb_path: Path, identity: dict, overwrite: bool) -> None:
    """Record which model and layout fill this folder, or stop if it already holds something else."""
    existing = read_json(emb_path / MODEL_FILE)
    if existing is None or overwrite:
        write_json(emb_path / MODEL_FILE, identity)
        return
    if (existing.get("fingerprint"), existing.get("embed_dim")) != (identity["fingerprint"], identity["embed_dim"]):
        raise EncodingMismatchError(
            f"{emb_path} holds embeddings of another model: {existing.get('load_model')} "
            f"(fingerprint {existing.get('fingerprint')}, dim {existing.get('embed_dim')}), but this run "
            f"encodes with {identity['load_model']} (fingerprint {identity['fingerprint']}, dim "
            f"{identity['embed_dim']}). Use a new --emb_path, or --overwrite to replace them."
        )
    differing = [key for key in LAYOUT_KEYS if existing.get(key) != identity[key]]
    if differing:
        before = ", ".join(f"{key}={existing.get(key)}" for key in differing)
        now = ", ".join(f"{key}={identity[key]}" for key in differing)
        raise EncodingMismatchError(
            f"cannot resume into {emb_path}: it was started with {before}, this run has {now} "
            "(paths_digest changes when the list of images changes). Shard names and contents would "
            "not line up. Rerun with the same settings to resume, or use a new --emb_path, or "
            "--overwrite to start again."
        )


def clear_for_overwrite(emb_path: Path, rank: int, world_size: int) -> None:
    """Delete this rank's earlier files; rank 0 also deletes what belongs to no rank of this run."""
    for path in emb_path.iterdir():
        name = path.name
        shard = parse_shard_name(name.removesuffix(TMP_SUFFIX))
        if shard is not None:
            owner = shard[0]
        elif name.startswith("errors-") and name.endswith(".tsv"):
            owner = int(name[len("errors-") : -len(".tsv")]) if name[7:-4].isdigit() else None
        elif name.startswith("rank-") and name.endswith(".done.json"):
            owner = int(name[5:-10]) if name[5:-10].isdigit() else None
        elif name in (MANIFEST_FILE, *INDEX_FILES):
            owner = 0
        else:
            continue
        if owner == rank or (rank == 0 and (owner is None or owner >= world_size)):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------


def summarise_rank(emb_path: Path, rank: int, shard_names: list[str]) -> tuple[int, list[list[str]]]:
    """Encoded count and skipped (path, reason) rows over all of a rank's shards, old and new."""
    encoded, skipped = 0, []
    for name in shard_names:
        shard = read_shard(emb_path / name, mmap=True)
        encoded += len(shard["path"])
        skipped.extend(shard.get("skipped", []))
    return encoded, skipped


def write_errors(path: Path, skipped: list[list[str]]) -> None:
    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as file:
            writer = csv.writer(file, delimiter="\t", lineterminator="\n")
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)

    atomic_replace(path, write)


def encode_rank(config: EncodeConfig, layout: ProcessLayout) -> dict:
    """Encode this rank's slice into shards, skipping shards a previous run finished; returns its record."""
    rank, world_size = layout.rank, layout.world_size
    device = choose_device(config.accelerator, layout.local_rank)
    if device.type == "cpu":
        # Ranks on one machine share its cores; oversubscribed BLAS threads slow every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.local_world_size))
    bundle = load_model(config.load_model)
    image_paths = collect_image_paths(config.dataset_path, config.split)
    if not image_paths:
        raise FileNotFoundError(
            f"no images to encode in {config.dataset_path} (split {config.split!r}; looked for "
            f"{', '.join(IMAGE_EXTENSIONS)} files or split tables)"
        )
    identity = {
        "load_model": model_label(config.load_model),
        "fingerprint": model_fingerprint(bundle),
        "embed_dim": bundle.embed_dim,
        "world_size": world_size,
        "batch_size": config.batch_size,
        "shard_size": config.shard_size,
        "paths_digest": paths_digest(image_paths),
        "image_count": len(image_paths),
    }

    emb_path = Path(config.emb_path)
    emb_path.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        clear_for_overwrite(emb_path, rank, world_size)
    check_identity(emb_path, identity, config.overwrite)
    # Whatever this rank wrote before may be incomplete now; records are rebuilt from the shards.
    (emb_path / done_file(rank)).unlink(missing_ok=True)
    (emb_path / MANIFEST_FILE).unlink(missing_ok=True)
    remove_stale_tmp(emb_path, rank)

    rank_paths = partition(image_paths, rank, world_size)
    shards = [
        (step, start, min(config.shard_size, len(rank_paths) - start))
        for step, start in enumerate(range(0, len(rank_paths), config.shard_size))
    ]
    writer = ShardWriter(emb_path, rank, config.batch_size, bundle.embed_dim)
    pending = [shard for shard in shards if not writer.is_done(shard[0])]
    batches, batch_steps = shard_batches(pending, config.batch_size)
    if len(pending) < len(shards):
        logger.info("rank %d: resuming, %d of %d shards already done", rank, len(shards) - len(pending), len(shards))

    embedder = ImageEmbedder(bundle.model, device, config.precision)
    loader = make_loader(
        rank_paths, bundle.eval_transform, batches, config.num_workers, pin_memory=device.type == "cuda"
    )
    pending_images = sum(length for _, _, length in pending)
    progress = tqdm(
        total=pending_images,
        unit="img",
        desc=f"encoding ({world_size} process{'es' if world_size > 1 else ''})",
        disable=not config.progress or rank != 0,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    for step, batch in zip(batch_steps, loader):
        embeddings = embedder(batch.images) if batch.image_paths else None
        writer.add(step, embeddings, batch.image_paths, batch.skipped)
        progress.update(len(batch.image_paths) + len(batch.skipped))
    writer.flush()
    progress.close()
    seconds = time.perf_counter() - started

    shard_names = [writer.path_of(step).name for step, _, _ in shards]
    encoded, skipped = summarise_rank(emb_path, rank, shard_names)
    write_errors(emb_path / errors_file(rank), skipped)
    record = {
        **identity,
        "rank": rank,
        "precision": config.precision,
        "shards": shard_names,
        "encoded": encoded,
        "skipped": dict(sorted(Counter(reason for _, reason in skipped).items())),
        "images_this_run": pending_images,
        "seconds_this_run": round(seconds, 3),
        "images_per_second": round(pending_images / seconds, 1) if seconds > 0 else None,
    }
    write_json(emb_path / done_file(rank), record)
    return record


# ---------------------------------------------------------------------------------------------
# The run's manifest
# ---------------------------------------------------------------------------------------------


def write_manifest_if_complete(emb_path: str | os.PathLike, config: EncodeConfig | None = None) -> dict | None:
    """Merge every rank's done record into manifest.json once all ranks of this layout have finished.

    Done files survive kills and are checked against model.json and their shards, so a stale
    record of another run never completes a manifest.
    """
    emb_path = Path(emb_path)
    identity = read_json(emb_path / MODEL_FILE)
    if identity is None:
        return None
    records = []
    for rank in range(identity["world_size"]):
        record = read_json(emb_path / done_file(rank))
        if record is None or any(record.get(key) != identity.get(key) for key in ("fingerprint", *LAYOUT_KEYS)):
            return None
        if not all((emb_path / name).is_file() for name in record["shards"]):
            return None
        records.append(record)
    skipped: Counter[str] = Counter()
    for record in records:
        skipped.update(record["skipped"])
    manifest = {
        **identity,
        "precision": records[0].get("precision"),
        "counts": {
            "encoded": sum(record["encoded"] for record in records),
            "skipped": sum(skipped.values()),
            "shards": sum(len(record["shards"]) for record in records),
        },
        "skipped_by_reason": dict(sorted(skipped.items())),
        "errors_files": [errors_file(record["rank"]) for record in records],
    }
    if config is not None:
        manifest["dataset_path"] = os.path.abspath(config.dataset_path)
        manifest["split"] = config.split
    write_json(emb_path / MANIFEST_FILE, manifest)
    return manifest


def describe(manifest: dict, emb_path: str | os.PathLike) -> str:
    counts = manifest["counts"]
    reasons = ", ".join(f"{count} {reason}" for reason, count in manifest["skipped_by_reason"].items())
    skipped = f"skipped {counts['skipped']} ({reasons}; see errors-*.tsv)" if counts["skipped"] else "skipped 0"
    return f"encoded {counts['encoded']} images into {counts['shards']} shards in {emb_path}; {skipped}"


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def _int_env(env, name: str, default: int) -> int:
    value = env.get(name, "")
    digits = value.split("(")[0].split(",")[0]  # SLURM writes e.g. "4(x2)" for tasks per node
    return int(digits) if digits.isdigit() else default


def layout_from_env(env, devices: int, num_nodes: int) -> ProcessLayout | None:
    """The layout a launcher already set up, or None when this process should launch the ranks.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun` with one task per device sets
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. A process group (for the final barrier) is used only
    when MASTER_ADDR is known; without it the last rank to finish writes the manifest.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int_env(env, "WORLD_SIZE", 1)
        return ProcessLayout(
            rank=_int_env(env, "RANK", 0),
            world_size=world_size,
            local_rank=_int_env(env, "LOCAL_RANK", 0),
            local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", 1),
            use_process_group=world_size > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env,
        )
    tasks = _int_env(env, "SLURM_NTASKS", 1)
    if "SLURM_PROCID" in env and tasks > 1 and tasks == devices * num_nodes:
        return ProcessLayout(
            rank=_int_env(env, "SLURM_PROCID", 0),
            world_size=tasks,
            local_rank=_int_env(env, "SLURM_LOCALID", 0),
            local_world_size=_int_env(env, "SLURM_NTASKS_PER_NODE", devices),
            use_process_group="MASTER_ADDR" in env and "MASTER_PORT" in env,
        )
    if "SLURM_PROCID" in env and tasks > 1 and tasks != num_nodes:
        raise ValueError(
            f"SLURM started {tasks} tasks, but --devices {devices} x --num_nodes {num_nodes} = "
            f"{devices * num_nodes}. Either run one task per device (srun --ntasks-per-node=<devices>) "
            "or one task per node that starts --devices processes itself (srun --ntasks-per-node=1)."
        )
    return None


def node_rank_from_env(env, num_nodes: int, node_rank: int) -> int:
    """With srun starting one task per node, SLURM_NODEID tells each task which node it is."""
    if "SLURM_PROCID" in env and num_nodes > 1 and _int_env(env, "SLURM_NTASKS", 1) == num_nodes:
        return _int_env(env, "SLURM_NODEID", _int_env(env, "SLURM_PROCID", node_rank))
    return node_rank


def run_in_layout(config: EncodeConfig, layout: ProcessLayout) -> dict | None:
    """Encode this rank's share, then wait for the others; the manifest is written once all are done."""
    record = encode_rank(config, layout)
    if layout.use_process_group:
        # Joining the group only after encoding doubles as the barrier, and DataLoader workers
        # are never forked from a process that holds gloo connections.
        dist.init_process_group("gloo", rank=layout.rank, world_size=layout.world_size, timeout=BARRIER_TIMEOUT)
        try:
            dist.barrier()
            manifest = write_manifest_if_complete(config.emb_path, config) if layout.rank == 0 else None
            dist.barrier()
        finally:
            dist.destroy_process_group()
    else:
        manifest = write_manifest_if_complete(config.emb_path, config)
    if manifest is not None and (layout.rank == 0 or not layout.use_process_group):
        rate = record.get("images_per_second")
        print(describe(manifest, config.emb_path) + (f"; rank {layout.rank} ran at {rate} images/s" if rate else ""))
    elif layout.world_size > 1 and not layout.use_process_group:
        print(f"rank {layout.rank} done ({record['encoded']} images); manifest follows when all ranks finish")
    return manifest


def _spawned_rank(
    local_rank: int, config: EncodeConfig, devices: int, node_rank: int, world_size: int, rendezvous: dict | None
):
    if rendezvous:
        os.environ.update(rendezvous)
    layout = ProcessLayout(node_rank * devices + local_rank, world_size, local_rank, devices, rendezvous is not None)
    run_in_layout(config, layout)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(config: EncodeConfig, devices: int = 1, num_nodes: int = 1, node_rank: int = 0, env=None) -> dict | None:
    """Encode with `devices` processes on this node (of `num_nodes`), or as the rank a launcher made.

    Returns the manifest when the whole run is complete, else None (other nodes still running).
    """
    env = os.environ if env is None else env
    layout = layout_from_env(env, devices, num_nodes)
    if layout is not None:
        return run_in_layout(config, layout)
    node_rank = node_rank_from_env(env, num_nodes, node_rank)
    world_size = devices * num_nodes
    if devices == 1:
        return run_in_layout(config, ProcessLayout(node_rank, world_size, 0, 1, False))
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        rendezvous = {"MASTER_ADDR": env["MASTER_ADDR"], "MASTER_PORT": env["MASTER_PORT"]}
    elif num_nodes == 1:
        # Every rank is a child of this process, so a local rendezvous address always works.
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    else:
        rendezvous = None
    torch.multiprocessing.spawn(
        _spawned_rank, args=(config, devices, node_rank, world_size, rendezvous), nprocs=devices, join=True
    )
    return read_json(Path(config.emb_path) / MANIFEST_FILE)

