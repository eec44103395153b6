"""Encoding: stages alone, the real CLI in one and two processes, resume after a kill, bad images."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from clipsearch.cli.common import DEFAULT_DATASETS_DIR, UserError
from clipsearch.cli.encode import main as encode_main
from clipsearch.cli.encode import parse_args
from clipsearch.encoding.launcher import ProcessLayout, layout_from_env
from clipsearch.encoding.reader import collect_image_paths, partition, shard_batches
from clipsearch.store import EncodingMismatchError, list_shards, read_shard, write_shard


def encode(checkpoint, dataset, emb_path, *extra):
    argv = ["--load_model", str(checkpoint), "--dataset_path", str(dataset), "--emb_path", str(emb_path)]
    return encode_main([*argv, "--num_workers", "0", "--no_progress", *extra])


def read_all(emb_path) -> dict[str, torch.Tensor]:
    """path -> embedding over every shard, asserting that no path appears twice."""
    embeddings = {}
    for shard_path in list_shards(emb_path):
        shard = read_shard(shard_path)
        assert shard["emb"].dtype == torch.float32
        for path, embedding in zip(shard["path"], shard["emb"]):
            assert path not in embeddings, f"{path} encoded twice"
            embeddings[path] = embedding
    return embeddings


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 7, 12, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_partition_gives_every_path_to_exactly_one_rank(count, world_size):
    paths = [f"p{index:04d}" for index in range(count)]
    slices = [partition(paths, rank, world_size) for rank in range(world_size)]
    assert [path for rank_paths in slices for path in rank_paths] == paths
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_batches_never_cross_a_shard_boundary():
    shards = [(0, 0, 5), (2, 10, 3)]  # step 1 is already done
    batches, steps = shard_batches(shards, batch_size=2)
    assert batches == [[0, 1], [2, 3], [4], [10, 11], [12]]
    assert steps == [0, 0, 0, 2, 2]


def test_write_shard_is_atomic_and_loads_safely(tmp_path):
    path = write_shard(tmp_path / "0-000-4.ckpt", ["a", "b"], torch.ones(2, 3), [("c", "empty file")])
    assert sorted(os.listdir(tmp_path)) == ["0-000-4.ckpt"]
    shard = torch.load(path, map_location="cpu", weights_only=True)
    assert shard["path"] == ["a", "b"] and shard["emb"].shape == (2, 3)
    assert shard["skipped"] == [["c", "empty file"]]


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_embedder_returns_unit_float32_rows(tiny_checkpoint, precision):
    from clipsearch.checkpoint import load_bundle
    from clipsearch.encoding.mapper import ImageEmbedder

    bundle = load_bundle(tiny_checkpoint)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    embeddings = ImageEmbedder(bundle.model, "cpu", precision)(images)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (3, 64)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        reference = torch.nn.functional.normalize(bundle.model.encode_image(images), dim=-1)
    assert (embeddings * reference).sum(dim=1).min() > 0.99


def _eval_transforms():
    """Every family's evaluation transform that splits at the pixels: ours, open_clip's, HuggingFace's."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from clipsearch.models.hf_clip import HFImageTransform
    from clipsearch.models.transforms import OPENAI_MEAN, OPENAI_STD, make_image_transform

    return {
        "ours": make_image_transform(24, OPENAI_MEAN, OPENAI_STD, is_train=False),
        "open_clip": image_transform_v2(PreprocessCfg(size=24, mean=OPENAI_MEAN, std=OPENAI_STD), is_train=False),
        "hf": HFImageTransform({"resize": {"shortest_edge": 24}, "crop": [24, 24], "resample": 3,
                                "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}),
    }


@pytest.mark.parametrize("family", ["ours", "open_clip", "hf"])
def test_uint8_pixels_normalised_as_a_batch_equal_the_whole_transform(family):
    import numpy as np
    from PIL import Image

    from clipsearch.models.transforms import split_normalize

    transform = _eval_transforms()[family]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for width, height in [(45, 37), (33, 70), (24, 24), (97, 31)]]
    pixels, normalize = split_normalize(transform)
    batch = torch.stack([pixels(image) for image in images])
    assert batch.dtype == torch.uint8
    assert torch.equal(normalize(batch), torch.stack([transform(image) for image in images]))  # bit for bit


def test_a_transform_that_does_not_split_keeps_float_batches(tiny_checkpoint):
    from clipsearch.checkpoint import load_bundle
    from clipsearch.encoding.mapper import ImageEmbedder
    from clipsearch.models.transforms import split_normalize

    def own_transform(image):
        return torch.zeros(3, 8, 8)

    assert split_normalize(own_transform) == (own_transform, None)
    bundle = load_bundle(tiny_checkpoint)
    with pytest.raises(ValueError, match="uint8 pixels need"):
        ImageEmbedder(bundle.model, "cpu")(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))


def _stacked_in_worker(items):
    from clipsearch.datasets import stack_for_transfer

    batch = stack_for_transfer(items)
    return batch, batch.is_shared()


def test_a_worker_stacks_its_batch_in_shared_memory():
    from torch.utils.data import DataLoader

    from clipsearch.datasets import stack_for_transfer

    items = [torch.full((3, 4, 4), index, dtype=torch.uint8) for index in range(5)]
    loader = DataLoader(items, batch_size=5, num_workers=1, collate_fn=_stacked_in_worker)
    batch, shared_in_worker = next(iter(loader))
    assert shared_in_worker and torch.equal(batch, torch.stack(items))
    assert not stack_for_transfer(items).is_shared()  # in the main process, an ordinary stack
    assert stack_for_transfer([]).shape == (0,)


def test_table_dataset_encodes_unique_images_of_all_splits(tmp_path, colour_images):
    root, paths = colour_images
    (tmp_path / "train.tsv").write_text("image\tcaption\n" + "".join(f"{p}\tcaption {i}\n" for i, p in enumerate(paths[:8])))
    (tmp_path / "dev.tsv").write_text("image\tcaption\n" + "".join(f"{p}\tanother\n" for p in paths[6:]))
    assert collect_image_paths(tmp_path) == sorted(map(str, paths))
    assert collect_image_paths(tmp_path, "dev") == sorted(map(str, paths[6:]))
    assert collect_image_paths(root) == sorted(map(str, paths))


def test_launcher_environments():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert layout_from_env(torchrun, devices=1, num_nodes=1) == ProcessLayout(3, 4, 1, 2, True)
    assert layout_from_env({}, devices=2, num_nodes=1) is None


# What SLURM puts in a process's environment: the allocation's variables in every process of the job,
# the step's only in tasks that srun started.
JOB_OF_TWO_NODES = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS_PER_NODE": "4",
                    "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def srun_task(job: dict, tasks: int, per_node: str, procid: int, localid: int, nodeid: int) -> dict:
    return {**job, "SLURM_NTASKS": str(tasks), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid)}


def test_slurm_tasks_started_by_srun_are_ranks_and_a_batch_script_is_one_process():
    from clipsearch.encoding.launcher import node_rank_from_env

    # srun, one task per device: each task is a rank.
    per_device = srun_task(JOB_OF_TWO_NODES, 8, "4(x2)", procid=5, localid=1, nodeid=1)
    assert layout_from_env(per_device, devices=4, num_nodes=2) == ProcessLayout(5, 8, 1, 4, False)
    with pytest.raises(UserError, match="SLURM started 8 tasks"):
        layout_from_env(per_device, devices=1, num_nodes=1)
    # srun, one task per node: each starts --devices ranks, at its node's place.
    per_node = srun_task(JOB_OF_TWO_NODES, 2, "1(x2)", procid=1, localid=0, nodeid=1)
    assert layout_from_env(per_node, devices=4, num_nodes=2) is None
    assert node_rank_from_env(per_node, num_nodes=2, node_rank=0) == 1
    # The batch script of `sbatch --ntasks=4` on one node, without srun: one process, which must start
    # the 4 ranks itself rather than take itself for rank 0 of 4 and encode a quarter.
    batch_script = {**JOB_OF_TWO_NODES, "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "1"}
    assert layout_from_env(batch_script, devices=4, num_nodes=1) is None
    assert node_rank_from_env(batch_script, num_nodes=1, node_rank=0) == 0
    # Across two nodes a batch script alone would leave the second node's share undone: refused.
    with pytest.raises(UserError, match="not started by srun"):
        layout_from_env(JOB_OF_TWO_NODES, devices=4, num_nodes=2)
    # An salloc shell run as an interactive step: one task, whatever the allocation holds.
    interactive = srun_task(JOB_OF_TWO_NODES, 1, "1", procid=0, localid=0, nodeid=0)
    assert layout_from_env({**interactive, "SLURM_NTASKS": "8"}, devices=4, num_nodes=1) is None


def test_flags_validated_and_defaults():
    args = parse_args(["--dataset_path", "some/where"])
    # A folder outside the project's dataset/ gets dataset/<its name>/emb in the project, not a folder inside it.
    assert args.emb_path == os.path.join(DEFAULT_DATASETS_DIR, "where", "emb") and args.batch_size == 64
    with pytest.raises(SystemExit):
        parse_args(["--node_rank", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--precision", "8"])


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def test_one_process_writes_normalised_shards_and_manifest(tmp_path, tiny_checkpoint, colour_images):
    root, paths = colour_images
    manifest = encode(tiny_checkpoint, root, tmp_path / "emb", "--batch_size", "4", "--shard_size", "5")
    embeddings = read_all(tmp_path / "emb")
    assert set(embeddings) == {str(path) for path in paths}
    norms = torch.stack(list(embeddings.values())).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert [p.name for p in list_shards(tmp_path / "emb")] == ["0-000-4.ckpt", "0-001-4.ckpt", "0-002-4.ckpt"]
    assert manifest["counts"] == {"encoded": 12, "skipped": 0, "shards": 3}
    assert manifest == json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["embed_dim"] == 64 and len(manifest["fingerprint"]) == 16


def test_two_processes_match_one_and_nodes_never_collide(tmp_path, tiny_checkpoint, colour_images):
    root, _ = colour_images
    encode(tiny_checkpoint, root, tmp_path / "one", "--batch_size", "3")
    manifest = encode(tiny_checkpoint, root, tmp_path / "two", "--batch_size", "3", "--devices", "2", "--accelerator", "cpu")
    assert manifest["world_size"] == 2 and manifest["counts"]["encoded"] == 12
    one, two = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    assert set(one) == set(two)
    for path in one:
        torch.testing.assert_close(one[path], two[path], atol=1e-4, rtol=0)
    assert {p.name.split("-")[0] for p in list_shards(tmp_path / "two")} == {"0", "1"}

    # Two nodes started by hand, one after the other: the second to finish writes the manifest.
    nodes = tmp_path / "nodes"
    assert encode(tiny_checkpoint, root, nodes, "--num_nodes", "2", "--node_rank", "1") is None
    first_names = {p.name for p in list_shards(nodes)}
    manifest = encode(tiny_checkpoint, root, nodes, "--num_nodes", "2", "--node_rank", "0")
    second_names = {p.name for p in list_shards(nodes)} - first_names
    assert first_names and second_names and not first_names & second_names
    assert manifest["counts"]["encoded"] == 12 and set(read_all(nodes)) == set(one)


def test_resume_after_kill_completes_without_duplicates(tmp_path, tiny_checkpoint, colour_images):
    root, paths = colour_images
    emb_path = tmp_path / "emb"
    encode(tiny_checkpoint, root, emb_path, "--batch_size", "2", "--shard_size", "2")
    shards = list_shards(emb_path)
    assert len(shards) == 6
    # A kill leaves some shards unwritten, a half-written temporary file and no manifest.
    for lost in (shards[1], shards[4]):
        lost.unlink()
    (emb_path / "manifest.json").unlink()
    (emb_path / "0-001-2.ckpt.tmp").write_bytes(b"half a shard")
    kept_times = {p.name: p.stat().st_mtime_ns for p in list_shards(emb_path)}

    manifest = encode(tiny_checkpoint, root, emb_path, "--batch_size", "2", "--shard_size", "2")
    assert set(read_all(emb_path)) == {str(path) for path in paths}
    assert manifest["counts"] == {"encoded": 12, "skipped": 0, "shards": 6}
    assert not list(emb_path.glob("*.tmp"))
    assert {name: (emb_path / name).stat().st_mtime_ns for name in kept_times} == kept_times

    # Other settings on an unchanged collection: nothing to encode, nothing rewritten.
    manifest = encode(tiny_checkpoint, root, emb_path, "--batch_size", "3", "--shard_size", "2")
    assert manifest["this_update"]["encoded"] == 0 and manifest["counts"]["encoded"] == 12
    assert {name: (emb_path / name).stat().st_mtime_ns for name in kept_times} == kept_times
    manifest = encode(tiny_checkpoint, root, emb_path, "--batch_size", "3", "--overwrite")
    assert [p.name for p in list_shards(emb_path)] == ["0-000-3.ckpt"]
    assert manifest["counts"]["encoded"] == 12


def test_another_model_into_the_same_folder_is_refused(tmp_path, tiny_checkpoint, colour_images):
    from clipsearch.checkpoint import load_bundle, save_bundle

    root, _ = colour_images
    encode(tiny_checkpoint, root, tmp_path / "emb")
    other = load_bundle(tiny_checkpoint)
    with torch.no_grad():
        other.model.logit_scale.add_(1.0)
    other_checkpoint = save_bundle(other, tmp_path / "other.ckpt")
    with pytest.raises(EncodingMismatchError, match="another model.*other.ckpt.*--emb_path"):
        encode(other_checkpoint, root, tmp_path / "emb")


def test_bad_images_are_skipped_listed_and_counted(tmp_path, tiny_checkpoint, colour_images):
    _, paths = colour_images
    dataset = tmp_path / "dataset"
    (dataset / "images").mkdir(parents=True)
    good = [str(path) for path in paths[:3]]
    (dataset / "images" / "empty.jpg").write_bytes(b"")
    (dataset / "images" / "text.jpg").write_text("this is not a picture")
    (dataset / "images" / "cut.png").write_bytes(paths[0].read_bytes()[:60])
    bad = {
        str(dataset / "images" / "empty.jpg"): "empty file",
        str(dataset / "images" / "text.jpg"): "not an image",
        str(dataset / "images" / "cut.png"): "truncated image",
        str(dataset / "images" / "gone.png"): "missing file",
    }
    rows = [*good, *bad]
    (dataset / "train.tsv").write_text("image\tcaption\n" + "".join(f"{path}\ta caption\n" for path in rows))

    manifest = encode(tiny_checkpoint, dataset, tmp_path / "emb", "--batch_size", "2")
    assert set(read_all(tmp_path / "emb")) == set(good)
    assert manifest["counts"]["encoded"] == 3 and manifest["counts"]["skipped"] == 4
    lines = (tmp_path / "emb" / "errors.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    assert dict(line.split("\t") for line in lines[1:]) == bad


def test_concurrent_writers_of_one_json_file_never_collide(tmp_path):
    """Every rank writes model.json; each needs its own temporary, or a rename finds it gone."""
    from concurrent.futures import ThreadPoolExecutor

    from clipsearch.store import read_json, write_json

    target = tmp_path / "model.json"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: write_json(target, {"writer": n}), range(200)))
    assert read_json(target)["writer"] in range(200)
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporaries left behind


def test_missing_inputs_answer_before_torch_loads(tmp_path):
    """A wrong path is one line, found before torch or the model load (so it answers at once)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from clipsearch.cli.common import UserError\n"
        "from clipsearch.cli.encode import main\n"
        "for argv in (['--dataset_path', sys.argv[1]], ['--dataset_path', sys.argv[2], '--load_model', sys.argv[1]]):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except UserError as error:\n"
        "        print(error)\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "nowhere"), str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"--dataset_path {tmp_path / 'nowhere'} is not a folder")
    assert lines[1].startswith(f"--load_model {tmp_path / 'nowhere'}: no such file")
    assert lines[2] == "torch not loaded"


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: models/latest/best.ckpt)", "(default: dataset/sample)", "(default: 64)", "(default: 10000)"):
        assert shown in text
    with pytest.raises(SystemExit):
        parse_args(["--batch-size", "0"])  # dashes accepted, and the value checked


def test_model_json_records_the_resolved_checkpoint_and_its_run(tmp_path, tiny_checkpoint, colour_images):
    root, _ = colour_images
    run = tmp_path / "models" / "2026-11-29-run"
    run.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "best.ckpt")
    (tmp_path / "models" / "latest").symlink_to(run.name)
    encode(tmp_path / "models" / "latest" / "best.ckpt", root, tmp_path / "emb")
    model = json.loads((tmp_path / "emb" / "model.json").read_text())
    assert model["load_model"] == str((run / "best.ckpt").resolve()) and model["run"] == "2026-11-29-run"


def test_each_encoding_rank_makes_its_own_gpu_the_current_one(monkeypatch):
    """The loader's pin-memory thread and pinned buffers use the current GPU: left at GPU 0, every rank
    would open a context there."""
    from clipsearch.encoding.runner import use_rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    devices = [use_rank_device("auto", local_rank) for local_rank in range(6)]
    assert devices == [torch.device("cuda", local_rank % 4) for local_rank in range(6)]
    assert made_current == devices
    assert use_rank_device("cpu", 3) == torch.device("cpu") and len(made_current) == 6
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        use_rank_device("gpu", 0)


def test_each_encoding_rank_takes_its_share_of_the_node_for_decoding(tmp_path, tiny_checkpoint, colour_images, monkeypatch):
    """Four ranks on a 16-core node (torchrun passes no --devices): 16 / 4 - 1 decoders each, not 8,
    and 16 / 4 torch threads unless --cpu_threads says how many."""
    from clipsearch.encoding import runner

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    workers = []
    make_loader = runner.make_loader
    monkeypatch.setattr(runner, "make_loader", lambda *args, **kwargs: workers.append(args[3]) or make_loader(
        *args[:3], 0, **kwargs))
    root, _ = colour_images
    config = runner.EncodeConfig(str(tiny_checkpoint), str(root), str(tmp_path / "emb"), accelerator="cpu", progress=False)
    threads = torch.get_num_threads()  # a CPU rank sets its share of the (pretended) cores
    threads_set = []
    try:
        runner.encode_rank(config, rank=1, world_size=4, local_rank=1, local_world_size=4)
        threads_set.append(torch.get_num_threads())
        runner.encode_rank(dataclasses.replace(config, num_workers=2, cpu_threads=1), rank=2, world_size=4,
                           local_rank=2, local_world_size=4)
        threads_set.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(threads)
    assert workers == [3, 2]
    assert threads_set == [4, 1]
    # Decided by each rank, where the node's ranks are known.
    assert parse_args([]).num_workers is None and parse_args([]).cpu_threads is None
    assert parse_args(["--cpu_threads", "3"]).cpu_threads == 3
