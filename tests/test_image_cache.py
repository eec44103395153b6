"""Training on cached outputs of the locked image stages (--cache_image_views)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from clipsearch import train
from clipsearch.checkpoint import read_checkpoint
from clipsearch.cli.common import UserError
from clipsearch.data import read_table
from clipsearch.image_cache import ImageFeatureCache, LockedPrefixSplit
from clipsearch.models.image_tower import create_image_tower, image_tower_groups
from clipsearch.models.transforms import make_image_transform, with_random_mirror
from clipsearch.sample_data import ensure_sample_dataset
from src_our.main import main as our_main


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return ensure_sample_dataset(tmp_path_factory.mktemp("data") / "sample", num_train=24, num_dev=6, image_size=32)


def locked_split(unlocked: int) -> LockedPrefixSplit:
    torch.manual_seed(0)  # the same random tower every call: a resumed cache must match a whole one
    tower = create_image_tower("tf_efficientnet_lite0").eval()
    groups = image_tower_groups(tower)
    return LockedPrefixSplit(tower, groups[: len(groups) - unlocked], image_size=32)


def test_prefix_then_suffix_is_the_tower_and_unsupported_towers_are_refused():
    split = locked_split(unlocked=4)
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(split.suffix(split.prefix(images)), split.tower(images), rtol=1e-4, atol=1e-5)
    # Cached outputs are fp16: the suffix takes them as they come.
    assert split.suffix(split.prefix(images).half()).dtype == torch.float32
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    with pytest.raises(ValueError, match="cannot be cached"):
        LockedPrefixSplit(vit, image_tower_groups(vit)[:3], image_size=32)
    with pytest.raises(ValueError, match="no locked stage"):
        LockedPrefixSplit(split.tower, [], image_size=32)


def build_cache(folder: Path, image_paths: list[str], world_size: int = 1) -> ImageFeatureCache:
    cache = ImageFeatureCache(folder, image_paths, views=2, identity={"test": 1}, world_size=world_size)
    transform = make_image_transform(32, (0.5,) * 3, (0.5,) * 3, is_train=True)
    for rank in range(world_size):
        cache.build(locked_split(unlocked=3), transform, rank=rank, seed=0, image_size=32, batch_size=4)
    return cache


def test_cache_resumes_after_a_kill_and_lists_unreadable_images(tiny_dataset, tmp_path, capsys):
    paths = sorted(str(p) for p in (tiny_dataset / "images").rglob("*.*"))[:9]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths.append(str(broken))
    whole = build_cache(tmp_path / "whole", paths)
    assert whole.is_complete()
    # Progress: a line per tenth of the images (here every batch of two), the last one at the end.
    progress = [line for line in capsys.readouterr().err.splitlines() if "images/s" in line]
    assert len(progress) == 5 and "10/10 images x 2 views" in progress[-1]
    assert whole.read(str(broken), 0) == (None, "not an image")
    first, _ = whole.read(paths[0], 0)
    assert first.dtype == torch.float16 and not torch.equal(first, whole.read(paths[0], 1)[0]), "views differ"

    killed = ImageFeatureCache(tmp_path / "killed", paths, views=2, identity={"test": 1})
    calls = {"n": 0}

    def transform_then_die(image):
        calls["n"] += 1
        if calls["n"] > 10:  # after two batches of two images x two views are on disk
            raise KeyboardInterrupt
        return make_image_transform(32, (0.5,) * 3, (0.5,) * 3, is_train=True)(image)

    with pytest.raises(KeyboardInterrupt):
        killed.build(locked_split(unlocked=3), transform_then_die, rank=0, seed=0, image_size=32, batch_size=4)
    state = json.loads((tmp_path / "killed" / "0-of-1.json").read_text())
    assert 0 < state["done"] < len(paths)
    resumed = build_cache(tmp_path / "killed", paths)
    for path in paths:
        for view in range(2):
            expected, got = whole.read(path, view)[0], resumed.read(path, view)[0]
            assert (expected is None and got is None) or torch.equal(expected, got)
    # Two ranks split the images and read back the same features.
    two = build_cache(tmp_path / "two", paths, world_size=2)
    assert torch.equal(two.read(paths[3], 1)[0], whole.read(paths[3], 1)[0])


def test_training_on_cached_stages_trains_only_the_unlocked_ones_and_resumes(tiny_dataset, tmp_path, monkeypatch):
    flags = [f"--dataset_path={tiny_dataset}", f"--models_dir={tmp_path / 'models'}", f"--logs_dir={tmp_path / 'logs'}",
             "--run_name=cached", "--image_resolution=32", "--text_length=16", "--embed_dim=32", "--batch_size=8",
             "--num_workers=0", "--warmup_steps=1", "--val_check_interval=2", "--lock_image",
             "--lock_image_unlocked_groups=3", "--cache_image_views=2", "--lr=1e-2"]
    with pytest.raises(UserError, match="--lock_image"):
        our_main([*[f for f in flags if f != "--lock_image"], "--max_steps=2"])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    our_main([*flags, "--fast_dev_run=1"])
    assert not list(scratch.iterdir()), "a smoke run removes the cache it made in a temporary folder"
    assert not (tmp_path / "models" / "cached").exists()
    first = our_main([*flags, "--max_steps=2"])
    started_at = json.loads((first.run_dir / "run.json").read_text())["started_at"]
    cache_folder = first.run_dir / "image_cache"
    state = json.loads((cache_folder / "0-of-1.json").read_text())
    train_images = set(read_table(tiny_dataset, "train")["image"])
    assert state["done"] == len(train_images) and not state["bad"]  # one row per training image
    matrix = np.memmap(cache_folder / "0-of-1.f16", dtype=np.float16, mode="r")
    assert np.abs(matrix).max() > 0
    before = read_checkpoint(first.run_dir / "last.ckpt")["state_dict"]
    stamp = (cache_folder / "0-of-1.f16").stat().st_mtime_ns
    resumed = our_main([*flags, "--max_steps=4"])  # same run, more steps: resumes and reuses the cache
    assert resumed.start_step == 2 and resumed.global_step == 4
    assert (cache_folder / "0-of-1.f16").stat().st_mtime_ns == stamp, "a complete cache is not rebuilt"
    clock = json.loads((resumed.run_dir / "run.json").read_text())
    assert clock["started_at"] == started_at and len(clock["resumed_at"]) == 1  # minutes count from the first start
    after = read_checkpoint(resumed.run_dir / "last.ckpt")["state_dict"]
    changed = {name for name, value in before.items() if not torch.equal(after[name], value)}
    assert any(name.startswith("model.visual.conv_head") for name in changed)
    assert not any(name.startswith(("model.visual.conv_stem", "model.visual.blocks.0.")) for name in changed)
    assert "model.image_projection.weight" in changed
    shutil.rmtree(cache_folder)


def test_a_cache_is_reused_across_text_side_changes_and_rebuilt_for_image_side_ones(tiny_dataset, tmp_path,
                                                                                   monkeypatch):
    def flags(run_name: str, *extra: str) -> list[str]:
        return [f"--dataset_path={tiny_dataset}", f"--models_dir={tmp_path / 'models'}", f"--logs_dir={tmp_path / 'logs'}",
                f"--run_name={run_name}", "--image_resolution=32", "--text_length=16", "--embed_dim=32",
                "--batch_size=8", "--num_workers=0", "--warmup_steps=1", "--max_steps=2", "--lock_image",
                "--lock_image_unlocked_groups=3", "--cache_image_views=2", *extra]

    def without_checkpoints(run):
        """Only the cache is looked at: each run's checkpoints (about 400 MB of real towers) go at once."""
        for checkpoint in run.run_dir.glob("*.ckpt"):
            checkpoint.unlink()
        return run

    first = without_checkpoints(our_main(flags("first")))
    state_file = first.run_dir / "image_cache" / "0-of-1.json"
    # As caches were written before the identity left the text flags out: every model flag recorded.
    state = json.loads(state_file.read_text())
    state["identity"]["model"] |= {"text_pooling": "mean", "lock_text": False, "embed_dim": 32}
    state_file.write_text(json.dumps(state))

    def run_on_a_copy(run_name: str, *extra: str) -> bool:
        """Whether the run reused the first run's cache, copied into its folder."""
        shutil.copytree(first.run_dir / "image_cache", tmp_path / "models" / run_name / "image_cache")
        matrix = tmp_path / "models" / run_name / "image_cache" / "0-of-1.f16"
        stamp = matrix.stat().st_mtime_ns
        without_checkpoints(our_main(flags(run_name, *extra)))
        return matrix.stat().st_mtime_ns == stamp

    # Drawing several captions per image reads the same cached crops.
    assert run_on_a_copy("text-side", "--embed_dim=16", "--lock_text", "--mirror_average", "--captions_per_image=2")
    # Stochastic depth acts in the trained stages only, after the cached ones.
    assert run_on_a_copy("stochastic-depth", "--image_drop_path=0.2")
    assert not run_on_a_copy("image-side", "--lock_image_unlocked_groups=2")
    # The cache holds training crops: training at the same size and encoding larger reuses it.
    assert run_on_a_copy("encoded-larger", "--image_resolution=40", "--train_resolution=32")
    assert not run_on_a_copy("trained-larger", "--image_resolution=40")
    # Mirrored crops are other features: the cache is rebuilt, through the mirroring transform.
    wrapped = []
    monkeypatch.setattr(train, "with_random_mirror", lambda transform: wrapped.append(transform) or
                        with_random_mirror(transform))
    assert not run_on_a_copy("mirrored", "--flip_images")
    assert len(wrapped) == 1
    # A cache drawn before training crops came from the centred square holds other crops of these
    # non-square images: it is remade.
    state = json.loads(state_file.read_text())
    del state["identity"]["crop"]
    state_file.write_text(json.dumps(state))
    assert not run_on_a_copy("older-crops")


def test_two_ranks_share_one_smoke_run_cache_and_the_first_removes_it(tiny_dataset, tmp_path):
    """2 CPU ranks (gloo) with --fast_dev_run: each caches half the images, and each reads the other's half."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    command = [sys.executable, str(repo / "src_our" / "main.py"), f"--dataset_path={tiny_dataset}",
               f"--models_dir={tmp_path / 'models'}", f"--logs_dir={tmp_path / 'logs'}", "--run_name=cached-ddp",
               "--image_resolution=32", "--text_length=16", "--embed_dim=32", "--batch_size=8", "--num_workers=0",
               "--lock_image", "--lock_image_unlocked_groups=3", "--cache_image_views=2", "--fast_dev_run=2",
               "--devices=2", "--accelerator=cpu", "--strategy=ddp"]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'package'}", "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(scratch)}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "fast_dev_run: 2 steps ran" in completed.stdout
    assert "(rank 0): 12 of 12 images" in completed.stderr and "(rank 1): 12 of 12 images" in completed.stderr
    assert not list(scratch.glob("image-cache-*")), "the smoke run's cache folder is removed"
    assert not (tmp_path / "models").exists()
