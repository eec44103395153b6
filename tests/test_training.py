"""Training through the three real entry points, on tiny models and a tiny generated dataset."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from clipsearch import train, variants
from clipsearch.checkpoint import load_bundle, read_checkpoint
from clipsearch.cli.common import UserError
from clipsearch.data import read_table
from clipsearch.datasets import ImageCaptionDataset, collate_pairs
from clipsearch.evaluate import evaluate
from clipsearch.lightning_module import CLIPModule
from clipsearch.loss import LOSSES, ContrastiveLoss, gather_rows
from clipsearch.models import build_from_spec
from clipsearch.models.openai_clip import openai_clip_spec
from clipsearch.models.transforms import make_image_transform, with_random_mirror
from clipsearch.sample_data import ensure_sample_dataset
from clipsearch.train_config import LOSS_NAMES
from src_openai_finetune.main import main as finetune_main
from src_openai_pretrain.main import main as pretrain_main
from src_openai_pretrain.main import parse_args as pretrain_parse_args
from src_our.main import main as our_main
from src_our.main import parse_args as our_parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return ensure_sample_dataset(tmp_path_factory.mktemp("data") / "sample", num_train=48, num_dev=10, image_size=32)


def common_flags(dataset: Path, tmp_path: Path, run_name: str, steps: int = 4) -> list[str]:
    return [
        f"--dataset_path={dataset}", f"--models_dir={tmp_path / 'models'}", f"--logs_dir={tmp_path / 'logs'}",
        f"--run_name={run_name}", f"--max_steps={steps}", "--batch_size=8", "--num_workers=0",
        "--val_check_interval=2", "--warmup_steps=1", "--checkpoint_every_steps=2", "--log_every_n_steps=1",
    ]


def test_pretrain_openai_trains_and_writes_self_describing_checkpoints(tiny_dataset, tmp_path):
    result = pretrain_main(["--pretrain_clip=ViT-Tiny-16", "--text_length=20", "--image_resolution=32",
                            *common_flags(tiny_dataset, tmp_path, "scratch")])
    assert result.global_step == 4
    assert {"best.ckpt", "last.ckpt", "params.json", "run.json"} <= {p.name for p in result.run_dir.iterdir()}
    assert not (tmp_path / "models" / "latest").exists(), "a 4-step smoke run must not become models/latest"
    events = list((tmp_path / "logs" / "scratch").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The result panel (a callback) drew the top dev images after validation.
    assert "val/top_images_0" in EventAccumulator(str(events[0])).Reload().Tags()["images"]
    bundle = load_bundle(result.run_dir / "best.ckpt")
    # --text_length and --image_resolution really change the model.
    assert bundle.model.positional_embedding.shape[0] == 20
    assert bundle.model.visual.image_size == (32, 32)
    assert 0 <= result.metrics["val/text_to_image_R@10"] <= 100


@pytest.mark.parametrize("mirror_average", [False, True])
def test_reloaded_checkpoint_gives_the_validated_numbers(tiny_dataset, tmp_path, mirror_average):
    """The final validation ran on the in-memory model; last.ckpt reloaded must reproduce it exactly,
    mirror averaging included: the checkpoint says how its images are embedded."""
    result = pretrain_main(["--pretrain_clip=RN-Tiny", "--image_resolution=32",
                            *common_flags(tiny_dataset, tmp_path, "reload", steps=3),
                            *(["--mirror_average"] if mirror_average else [])])
    bundle = load_bundle(result.run_dir / "last.ckpt")
    assert bundle.mirror_average is mirror_average
    # Off, the flag leaves the run identity as it was before the flag existed.
    identity = json.loads((result.run_dir / "run.json").read_text())["identity"]
    assert identity["model"].get("mirror_average", False) is mirror_average
    reloaded = evaluate(bundle, tiny_dataset, "dev", batch_size=8)["metrics"]
    for key in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@5", "text_to_image_mean_rank"):
        assert reloaded[key] == pytest.approx(result.metrics[f"val/{key}"], abs=1e-4)


def test_our_clip_trains_from_packaged_towers(tiny_dataset, tmp_path):
    flags = ["--image_resolution=32", "--train_resolution=24", "--embed_dim=32", "--text_length=24", "--lock_text",
             "--lock_text_unlocked_layers=1", *common_flags(tiny_dataset, tmp_path, "our", steps=2)]
    trained_on = variants.build_pretrained_towers(our_parse_args(flags).model_args).train_transform(Image.new("RGB", (40, 30)))
    assert trained_on.shape == (3, 24, 24)
    result = our_main(flags)
    checkpoint = read_checkpoint(result.run_dir / "best.ckpt")
    spec = checkpoint["clipsearch"]["spec"]
    assert spec["family"] == "pretrained_towers" and spec["embed_dim"] == 32 and spec["image"]["timm_name"] == "tf_efficientnet_lite0"
    assert spec["image"]["size"] == 32  # trained on smaller crops, encodes at --image_resolution
    bundle = load_bundle(result.run_dir / "best.ckpt")
    assert bundle.model.encode_text(bundle.tokenizer(["a red circle"])).shape == (1, 32)


def test_resume_continues_global_step_and_optimizer(tiny_dataset, tmp_path):
    flags = ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", "--checkpoint_every_steps=2"]
    first = pretrain_main([*flags, *common_flags(tiny_dataset, tmp_path, "resume", steps=4)])
    assert first.start_step == 0 and first.global_step == 4
    # Same run name, more steps: --resume auto (the default) picks up last.ckpt.
    second = pretrain_main([*flags, *common_flags(tiny_dataset, tmp_path, "resume", steps=6)])
    assert second.start_step == 4 and second.global_step == 6
    state = read_checkpoint(second.run_dir / "last.ckpt")
    assert state["global_step"] == 6
    assert state["optimizer_states"][0]["state"], "optimizer moments must be saved for resuming"
    with pytest.raises(UserError, match="already holds a run"):
        pretrain_main([*flags, "--resume=none", *common_flags(tiny_dataset, tmp_path, "resume", steps=8)])


def test_overfitting_one_batch_drives_loss_far_below_chance(tiny_dataset):
    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16", image_size=32))
    table = read_table(tiny_dataset, "train").drop_duplicates("image").iloc[:16]
    batch = collate_pairs([ImageCaptionDataset(table, bundle.eval_transform, bundle.tokenizer)[i] for i in range(16)])
    loader = DataLoader([batch] * 10, batch_size=None)
    module = CLIPModule(bundle.model, bundle.spec, lr=2e-3, weight_decay=0.0, warmup_steps=1, max_steps=100)
    trainer = L.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    with torch.no_grad():
        image_features, text_features = module(batch["images"], batch["tokens"])
        loss = ContrastiveLoss()(image_features, text_features, module.model.logit_scale)
    assert loss.item() < 0.5 * math.log(16)  # chance is log(16)



def test_a_large_batch_trains_its_image_tower_in_cpu_slices_with_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16", image_size=32))  # LayerNorm: each image alone
    module = CLIPModule(bundle.model, bundle.spec, cpu_image_slice=10).train()
    images, tokens = torch.randn(10, 3, 32, 32), bundle.tokenizer(["a red circle"] * 10)

    def features_and_gradients():
        module.zero_grad(set_to_none=True)
        image_features, _ = module(images, tokens)
        image_features.square().sum().backward()
        return image_features.detach(), [p.grad.clone() for p in bundle.model.visual.parameters()]

    whole_features, whole_gradients = features_and_gradients()
    calls = []
    encode_image = bundle.model.encode_image
    monkeypatch.setattr(bundle.model, "encode_image", lambda batch: calls.append(len(batch)) or encode_image(batch))
    module.cpu_image_slice = 4
    sliced_features, sliced_gradients = features_and_gradients()
    assert calls == [4, 4, 2]
    torch.testing.assert_close(sliced_features, whole_features, atol=1e-5, rtol=1e-4)
    for sliced, whole in zip(sliced_gradients, whole_gradients, strict=True):
        torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-4)

# Rows of an 8-row global batch on ranks 0 and 1: even, uneven (a skipped image or two), and a
# rank whose images all failed.
RANK_SPLITS = ((4, 4), (5, 3), (0, 8))


def _distributed_loss_worker(rank: int, world_size: int, port: int, images, texts, scale, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import torch.distributed.nn.functional as dist_nn

    def all_gather(tensor, sync_grads=False):  # Lightning's contract: [world_size, *shape]
        if sync_grads:
            return torch.stack(dist_nn.all_gather(tensor))
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor)
        return torch.stack(gathered)

    results = []
    for loss_name in LOSSES:
        for split in RANK_SPLITS:
            rows = slice(sum(split[:rank]), sum(split[:rank + 1]))
            local_images = images[rows].clone().requires_grad_(True)
            local_texts = texts[rows].clone().requires_grad_(True)
            loss_fn = LOSSES[loss_name](world_size=world_size,
                                        gather=lambda features: gather_rows(features, rank, all_gather, sync_grads=True))
            loss = loss_fn(local_images, local_texts, scale)
            loss.backward()
            # As arrays, which pickle by value: torch would share tensors through a file descriptor
            # that dies with this process if it exits before the parent has read them.
            results.append((loss_name, split, loss.item(), local_images.grad.numpy(), local_texts.grad.numpy()))
    queue.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def test_loss_and_gradients_on_two_gloo_processes_match_one_process_even_with_uneven_or_empty_ranks():
    torch.manual_seed(0)
    images, texts, scale = torch.randn(8, 16), torch.randn(8, 16), torch.tensor(2.0)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    processes = [context.Process(target=_distributed_loss_worker, args=(rank, 2, port, images, texts, scale, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    by_rank = dict(queue.get() for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for case, (loss_name, split, _, _, _) in enumerate(by_rank[0]):
        single_images, single_texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        single_loss = LOSSES[loss_name]()(single_images, single_texts, scale)
        single_loss.backward()
        # DDP averages the ranks' gradients, so rank gradients divided by the world size must be the
        # single-process ones, and the ranks' losses must average to the single-process loss.
        losses = [by_rank[rank][case][2] for rank in range(2)]
        assert sum(losses) / 2 == pytest.approx(single_loss.item(), rel=1e-5), (loss_name, split)
        for rank in range(2):
            rows = slice(sum(split[:rank]), sum(split[:rank + 1]))
            _, _, _, image_grad, text_grad = by_rank[rank][case]
            torch.testing.assert_close(torch.from_numpy(image_grad) / 2, single_images.grad[rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(torch.from_numpy(text_grad) / 2, single_texts.grad[rows], rtol=1e-4, atol=1e-6)


def test_sigmoid_loss_is_each_pair_a_binary_question():
    torch.manual_seed(0)
    images, texts = torch.randn(5, 8), torch.randn(5, 8)
    loss = LOSSES["sigmoid"]()
    scale, bias = 3.0, loss.logit_bias.item()
    logits = scale * torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T + bias
    expected = sum(-math.log(torch.sigmoid(logits[i, j] if i == j else -logits[i, j]).item())
                   for i in range(5) for j in range(5)) / 5
    assert loss(images, texts, torch.tensor(math.log(scale))).item() == pytest.approx(expected, rel=1e-5)
    assert bias == -10.0  # SigLIP's start: almost every pair is a negative
    assert tuple(LOSSES) == LOSS_NAMES  # the flag's choices, named without importing torch


def test_every_caption_of_an_image_is_its_positive_in_both_losses():
    torch.manual_seed(0)
    images, texts, scale = torch.randn(3, 8), torch.randn(7, 8), 3.0
    owners = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    similarity = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    sigmoid = LOSSES["sigmoid"]()
    logits = similarity + sigmoid.logit_bias.item()
    expected = sum(-math.log(torch.sigmoid(logits[i, j] if owners[j] == i else -logits[i, j]).item())
                   for i in range(3) for j in range(7)) / 3
    log_scale = torch.tensor(math.log(scale))
    assert sigmoid(images, texts, log_scale, caption_images=owners).item() == pytest.approx(expected, rel=1e-5)
    # Softmax: an image's target spreads evenly over its captions; a caption's is its one image.
    per_image, per_text = similarity.log_softmax(dim=1), similarity.T.log_softmax(dim=1)
    image_term = -sum(per_image[i, owners == i].mean() for i in range(3)) / 3
    text_term = -per_text[torch.arange(7), owners].mean()
    assert (ContrastiveLoss()(images, texts, log_scale, caption_images=owners).item()
            == pytest.approx(((image_term + text_term) / 2).item(), rel=1e-5))
    for loss in (ContrastiveLoss(), sigmoid):  # one caption each: the pairs' diagonal
        assert (loss(images, texts[:3], log_scale, caption_images=torch.arange(3)).item()
                == pytest.approx(loss(images, texts[:3], log_scale).item(), rel=1e-6))


@pytest.mark.parametrize("loss_name", ["contrastive", "sigmoid"])
def test_several_captions_per_image_split_over_ranks_score_as_one_batch(loss_name):
    """Each rank's captions follow its images in the gathered batch; a rank's positives are its own."""
    torch.manual_seed(0)
    images, texts, log_scale = torch.randn(5, 8), torch.randn(10, 8), torch.tensor(1.0)
    owners = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3, 3, 4])  # rank 0: images 0-2, rank 1: images 3-4
    whole = LOSSES[loss_name]()(images, texts, log_scale, caption_images=owners).item()
    total = 0.0
    for image_rows, text_rows in ((slice(0, 3), slice(0, 6)), (slice(3, 5), slice(6, 10))):
        gathered = {3 if image_rows.start == 0 else 2: (F.normalize(images, dim=-1), image_rows.start),
                    6 if text_rows.start == 0 else 4: (F.normalize(texts, dim=-1), text_rows.start)}
        loss = LOSSES[loss_name]()
        loss.distribute(2, lambda features, gathered=gathered: gathered[features.shape[0]])
        local = loss(images[image_rows], texts[text_rows], log_scale, caption_images=owners[text_rows] - image_rows.start)
        total += local.item()
    assert total / 2 == pytest.approx(whole, rel=1e-5)  # DDP averages the two ranks


def test_sigmoid_loss_trains_its_bias_at_lr_in_its_own_run(tiny_dataset, tmp_path):
    flags = ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", "--num_workers=0"]
    result = pretrain_main([*flags, *common_flags(tiny_dataset, tmp_path, "sigmoid", steps=3), "--val_check_interval=3",
                            "--loss=sigmoid", "--lr=1e-3"])
    state = read_checkpoint(result.run_dir / "last.ckpt")
    groups = {group["name"]: group for group in state["optimizer_states"][0]["param_groups"]}
    assert "loss_fn.logit_bias" in groups["new_no_decay"]["param_names"]
    assert groups["new_no_decay"]["initial_lr"] == pytest.approx(1e-3)
    assert state["state_dict"]["loss_fn.logit_bias"].item() != -10.0  # trained, and saved for resuming
    # The loss is part of the run's identity; the default leaves identities made before the flag as they were.
    assert json.loads((result.run_dir / "run.json").read_text())["identity"]["loss"] == "sigmoid"
    default = pretrain_parse_args([*flags, f"--dataset_path={tiny_dataset}"])
    assert "loss" not in default.identity and default.loss == "contrastive"
    # Search never needs the bias: the weights reload as a model without it.
    assert load_bundle(result.run_dir / "best.ckpt").model is not None


def test_flip_images_mirrors_half_of_the_images_and_is_part_of_the_run_identity(tiny_dataset):
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    plain = make_image_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), is_train=False)
    as_is, mirrored = plain(image), plain(ImageOps.mirror(image))
    torch.manual_seed(0)
    outputs = [with_random_mirror(plain)(image) for _ in range(40)]
    flipped = [torch.equal(output, mirrored) for output in outputs]
    assert all(flip or torch.equal(output, as_is) for flip, output in zip(flipped, outputs))
    assert 10 < sum(flipped) < 30
    flags = ["--pretrain_clip=ViT-Tiny-16", f"--dataset_path={tiny_dataset}"]
    assert pretrain_parse_args([*flags, "--flip_images"]).identity["flip_images"] is True
    default = pretrain_parse_args(flags)  # identities made before the flag stay as they were
    assert "flip_images" not in default.identity and not default.flip_images


def test_loader_workers_share_a_nodes_cores_among_its_ranks(tiny_dataset, monkeypatch):
    """On a 16-core node with 8 GPUs, `--devices auto` starts 8 ranks: each gets 16 / 8 - 1 decoding
    processes per loader, not 8 each (128 in all)."""
    from dataclasses import replace

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    config = pretrain_parse_args(["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", f"--dataset_path={tiny_dataset}",
                                  "--batch_size=8"])
    assert config.devices == "auto" and config.num_workers is None
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16", image_size=32))
    train_loader, val_loader, *_ = train.make_loaders(config, bundle)
    assert train_loader.num_workers == val_loader.num_workers == 1
    assert train.loader_workers(replace(config, devices=2)) == 7
    assert train.loader_workers(config, env={"LOCAL_WORLD_SIZE": "4"}) == 3  # torchrun started 4 on this node
    assert train.loader_workers(replace(config, accelerator="cpu")) == 8  # one CPU process: at most 8
    assert train.loader_workers(replace(config, num_workers=5)) == 5


def test_caption_flags_are_part_of_the_run_identity_and_checked(tiny_dataset, capsys):
    flags = ["--pretrain_clip=ViT-Tiny-16", f"--dataset_path={tiny_dataset}"]
    assert pretrain_parse_args([*flags, "--caption_word_dropout=0.1"]).identity["caption_word_dropout"] == 0.1
    default = pretrain_parse_args(flags)  # identities made before the flag stay as they were
    assert "caption_word_dropout" not in default.identity and default.caption_word_dropout == 0.0
    with pytest.raises(SystemExit):
        pretrain_parse_args([*flags, "--caption_word_dropout=1"])  # every word gone is no caption
    assert "--caption_word_dropout: expected a rate in [0, 1)" in capsys.readouterr().err
    assert pretrain_parse_args([*flags, "--captions_per_image=5"]).identity["captions_per_image"] == 5
    assert "captions_per_image" not in default.identity and default.captions_per_image == 1


def test_the_cpu_image_slice_is_how_a_step_runs_not_what_the_run_is(tiny_dataset):
    flags = ["--pretrain_clip=ViT-Tiny-16", f"--dataset_path={tiny_dataset}"]
    sliced = pretrain_parse_args([*flags, "--cpu_image_slice=8"])
    assert sliced.cpu_image_slice == 8 and sliced.identity == pretrain_parse_args(flags).identity  # a run resumes


def test_training_crops_are_random_crops_of_the_centred_square_evaluation_sees():
    # A 4:3 photo: red bands at the sides, outside the centred square, and a gradient inside it.
    pixels = torch.zeros(60, 80, 3, dtype=torch.uint8)
    pixels[:, :10, 0] = pixels[:, 70:, 0] = 255
    pixels[:, 10:70, 1] = torch.linspace(0, 255, 60).to(torch.uint8)
    image = Image.fromarray(pixels.numpy())
    train_crop = make_image_transform(32, (0.0,) * 3, (1.0,) * 3, is_train=True)
    torch.manual_seed(0)
    crops = [train_crop(image) for _ in range(20)]
    assert max(crop[0].max().item() for crop in crops) < 0.05  # never a pixel of the side bands
    # Random crops, not torchvision's fixed fallback (a near-square crop of 80-100% of a 4:3 image does not fit).
    assert len({tuple(crop[1, 16].tolist()) for crop in crops}) >= 15
    # Evaluation keeps the same square (its resize blurs a column of the bands' edge in).
    evaluation = make_image_transform(32, (0.0,) * 3, (1.0,) * 3, is_train=False)(image)
    assert evaluation[0].mean().item() < 0.05


@pytest.fixture()
def tiny_openai_weights(tmp_path):
    """A tiny CLIP saved the two ways OpenAI-format weights come: a state dict and a TorchScript archive."""
    torch.manual_seed(1)
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16"))
    state_dict_path = tmp_path / "tiny_state_dict.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in bundle.model.state_dict().items()}}, state_dict_path)
    archive_path = tmp_path / "tiny_jit.pt"
    torch.jit.script(bundle.model).save(str(archive_path))
    return bundle, state_dict_path, archive_path


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_finetune_loads_openai_format_weights(tiny_openai_weights, tiny_dataset, tmp_path, kind):
    original, state_dict_path, archive_path = tiny_openai_weights
    weights = state_dict_path if kind == "state_dict" else archive_path
    result = finetune_main([
        "--finetune_clip=ViT-Tiny-16", f"--clip_checkpoint={weights}", "--lock_image", "--lr=1e-9",
        *common_flags(tiny_dataset, tmp_path, f"finetune-{kind}", steps=2),
    ])
    finetuned = load_bundle(result.run_dir / "last.ckpt")
    original.model.eval()
    images = torch.randn(2, 3, 64, 64)
    # The image tower was locked, so it still holds exactly the weights that were loaded.
    torch.testing.assert_close(finetuned.model.encode_image(images), original.model.encode_image(images))


def test_clear_errors_for_bad_weights_names_and_flags(tiny_dataset, tmp_path):
    flags = common_flags(tiny_dataset, tmp_path, "errors", steps=2)
    with pytest.raises(SystemExit, match="no file at"):
        finetune_main(["--finetune_clip=ViT-Tiny-16", "--clip_checkpoint=/nonexistent/ViT-B-32.pt", *flags])
    with pytest.raises(SystemExit, match="put it at models/openai/ViT-B-32.pt"):
        finetune_main(["--finetune_clip=ViT-B/32", *flags])
    wrong = tmp_path / "rn.pt"
    torch.save(build_from_spec(openai_clip_spec("RN-Tiny")).model.state_dict(), wrong)
    with pytest.raises(SystemExit, match="does not hold ViT-Tiny-16 weights"):
        finetune_main(["--finetune_clip=ViT-Tiny-16", f"--clip_checkpoint={wrong}", *flags])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="not a readable CLIP checkpoint"):
        finetune_main(["--finetune_clip=ViT-Tiny-16", f"--clip_checkpoint={garbage}", *flags])
    with pytest.raises(SystemExit, match="unknown CLIP architecture 'ViT-Q/99'"):
        pretrain_main(["--pretrain_clip=ViT-Q/99", *flags])
    with pytest.raises(UserError, match="16-mixed needs a CUDA GPU"):
        pretrain_main(["--pretrain_clip=ViT-Tiny-16", "--precision=16-mixed", "--accelerator=cpu", *flags])
    with pytest.raises(UserError, match="--warmup_steps"):
        pretrain_main(["--pretrain_clip=ViT-Tiny-16", *flags, "--warmup_steps=5"])
    with pytest.raises(SystemExit, match="unknown timm image model"):
        our_main(["--pretrain_image=not_a_model", *flags])


# Runs the pretraining door with images failing on purpose: rank 1's first batch loses every image
# and rank 0's second keeps 3 of 8, and each rank records the rows and loss of its steps.
BAD_BATCHES_DRIVER = """
import faulthandler
import sys

import torch.distributed as dist

from clipsearch import lightning_module, train
from clipsearch.datasets import collate_pairs

collated = []


def collate_with_bad_images(items):
    rank = dist.get_rank() if dist.is_initialized() else 0
    collated.append(len(items))
    keep = {(1, 1): 0, (0, 2): 3}.get((rank, len(collated)), len(items))
    items = items[:keep] + [{"skipped": "corrupt image", "image_path": "bad.jpg"} for _ in items[keep:]]
    return collate_pairs(items)


faulthandler.dump_traceback_later(150, exit=True)  # ranks waiting on each other fail the test with their stacks
train.collate_pairs = collate_with_bad_images
step = lightning_module.CLIPModule.training_step


def recording_step(self, batch, batch_idx):
    loss = step(self, batch, batch_idx)
    with open(f"steps-{self.global_rank}.txt", "a") as record:
        record.write(f"{len(batch['image_paths'])} {loss.item()}\\n")
    return loss


lightning_module.CLIPModule.training_step = recording_step
from src_openai_pretrain.main import main  # noqa: E402

main(sys.argv[1:])
"""


def test_two_process_ddp_training_survives_bad_batches_and_validates_the_whole_dev_split(tiny_dataset, tmp_path):
    """2 CPU ranks (gloo): a rank whose batch lost every image takes part in the step with no rows
    instead of crashing or leaving the other waiting, and the distributed sampler pads the dev
    split, which the metrics must not count."""
    driver = tmp_path / "ddp_with_bad_images.py"
    driver.write_text(BAD_BATCHES_DRIVER)
    command = [sys.executable, str(driver), "--pretrain_clip=ViT-Tiny-16",
               "--image_resolution=32", "--devices=2", "--accelerator=cpu", "--strategy=ddp",
               *common_flags(tiny_dataset, tmp_path, "ddp", steps=2)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'package'}", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    steps = {rank: [line.split() for line in (tmp_path / f"steps-{rank}.txt").read_text().splitlines()] for rank in (0, 1)}
    assert [int(rows) for rows, _ in steps[0]] == [8, 3] and [int(rows) for rows, _ in steps[1]] == [0, 8]
    assert float(steps[1][0][1]) == 0.0  # no rows, no share of the loss
    assert all(math.isfinite(float(loss)) for rank in (0, 1) for _, loss in steps[rank])
    run_dir = tmp_path / "models" / "ddp"
    state = read_checkpoint(run_dir / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    single = evaluate(load_bundle(run_dir / "last.ckpt"), tiny_dataset, "dev", batch_size=8)["metrics"]
    validated = read_checkpoint(run_dir / "last.ckpt")["callbacks"]
    assert validated, "checkpoint callbacks state missing"
    assert "dev" in completed.stdout and "step 2" in completed.stdout
    table_row = next(line for line in completed.stdout.splitlines() if line.startswith("text->image"))
    assert table_row.split()[1] == f"{single['text_to_image_R@1']:.2f}"


def test_two_gloo_processes_train_to_the_weights_of_one_process(tiny_dataset, tmp_path):
    """Two ranks of 4 pairs (DDP on gloo) against one process with batches of 8: the same global
    batches, so the same weights after 3 steps, up to float rounding. Each rank trims its own
    captions and the optimiser runs fused, as on GPUs."""
    flags = ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", "--accelerator=cpu", "--val_split=none"]
    single = pretrain_main([*flags, *common_flags(tiny_dataset, tmp_path, "one", steps=3)])
    command = [sys.executable, str(REPO / "src_openai_pretrain" / "main.py"), *flags, "--devices=2", "--strategy=ddp",
               *common_flags(tiny_dataset, tmp_path, "two", steps=3), "--batch_size=4"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'package'}", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    one = read_checkpoint(single.run_dir / "last.ckpt")["state_dict"]
    two = read_checkpoint(tmp_path / "models" / "two" / "last.ckpt")["state_dict"]
    L.seed_everything(0, verbose=False)  # the runs' --seed: their initial weights
    initial = build_from_spec(openai_clip_spec("ViT-Tiny-16", image_size=32)).model.state_dict()
    # Summing the gathered rows in another order moves a few weights by up to 2% of their change
    # (AdamW enlarges tiny gradient differences); a lost or doubled share would be all of it.
    for name, value in one.items():
        moved = (value - initial[name.removeprefix("model.")]).abs().max()
        assert (two[name] - value).abs().max() <= 0.05 * moved + 1e-7, name


def test_training_batches_cross_as_uint8_pixels_and_reach_the_model_as_the_whole_transform_gives(tiny_dataset):
    """The loader's workers ship uint8 pixels (a quarter of the bytes); the module normalises each
    batch, equal bit for bit to the whole transform, random crop and mirror included."""
    config = pretrain_parse_args(["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", f"--dataset_path={tiny_dataset}",
                                  "--batch_size=8", "--num_workers=0"])
    bundle = build_from_spec(openai_clip_spec("ViT-Tiny-16", image_size=32))
    bundle.train_transform = with_random_mirror(bundle.train_transform)  # as --flip_images does
    train_loader, _, _, _, pixel_normalize = train.make_loaders(config, bundle)
    batch = next(iter(train_loader))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (8, 3, 32, 32)
    whole = ImageCaptionDataset(read_table(tiny_dataset, "train"), bundle.train_transform, bundle.tokenizer)
    module = CLIPModule(bundle.model, bundle.spec, pixel_normalize=pixel_normalize)
    for key in [(index, 1000 + index) for index in range(8)]:  # (row, augmentation seed), as the sampler draws
        pixels = train_loader.dataset[key]["image"]
        assert torch.equal(module._model_input(pixels[None])[0], whole[key]["image"])
    floats = torch.rand(2, 3, 32, 32)
    assert module._model_input(floats) is floats  # batches that are not pixels pass through
    with pytest.raises(ValueError, match="uint8 pixels"):
        CLIPModule(bundle.model, bundle.spec)._model_input(batch["images"])


def test_training_reads_webdataset_shards(tiny_dataset, tmp_path):
    """img2dataset's webdataset output trains directly; validation comes from a table via --val_path."""
    import io
    import tarfile

    table = read_table(tiny_dataset, "train").drop_duplicates("image")
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard_index in range(2):
        with tarfile.open(shards / f"{shard_index:05d}.tar", "w") as archive:
            for row_index, row in enumerate(table.iloc[shard_index::2].itertuples()):
                key = f"{shard_index:05d}{row_index:04d}"
                for suffix, payload in (("jpg", Path(row.image).read_bytes()), ("txt", row.caption.encode())):
                    member = tarfile.TarInfo(f"{key}.{suffix}")
                    member.size = len(payload)
                    archive.addfile(member, io.BytesIO(payload))
    result = pretrain_main(["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", f"--val_path={tiny_dataset}",
                            *common_flags(tiny_dataset, tmp_path, "shards", steps=2), f"--dataset_path={shards}"])
    assert result.global_step == 2
    assert "val/text_to_image_R@1" in result.metrics
    with pytest.raises(UserError, match="one caption per sample"):  # no table to group captions by image
        pretrain_main(["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", f"--val_path={tiny_dataset}",
                       *common_flags(tiny_dataset, tmp_path, "shards-grouped", steps=2), f"--dataset_path={shards}",
                       "--captions_per_image=2"])


def _record_initial_weights_and_batches(monkeypatch, build_name):
    """Wrap a door's build function and the training step to see what a real run started from and read."""
    from clipsearch import lightning_module

    seen = {"initial": [], "batches": []}
    build = getattr(variants, build_name)

    def recording_build(args):
        bundle = build(args)
        seen["initial"].append({k: v.clone() for k, v in bundle.model.state_dict().items()})
        return bundle

    step = lightning_module.CLIPModule.training_step

    def recording_step(self, batch, batch_idx):
        seen["batches"].append(list(batch["image_paths"]))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(variants, build_name, recording_build)
    monkeypatch.setattr(lightning_module.CLIPModule, "training_step", recording_step)
    return seen


def test_same_seed_same_start_same_order_same_metrics(tiny_dataset, tmp_path, monkeypatch):
    import src_openai_pretrain.main as door

    seen = _record_initial_weights_and_batches(monkeypatch, "build_openai_scratch")
    flags = ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", "--seed=7"]
    first = door.main([*flags, *common_flags(tiny_dataset, tmp_path, "seed-a", steps=3)])
    torch.manual_seed(12345)  # whatever ran before must not matter
    second = door.main([*flags, *common_flags(tiny_dataset, tmp_path, "seed-b", steps=3)])
    door.main([*flags, "--seed=8", *common_flags(tiny_dataset, tmp_path, "seed-c", steps=3)])
    first_weights, second_weights, other_weights = seen["initial"]
    for name, value in first_weights.items():
        torch.testing.assert_close(second_weights[name], value, rtol=0, atol=0)
    assert any(not torch.equal(other_weights[name], value) for name, value in first_weights.items())
    assert seen["batches"][:3] == seen["batches"][3:6] and seen["batches"][:3] != seen["batches"][6:]
    assert first.metrics and first.metrics == second.metrics


class _Killed(Exception):
    pass


def kill_after_step(main, flags: list[str], step: int, monkeypatch) -> None:
    """Run `main(flags)` and kill it as if the process died right after training step `step`."""
    original_end = train.ReproducibleSteps.on_train_batch_end

    def die_after_step(self, trainer, *args):
        original_end(self, trainer, *args)
        if trainer.global_step == step:
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(train.ReproducibleSteps, "on_train_batch_end", die_after_step)
        with pytest.raises(_Killed):
            main(flags)


def assert_same_last_weights(expected_run: Path, got_run: Path) -> None:
    """Bit for bit: every step's randomness, data order and optimiser state come back exactly."""
    expected = read_checkpoint(expected_run / "last.ckpt")["state_dict"]
    got = read_checkpoint(got_run / "last.ckpt")["state_dict"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_resumed_run_equals_an_uninterrupted_one(tiny_dataset, tmp_path, monkeypatch):
    """Killed mid-epoch after the step-3 checkpoint, resumed to step 8 across an epoch end (6 batches)."""
    flags = ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", "--num_workers=1"]
    uninterrupted = pretrain_main([*flags, *common_flags(tiny_dataset, tmp_path, "whole", steps=8),
                                   "--checkpoint_every_steps=3"])
    interrupted = [*flags, *common_flags(tiny_dataset, tmp_path, "killed", steps=8), "--checkpoint_every_steps=3"]
    kill_after_step(pretrain_main, interrupted, 4, monkeypatch)
    assert read_checkpoint(tmp_path / "models" / "killed" / "last.ckpt")["global_step"] == 3
    resumed = pretrain_main(interrupted)
    assert resumed.start_step == 3 and resumed.global_step == 8
    assert_same_last_weights(uninterrupted.run_dir, resumed.run_dir)


def test_heads_first_run_holds_its_towers_and_resumes_to_the_uninterrupted_result(tiny_dataset, tmp_path, monkeypatch):
    """--head_only_steps 2 with mirrored images, two drawn captions per image and dropped caption
    words: killed after step 3 (checkpoint at 2), resumed to step 5."""
    flags = ["--image_resolution=32", "--text_length=16", "--embed_dim=16", "--lock_text",
             "--lock_text_unlocked_layers=1", "--head_only_steps=2", "--flip_images", "--caption_word_dropout=0.3",
             "--captions_per_image=2", "--num_workers=1"]
    uninterrupted = our_main([*flags, *common_flags(tiny_dataset, tmp_path, "whole", steps=5)])
    interrupted = [*flags, *common_flags(tiny_dataset, tmp_path, "killed", steps=5)]
    kill_after_step(our_main, interrupted, 3, monkeypatch)
    at_step_2 = read_checkpoint(tmp_path / "models" / "killed" / "last.ckpt")
    assert at_step_2["global_step"] == 2
    # Two head-only steps leave every trainable tower weight exactly as the packaged weights loaded it.
    initial = variants.build_pretrained_towers(our_parse_args(interrupted).model_args).model.state_dict()
    groups = {group["name"]: group for group in at_step_2["optimizer_states"][0]["param_groups"]}
    towers = groups["pretrained"]["param_names"] + groups["pretrained_no_decay"]["param_names"]
    assert towers and all(torch.equal(at_step_2["state_dict"][f"model.{name}"], initial[name]) for name in towers)
    assert not torch.equal(at_step_2["state_dict"]["model.text_projection.weight"], initial["text_projection.weight"])
    resumed = our_main(interrupted)
    assert resumed.start_step == 2 and resumed.global_step == 5
    trained = read_checkpoint(uninterrupted.run_dir / "last.ckpt")["state_dict"]
    assert any(not torch.equal(trained[f"model.{name}"], initial[name]) for name in towers)  # the towers trained after
    assert_same_last_weights(uninterrupted.run_dir, resumed.run_dir)


def test_export_encodes_a_convolutional_tower_larger_and_refuses_other_towers(tiny_dataset, tmp_path, tiny_checkpoint):
    from clipsearch.checkpoint import model_fingerprint, save_bundle
    from clipsearch.cli.export import main as export_main
    from clipsearch.models.released import load_model

    args = our_parse_args([f"--dataset_path={tiny_dataset}", "--image_resolution=32", "--text_length=16", "--embed_dim=16"])
    trained = save_bundle(variants.build_pretrained_towers(args.model_args), tmp_path / "our.ckpt")
    export_main(["--load_model", str(trained), "--out", str(tmp_path / "at48.ckpt"), "--image_resolution", "48"])
    original, larger = load_model(str(trained)), load_model(str(tmp_path / "at48.ckpt"))
    assert larger.spec["image"]["size"] == 48
    assert larger.eval_transform(Image.new("RGB", (70, 50))).shape == (3, 48, 48)
    assert model_fingerprint(larger) != model_fingerprint(original)  # shards of one never pass for the other's
    weights = original.model.state_dict()
    assert all(torch.equal(value, weights[name]) for name, value in larger.model.state_dict().items())
    with pytest.raises(UserError, match="only 'our' CLIP"):  # an OpenAI ViT's grid is fixed
        export_main(["--load_model", str(tiny_checkpoint), "--out", str(tmp_path / "vit.ckpt"), "--image_resolution", "48"])
    assert not (tmp_path / "vit.ckpt").exists()


def test_export_averages_sizes_as_the_spec_records_and_refuses_what_cannot_be(tiny_dataset, tmp_path, tiny_checkpoint):
    from clipsearch.checkpoint import model_fingerprint, save_bundle
    from clipsearch.cli.export import main as export_main
    from clipsearch.models import ImageViews, embed_images
    from clipsearch.models.released import load_model

    args = our_parse_args([f"--dataset_path={tiny_dataset}", "--image_resolution=32", "--text_length=16", "--embed_dim=16"])
    bundle = variants.build_pretrained_towers(args.model_args)
    bundle.set_mirror_average(True)  # both kinds of view together
    trained = save_bundle(bundle, tmp_path / "our.ckpt")
    averaged_path = tmp_path / "averaged.ckpt"
    export_main(["--load_model", str(trained), "--out", str(averaged_path), "--image_resolution", "48",
                 "--scale_average", "32,24"])
    averaged = load_model(str(averaged_path))
    assert averaged.image_views == ImageViews(mirror=True, extra_sizes=(32, 24))
    assert model_fingerprint(averaged) != model_fingerprint(load_model(str(trained)))
    pixels = torch.stack([averaged.eval_transform(Image.new("RGB", (70, 50), (40 * i, 90, 200 - 30 * i))) for i in range(3)])
    model = averaged.model.eval()
    with torch.no_grad():
        def unit(size):
            sized = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True) if size != 48 else pixels
            return F.normalize(embed_images(model, sized, ImageViews(mirror=True)), dim=-1)

        expected = (unit(48) + unit(32) + unit(24)) / 3
        torch.testing.assert_close(embed_images(model, pixels, averaged.image_views), expected)
    # Moving the encoding size onto an averaged size drops that one; "off" clears the rest.
    export_main(["--load_model", str(averaged_path), "--out", str(tmp_path / "at32.ckpt"), "--image_resolution", "32"])
    assert load_model(str(tmp_path / "at32.ckpt")).image_views.extra_sizes == (24,)
    export_main(["--load_model", str(averaged_path), "--out", str(tmp_path / "one.ckpt"), "--scale_average", "off"])
    single = load_model(str(tmp_path / "one.ckpt"))
    assert single.image_views == ImageViews(mirror=True) and "scale_average" not in single.spec
    with pytest.raises(UserError, match="already encodes at"):
        export_main(["--load_model", str(averaged_path), "--out", str(tmp_path / "same.ckpt"), "--scale_average", "48"])
    with pytest.raises(UserError, match="only 'our' CLIP"):
        export_main(["--load_model", str(tiny_checkpoint), "--out", str(tmp_path / "vit.ckpt"), "--scale_average", "24"])
    with pytest.raises(SystemExit):
        export_main(["--load_model", str(trained), "--out", str(tmp_path / "bad.ckpt"), "--scale_average", "32,x"])
    assert not any((tmp_path / name).exists() for name in ("same.ckpt", "vit.ckpt", "bad.ckpt"))


def our_tiny_flags(dataset: Path, tmp_path: Path) -> list[str]:
    """The README's `bash 1_pretrain_our.sh` on tiny settings, run names left to the default."""
    return [f"--dataset_path={dataset}", f"--models_dir={tmp_path / 'models'}", f"--logs_dir={tmp_path / 'logs'}",
            "--image_resolution=32", "--text_length=16", "--embed_dim=32", "--batch_size=8", "--num_workers=0",
            "--max_steps=2", "--warmup_steps=1"]


def test_readme_sequence_gets_one_run_folder_per_setting(tiny_dataset, tmp_path):
    """`--max_steps 5`, then `--lock_image`, then `--text_pooling cls --embed_dim 512` in a row: three runs, no crash."""
    flags = our_tiny_flags(tiny_dataset, tmp_path)
    first = our_main(flags)
    locked = our_main([*flags, "--lock_image"])
    pooled = our_main([*flags, "--text_pooling=cls", "--embed_dim=48"])
    assert len({first.run_dir, locked.run_dir, pooled.run_dir}) == 3
    assert locked.start_step == 0 and pooled.start_step == 0
    assert read_checkpoint(pooled.run_dir / "best.ckpt")["clipsearch"]["spec"]["embed_dim"] == 48
    run_record = json.loads((locked.run_dir / "run.json").read_text())
    assert run_record["identity"]["model"]["lock_image"] is True and run_record["finished"] is True
    # Same flags again: the same run folder, resumed (already at max_steps), not a new one.
    assert our_main(flags).run_dir == first.run_dir
    # A named run with other model settings stops at once with one line saying what differs and what to do.
    with pytest.raises(UserError, match=r"--lock_image False -> True.*another --run_name"):
        our_main([*flags, f"--run_name={first.run_dir.name}", "--lock_image"])


def test_fast_dev_run_writes_nothing(tiny_dataset, tmp_path):
    result = pretrain_main(["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", "--fast_dev_run=1",
                            *common_flags(tiny_dataset, tmp_path, "smoke")])
    assert result.global_step == 1
    assert not (tmp_path / "models").exists() and not (tmp_path / "logs").exists()


def test_latest_is_the_newest_finished_run_that_is_not_a_smoke_run(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "SMOKE_STEPS", 3)
    flags = ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32"]
    real = pretrain_main([*flags, *common_flags(tiny_dataset, tmp_path, "real", steps=3)])
    latest = tmp_path / "models" / "latest"
    assert latest.resolve() == real.run_dir.resolve()
    pretrain_main([*flags, *common_flags(tiny_dataset, tmp_path, "smoke", steps=2)])
    assert latest.resolve() == real.run_dir.resolve()
    assert json.loads((tmp_path / "models" / "smoke" / "run.json").read_text())["smoke"] is True


def test_best_checkpoint_holds_weights_only_and_last_what_resuming_needs(tiny_dataset, tmp_path):
    result = pretrain_main(["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32",
                            *common_flags(tiny_dataset, tmp_path, "sizes", steps=2)])
    best, last = read_checkpoint(result.run_dir / "best.ckpt"), read_checkpoint(result.run_dir / "last.ckpt")
    assert "optimizer_states" not in best and "clipsearch" in best
    assert last["optimizer_states"]
    # The final last.ckpt (saved after fit) still knows where the data order stands.
    sampler_state = next(state["sampler"] for name, state in last["callbacks"].items() if "ReproducibleSteps" in name)
    assert sampler_state["position"] == 16 and sampler_state["epoch"] == 0
    assert (result.run_dir / "best.ckpt").stat().st_size < 0.6 * (result.run_dir / "last.ckpt").stat().st_size


def test_short_runs_validate_rarely_and_always_at_the_end(tiny_dataset, tmp_path):
    from clipsearch.cli.train_args import MIN_VAL_INTERVAL

    flags = ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=32", f"--dataset_path={tiny_dataset}"]
    assert pretrain_parse_args([*flags, "--max_steps=5"]).val_check_interval == MIN_VAL_INTERVAL
    assert pretrain_parse_args([*flags, "--max_steps=1000"]).val_check_interval == 200
    validations = []
    original = CLIPModule.on_validation_epoch_end
    without_interval = [flag for flag in common_flags(tiny_dataset, tmp_path, "short", steps=5)
                        if not flag.startswith("--val_check_interval")]
    try:
        CLIPModule.on_validation_epoch_end = lambda self: (validations.append(self.global_step), original(self))
        result = pretrain_main([*flags, *without_interval])
    finally:
        CLIPModule.on_validation_epoch_end = original
    assert validations == [5] and "val/mean_recall" in result.metrics


def run_door(door: str, *flags: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'package'}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / door / "main.py"), *flags], env=env, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_a_short_run_prints_only_what_the_user_needs(tiny_dataset, tmp_path):
    completed = run_door("src_openai_pretrain", "--pretrain_clip=ViT-Tiny-16", "--image_resolution=32",
                         *common_flags(tiny_dataset, tmp_path, "quiet", steps=2), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line for line in (completed.stdout + completed.stderr).replace("\r", "\n").splitlines() if line.strip()]
    assert any(line.startswith("run quiet: checkpoints in") for line in lines)
    assert any(line.startswith("text->image") for line in lines)
    noise = [line for line in lines if "Warning" in line or "Tip" in line or "LOAD REPORT" in line or "FLOPs" in line]
    assert not noise, noise
    assert len(lines) <= 12, "\n".join(lines)


@pytest.mark.parametrize("door", ["src_our", "src_openai_pretrain", "src_openai_finetune"])
def test_mistyped_flags_and_missing_data_answer_in_one_line_before_torch_loads(door, tmp_path):
    (tmp_path / "empty").mkdir()
    for flags, expected in ((["--batchsize", "8"], "did you mean --batch_size?"),
                            (["--dataset_path", str(tmp_path / "missing")], "no such folder"),
                            (["--dataset_path", str(tmp_path / "empty")], "holds no 'train' table")):
        completed = run_door(door, *flags, cwd=tmp_path)
        assert completed.returncode != 0
        lines = completed.stderr.strip().splitlines()
        assert len(lines) <= 2 and expected in lines[-1], completed.stderr
    module = {"src_our": "pretrain_our", "src_openai_pretrain": "pretrain_openai", "src_openai_finetune": "finetune_openai"}
    code = (f"import sys\nfrom clipsearch.cli.{module[door]} import parse_args\nparse_args(['--max_steps', '3'])\n"
            "print(sorted(name for name in ('torch', 'lightning', 'transformers') if name in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "package")}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert completed.stdout.strip() == "[]", completed.stderr


def test_a_ctrl_c_that_python_swallowed_stops_the_next_batch():
    """A KeyboardInterrupt raised inside a finalizer is printed and dropped; the next batch raises it again."""
    import gc
    import signal

    from clipsearch.train import CtrlC

    class Finalizer:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the main thread runs a __del__

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under `cmd &`
    ctrl_c = CtrlC()
    ctrl_c.install()
    try:
        Finalizer()  # dropped at once: its KeyboardInterrupt is "ignored"
        gc.collect()
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.on_train_batch_start(None, None, None, 0)
    finally:
        ctrl_c.restore()
        restored = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, inherited)
    assert restored is signal.default_int_handler
