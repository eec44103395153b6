"""Shared test setup: offline hubs, single-threaded determinism, small shared fixtures."""
import os

# A failed hub lookup hangs for ~45 s; every weight the tests use is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny open_clip ViT saved in the project's checkpoint format (64 px, 64-d)."""
    import torch

    from clipsearch.checkpoint import save_bundle
    from clipsearch.models import build_from_spec
    from clipsearch.models.openai_clip import openai_clip_spec

    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16"))
    return save_bundle(bundle, tmp_path_factory.mktemp("tiny_model") / "tiny.ckpt")


@pytest.fixture(scope="session")
def colour_images(tmp_path_factory):
    """Twelve small solid-colour PNGs in nested folders: distinct, real image files for encoders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colour_images")
    paths = []
    for index in range(12):
        folder = root / f"group{index % 3}"
        folder.mkdir(exist_ok=True)
        colour = ((index * 67) % 256, (index * 131) % 256, (index * 29) % 256)
        path = folder / f"image{index:02d}.png"
        Image.new("RGB", (48 + index, 40), colour).save(path)
        paths.append(path)
    return root, paths
