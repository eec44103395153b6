"""Launcher: which rank this process is (torchrun, SLURM), or start `--devices` ranks on this machine."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from clipsearch.encoding.runner import EncodeConfig, encode_rank
from clipsearch.errors import UserError
from clipsearch.store import MANIFEST_FILE, describe, encoding_lock, read_json, write_manifest_if_complete
from clipsearch.tars import dataset_location

# The only collective is the final barrier; ranks finish close together, but a rank that meets
# many slow images should not time the others out.
BARRIER_TIMEOUT = timedelta(hours=6)
# A spawned rank that printed its own one-line error exits with this, so the parent adds nothing.
REPORTED_EXIT_CODE = 3


@dataclass(frozen=True)
class ProcessLayout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    use_process_group: bool = False


def _leading_int(value: str, default: int) -> int:
    digits = value.split("(")[0].split(",")[0]  # SLURM writes e.g. "4(x2)" for tasks per node
    return int(digits) if digits.isdigit() else default


def _int_env(env, name: str, default: int) -> int:
    return _leading_int(env.get(name, ""), default)


def srun_tasks(env) -> int | None:
    """How many tasks the `srun` step that started this process has, or None outside one.

    A batch script (sbatch) or an `salloc` shell also carries SLURM_PROCID=0 and the allocation's
    SLURM_NTASKS, but it is one process: only srun sets the step's own variables.
    """
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    return _int_env(env, "SLURM_STEP_NUM_TASKS", _int_env(env, "SLURM_NTASKS", 1))


def layout_from_env(env, devices: int, num_nodes: int) -> ProcessLayout | None:
    """The layout a launcher already set up, or None when this process should start the ranks.

    torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE: torch.distributed.run's
    contract) come first; `srun` with one task per device sets SLURM_PROCID/SLURM_STEP_NUM_TASKS/
    SLURM_LOCALID. A process group (for the final barrier) is used only when MASTER_ADDR is known;
    without it the last rank to finish writes the manifest.
    """
    rendezvous = "MASTER_ADDR" in env and "MASTER_PORT" in env
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int_env(env, "WORLD_SIZE", 1)
        return ProcessLayout(
            rank=_int_env(env, "RANK", 0),
            world_size=world_size,
            local_rank=_int_env(env, "LOCAL_RANK", 0),
            local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", 1),
            use_process_group=world_size > 1 and rendezvous,
        )
    tasks = srun_tasks(env)
    if tasks is None:
        if _int_env(env, "SLURM_NTASKS", 1) > 1 and num_nodes > 1:
            # A batch script on the first node: alone, it would encode that node's share and stop.
            raise UserError(
                f"--num_nodes {num_nodes} in a SLURM job, but this process was not started by srun; run it "
                f"as srun --ntasks-per-node={devices} (one task per device) or --ntasks-per-node=1 (one task "
                "per node that starts --devices processes)"
            )
        return None  # one process on one node (a batch script, salloc, no SLURM): it starts --devices ranks
    if tasks > 1 and tasks == devices * num_nodes:
        local_tasks = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", ""))
        return ProcessLayout(
            rank=_int_env(env, "SLURM_PROCID", 0),
            world_size=tasks,
            local_rank=_int_env(env, "SLURM_LOCALID", 0),
            local_world_size=_leading_int(local_tasks, devices),
            use_process_group=rendezvous,
        )
    if tasks > 1 and tasks != num_nodes:
        raise UserError(
            f"SLURM started {tasks} tasks, but --devices {devices} x --num_nodes {num_nodes} = "
            f"{devices * num_nodes}. Either run one task per device (srun --ntasks-per-node=<devices>) "
            "or one task per node that starts --devices processes itself (srun --ntasks-per-node=1)."
        )
    return None


def node_rank_from_env(env, num_nodes: int, node_rank: int) -> int:
    """With srun starting one task per node, SLURM_NODEID tells each task which node it is."""
    if num_nodes > 1 and srun_tasks(env) == num_nodes:
        return _int_env(env, "SLURM_NODEID", _int_env(env, "SLURM_PROCID", node_rank))
    return node_rank


def run_in_layout(config: EncodeConfig, layout: ProcessLayout) -> dict | None:
    """Encode this rank's share, then wait for the others; the manifest is written once all are done.

    The rank holds the folder's lock for its rank throughout, so a second run into the folder is
    refused in one line naming this one.
    """
    with encoding_lock(config.emb_path, layout.rank):
        return _encode_and_finish(config, layout)


def _encode_and_finish(config: EncodeConfig, layout: ProcessLayout) -> dict | None:
    record = encode_rank(config, layout.rank, layout.world_size, layout.local_rank, layout.local_world_size)
    extra = {"dataset_path": dataset_location(config.dataset_path), "split": config.split, "precision": config.precision}
    if layout.use_process_group:
        # Joining the group only after encoding doubles as the barrier, and DataLoader workers
        # are never forked from a process that holds gloo connections.
        dist.init_process_group("gloo", rank=layout.rank, world_size=layout.world_size, timeout=BARRIER_TIMEOUT)
        try:
            dist.barrier()
            manifest = write_manifest_if_complete(config.emb_path, extra) if layout.rank == 0 else None
            dist.barrier()
        finally:
            dist.destroy_process_group()
    else:
        manifest = write_manifest_if_complete(config.emb_path, extra)
    if manifest is not None and (layout.rank == 0 or not layout.use_process_group):
        rate = record.get("images_per_second")
        print(describe(manifest, config.emb_path) + (f"; rank {layout.rank} ran at {rate} images/s" if rate else ""))
    elif layout.world_size > 1 and not layout.use_process_group:
        print(f"rank {layout.rank} done ({record['encoded']} images); manifest follows when all ranks finish")
    if record.get("missing"):  # after the barrier, so the other ranks never wait for this one
        raise UserError(missing_tars_message(record["missing"], layout.rank, layout.world_size))
    return manifest


def missing_tars_message(missing: list[list[str]], rank: int, world_size: int) -> str:
    """One line naming the tars a rank could not read; what it did read is kept."""
    shown = "; ".join(f"{tar} ({reason})" for tar, reason in missing[:5])
    more = f"; and {len(missing) - 5} more (see the log)" if len(missing) > 5 else ""
    whose = f"rank {rank}: " if world_size > 1 else ""
    return (f"{whose}{len(missing)} tar{'s' if len(missing) > 1 else ''} could not be read, so the collection lacks "
            f"their samples: {shown}{more}. Every other tar is encoded and kept; run the same command again to retry "
            "these, or leave them out of --dataset_path")


def _spawned_rank(
    local_rank: int, config: EncodeConfig, devices: int, node_rank: int, world_size: int, rendezvous: dict | None
):
    if rendezvous:
        os.environ.update(rendezvous)
    layout = ProcessLayout(node_rank * devices + local_rank, world_size, local_rank, devices, rendezvous is not None)
    try:
        run_in_layout(config, layout)
    except UserError as error:  # one line from the rank, not a traceback relayed by the parent
        whose = f"rank {layout.rank}: "
        message = str(error)
        print(f"error: {message if message.startswith(whose) else whose + message}", file=sys.stderr, flush=True)
        sys.exit(REPORTED_EXIT_CODE)


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
    try:
        torch.multiprocessing.spawn(
            _spawned_rank, args=(config, devices, node_rank, world_size, rendezvous), nprocs=devices, join=True
        )
    except torch.multiprocessing.ProcessExitedException as error:
        if error.exit_code == REPORTED_EXIT_CODE:
            raise SystemExit(1) from None  # the rank said why, in one line
        raise UserError(f"encoding rank {error.error_index} stopped ({error}); run the same command again to "
                        "resume: finished shards are kept") from None
    return read_json(os.path.join(config.emb_path, MANIFEST_FILE))
