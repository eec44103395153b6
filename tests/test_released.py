"""Released weights through --load_model: HuggingFace CLIP folders, OpenAI files, exports and clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsearch.checkpoint import model_fingerprint
from clipsearch.cli.encode import main as encode_main
from clipsearch.cli.export import main as export_main
from clipsearch.cli.search import main as search_main
from clipsearch.models import build_from_spec
from clipsearch.models.openai_clip import openai_clip_spec
from clipsearch.models.released import ModelReferenceError, load_model
from clipsearch.search import SearchEngine

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "two blue squares on grass", "x"]


def _tiny_clip_tokenizer():
    """A CLIPTokenizer over bytes plus a few merges, written offline (CLIP's vocabulary layout, tiny)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    merges = ["r e", "re d</w>", "c i", "ci r", "b l", "bl u", "blu e</w>", "s q"]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel with tokenizer and image processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("hf_clip")
    tokenizer = _tiny_clip_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 24, **ids},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Textured images of odd sizes (crop offsets that round differently), as PNG and JPEG files."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for index, (width, height) in enumerate([(45, 37), (61, 50), (33, 70), (40, 40), (97, 31), (52, 67)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = root / f"photo{index}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _read_embeddings(emb_path: Path) -> dict[str, torch.Tensor]:
    embeddings = {}
    for shard in sorted(emb_path.glob("*.ckpt")):
        content = torch.load(shard, weights_only=True)
        embeddings.update({Path(p).name: e for p, e in zip(content["path"], content["emb"])})
    return embeddings


def test_hf_clip_encodes_and_searches_like_transformers(hf_clip_folder, photos, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    emb_path = tmp_path / "emb"
    encode_main(["--load_model", str(hf_clip_folder), "--dataset_path", str(photos[0].parent),
                 "--emb_path", str(emb_path), "--num_workers", "0", "--accelerator", "cpu", "--no_progress"])
    encoded = _read_embeddings(emb_path)

    reference = CLIPModel.from_pretrained(hf_clip_folder).eval()
    processor = AutoImageProcessor.from_pretrained(hf_clip_folder)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in photos], return_tensors="pt")
        expected = reference.get_image_features(**pixels).pooler_output
    expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(torch.stack([encoded[p.name] for p in photos]), expected, rtol=0, atol=1e-5)

    identity = json.loads((emb_path / "model.json").read_text())
    assert identity["load_model"] == str(hf_clip_folder.resolve())

    tokenizer = AutoTokenizer.from_pretrained(hf_clip_folder)
    with torch.no_grad():
        expected_text = reference.get_text_features(**tokenizer(CAPTIONS, padding=True, return_tensors="pt"))
    engine = SearchEngine.from_files(str(hf_clip_folder), emb_path)
    torch.testing.assert_close(
        engine.encode_texts(CAPTIONS), torch.nn.functional.normalize(expected_text.pooler_output, dim=-1),
        rtol=0, atol=1e-5,
    )
    # The real search command answers a text query over the folder and writes its grid.
    search_main(["--load_model", str(hf_clip_folder), "--emb_path", str(emb_path), "--query", CAPTIONS[0],
                 "--out_dir", str(tmp_path / "grids"), "--top_k", "3"])
    assert (tmp_path / "grids" / "a red circle.png").is_file()


def test_hf_siglip_embeds_like_transformers(photos, tmp_path):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tokenizer = _tiny_clip_tokenizer()
    torch.manual_seed(4)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 16,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": tokenizer.bos_token_id},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
    )
    reference = SiglipModel(config).eval()
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    for part in (reference, tokenizer, processor):
        part.save_pretrained(tmp_path)

    bundle = load_model(str(tmp_path))
    images = [Image.open(p).convert("RGB") for p in photos]
    tokens = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # SigLIP is used with max-length padding and no attention mask
        expected_images = reference.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        expected_texts = reference.get_text_features(input_ids=tokens).pooler_output
        pixels = torch.stack([bundle.eval_transform(image) for image in images])
        torch.testing.assert_close(bundle.model.encode_image(pixels), expected_images, rtol=0, atol=1e-5)
        torch.testing.assert_close(bundle.model.encode_text(bundle.tokenizer(CAPTIONS)), expected_texts, rtol=0, atol=1e-5)


def test_open_clip_local_dir_matches_open_clip_and_exports(photos, tmp_path):
    from clipsearch.models.openai_clip import load_architecture_config

    folder = tmp_path / "open_clip_model"
    folder.mkdir()
    model_config = load_architecture_config("ViT-Tiny-16")
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config, "preprocess_cfg": preprocess}))
    torch.manual_seed(5)
    torch.save(open_clip.CLIP(**model_config).state_dict(), folder / "open_clip_pytorch_model.bin")

    reference, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    reference_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    bundle = load_model(f"open_clip:local-dir:{folder}")
    exported = load_model(str(_export(f"open_clip:local-dir:{folder}", tmp_path / "e.ckpt")))
    images = [Image.open(p).convert("RGB") for p in photos]
    expected_pixels = torch.stack([transform(image) for image in images])
    with torch.no_grad():
        expected_images = reference.eval().encode_image(expected_pixels)
        expected_texts = reference.encode_text(reference_tokenizer(CAPTIONS))
        for loaded in (bundle, exported):
            pixels = torch.stack([loaded.eval_transform(image) for image in images])
            torch.testing.assert_close(pixels, expected_pixels)
            torch.testing.assert_close(loaded.model.encode_image(pixels), expected_images)
            torch.testing.assert_close(loaded.model.encode_text(loaded.tokenizer(CAPTIONS)), expected_texts)
    assert model_fingerprint(exported) == model_fingerprint(bundle)


def test_unknown_open_clip_names_and_tags_are_named():
    with pytest.raises(ModelReferenceError, match="its tags: openai"):
        load_model("open_clip:ViT-B-32/no_such_tag")
    with pytest.raises(ModelReferenceError, match="did you mean"):
        load_model("open_clip:ViT-B-33/openai")


def test_an_embedding_folder_never_mixes_models(hf_clip_folder, photos, tmp_path):
    from clipsearch.store import EncodingMismatchError

    exported = _export(str(hf_clip_folder), tmp_path / "hf.ckpt")
    other = _save_openai_formats(_tiny_openai_clip(None), tmp_path)["state_dict"]
    flags = ["--dataset_path", str(photos[0].parent), "--emb_path", str(tmp_path / "emb"), "--num_workers", "0",
             "--accelerator", "cpu", "--no_progress"]
    encode_main(["--load_model", str(hf_clip_folder), *flags])
    encode_main(["--load_model", str(exported), *flags])  # the same model, exported: resumes
    with pytest.raises(EncodingMismatchError, match="holds embeddings of another model"):
        encode_main(["--load_model", str(other), *flags])


def _tiny_openai_clip(config_name: str | None) -> torch.nn.Module:
    """A random CLIP in OpenAI's layout: a known local config, or one with OpenAI's 64-wide heads."""
    torch.manual_seed(2)
    if config_name:
        return build_from_spec(openai_clip_spec(config_name)).model.eval()
    return open_clip.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    ).eval()


def _save_openai_formats(model, folder: Path) -> dict[str, Path]:
    state_dict_path, archive_path = folder / "state_dict.pt", folder / "archive.pt"
    torch.save(model.state_dict(), state_dict_path)
    torch.jit.script(model).save(str(archive_path))
    return {"state_dict": state_dict_path, "torchscript": archive_path}


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_openai_files_load_as_open_clip_loads_them(tmp_path, kind):
    model = _tiny_openai_clip(None)
    with torch.no_grad():  # OpenAI released fp16 weights, and open_clip's loader rounds to fp16
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    paths = _save_openai_formats(model, tmp_path)
    path = paths[kind]
    bundle = load_model(str(path))
    # open_clip's loader takes our scripted archive's extra attn_mask buffer for a weight; its state dict twin is the same model.
    reference = open_clip.load_openai_model(str(paths["state_dict"]), device="cpu").eval()
    images, tokens = torch.randn(2, 3, 32, 32), bundle.tokenizer(CAPTIONS)
    assert tokens.shape[1] == 16  # the context length was read from the file
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(bundle.model.encode_text(tokens), reference.encode_text(tokens))
    assert bundle.spec["released"] == f"openai:{path.name}"


@pytest.mark.parametrize("config_name", ["ViT-Tiny-16", "RN-Tiny"])
def test_openai_files_of_known_configs_keep_their_head_counts(tmp_path, config_name):
    model = _tiny_openai_clip(config_name)
    bundle = load_model(str(_save_openai_formats(model, tmp_path)["state_dict"]))
    assert bundle.spec["architecture"] == config_name
    images, tokens = torch.randn(2, 3, 64, 64), bundle.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(bundle.model.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("source", ["hf_clip", "openai_archive"])
def test_export_gives_the_same_model(hf_clip_folder, tmp_path, source):
    if source == "hf_clip":
        reference = str(hf_clip_folder)
    else:
        reference = str(_save_openai_formats(_tiny_openai_clip(None), tmp_path)["torchscript"])
    original = load_model(reference)
    exported = load_model(str(_export(reference, tmp_path / "exported.ckpt")))
    assert model_fingerprint(exported) == model_fingerprint(original)
    size = original.spec["image"]["size"]
    images = [Image.fromarray(np.random.default_rng(3).integers(0, 256, (size + 9, size + 4, 3), dtype=np.uint8))]
    for bundle in (original, exported):
        bundle.pixels = torch.stack([bundle.eval_transform(image) for image in images])
    torch.testing.assert_close(exported.pixels, original.pixels)
    with torch.no_grad():
        torch.testing.assert_close(exported.model.encode_image(exported.pixels), original.model.encode_image(original.pixels))
        torch.testing.assert_close(
            exported.model.encode_text(exported.tokenizer(CAPTIONS)), original.model.encode_text(original.tokenizer(CAPTIONS))
        )


def test_finetuning_starts_from_an_export(hf_clip_folder, tmp_path):
    from clipsearch.checkpoint import load_bundle
    from clipsearch.sample_data import ensure_sample_dataset
    from src_openai_finetune.main import main as finetune_main

    dataset = ensure_sample_dataset(tmp_path / "sample", num_train=16, num_dev=8, image_size=32)
    exported = _export(str(hf_clip_folder), tmp_path / "exported.ckpt")
    result = finetune_main([
        f"--clip_checkpoint={exported}", "--lock_image", f"--dataset_path={dataset}",
        f"--models_dir={tmp_path / 'models'}", f"--logs_dir={tmp_path / 'logs'}", "--run_name=from-export",
        "--max_steps=2", "--batch_size=8", "--num_workers=0", "--val_check_interval=2", "--warmup_steps=1",
    ])
    finetuned, original = load_bundle(result.run_dir / "last.ckpt"), load_model(str(exported))
    assert finetuned.spec == original.spec
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the image tower was locked, so it still holds the exported weights
        torch.testing.assert_close(finetuned.model.encode_image(images), original.model.encode_image(images))


def test_finetuning_a_hf_clip_trains_its_heads_at_lr_and_its_towers_at_tower_lr(hf_clip_folder):
    model = load_model(str(hf_clip_folder)).model
    assert model.new_parameter_names() == {
        "model.visual_projection.weight", "model.text_projection.weight", "model.logit_scale"
    }


def _export(reference: str, out: Path) -> Path:
    export_main(["--load_model", reference, "--out", str(out)])
    return out


def _run(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "package")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize(("module", "reference", "message"), [
    ("clipsearch.cli.search", "ViT-L/14", "unknown model name"),
    ("clipsearch.cli.encode", "models/nowhere/best.ckpt", "no such file"),
    ("clipsearch.cli.encode", "RN50x4", "models/openai/RN50x4.pt"),
    ("clipsearch.cli.search", "openai/clip-vit-base-patch32", "HF_HUB_OFFLINE=1"),
    ("clipsearch.export", "open_clip:ViT-B-32/laion2b_s34b_b79k", "HF_HUB_OFFLINE=1 forbids downloading"),
])
def test_bad_references_fail_with_one_line(tmp_path, module, reference, message):
    extra = ["--out", str(tmp_path / "x.ckpt")] if module == "clipsearch.export" else []
    completed = _run(module, "--load_model", reference, *extra, cwd=tmp_path)
    assert completed.returncode == 1
    lines = [line for line in completed.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: --load_model"), completed.stderr
    assert message in lines[0]
