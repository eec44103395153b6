"""Training through the three real entry points, on tiny models and a tiny generated dataset."""
from __future__ import annotations

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
from PIL import Image
from torch.utils.data import DataLoader

from clipsearch.checkpoint import load_bundle, read_checkpoint
from clipsearch.data import ImageCaptionDataset, collate_pairs, read_table
from clipsearch.evaluate import evaluate
from clipsearch.lightning_module import CLIPModule
from clipsearch.loss import ContrastiveLoss
from clipsearch.models import build_from_spec
from clipsearch.models.openai_clip import openai_clip_spec
from clipsearch.sample_data import ensure_sample_dataset
from src_openai_finetune.main import main as finetune_main
from src_openai_pretrain.main import main as pretrain_main
from src_our.main import build_bundle as our_build_bundle
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
    assert {"best.ckpt", "last.ckpt", "params.json"} <= {p.name for p in result.run_dir.iterdir()}
    assert (tmp_path / "models" / "latest").resolve() == result.run_dir.resolve()
    assert list((tmp_path / "logs" / "scratch").glob("events.out.tfevents.*"))
    bundle = load_bundle(result.run_dir / "best.ckpt")
    # --text_length and --image_resolution really change the model.
    assert bundle.model.positional_embedding.shape[0] == 20
    assert bundle.model.visual.image_size == (32, 32)
    assert 0 <= result.metrics["val/text_to_image_R@10"] <= 100


def test_reloaded_checkpoint_gives_the_validated_numbers(tiny_dataset, tmp_path):
    """The final validation ran on the in-memory model; last.ckpt reloaded must reproduce it exactly."""
    result = pretrain_main(["--pretrain_clip=RN-Tiny", "--image_resolution=32",
                            *common_flags(tiny_dataset, tmp_path, "reload", steps=3)])
    reloaded = evaluate(load_bundle(result.run_dir / "last.ckpt"), tiny_dataset, "dev", batch_size=8)["metrics"]
    for key in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@5", "text_to_image_mean_rank"):
        assert reloaded[key] == pytest.approx(result.metrics[f"val/{key}"], abs=1e-4)


def test_our_clip_trains_from_packaged_towers(tiny_dataset, tmp_path):
    flags = ["--image_resolution=32", "--train_resolution=24", "--embed_dim=32", "--text_length=24", "--lock_text",
             "--lock_text_unlocked_layers=1", *common_flags(tiny_dataset, tmp_path, "our", steps=2)]
    trained_on = our_build_bundle(our_parse_args(flags)).train_transform(Image.new("RGB", (40, 30)))
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
    with pytest.raises(SystemExit, match="already holds a run"):
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


def _distributed_loss_worker(rank: int, world_size: int, port: int, images, texts, scale, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import torch.distributed.nn.functional as dist_nn

    def gather(tensor):
        return torch.cat(dist_nn.all_gather(tensor)), rank * tensor.shape[0]

    rows = images.shape[0] // world_size
    local_images = images[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    local_texts = texts[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    loss = ContrastiveLoss(world_size=world_size, gather=gather)(local_images, local_texts, scale)
    loss.backward()
    queue.put((rank, loss.item(), local_images.grad, local_texts.grad))
    dist.barrier()
    dist.destroy_process_group()


def test_loss_and_gradients_on_two_gloo_processes_match_one_process():
    torch.manual_seed(0)
    images, texts, scale = torch.randn(8, 16), torch.randn(8, 16), torch.tensor(2.0)
    single_images, single_texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    single_loss = ContrastiveLoss()(single_images, single_texts, scale)
    single_loss.backward()

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    processes = [context.Process(target=_distributed_loss_worker, args=(rank, 2, port, images, texts, scale, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    results = sorted(queue.get() for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    # Each rank scores its own rows, so the mean over ranks is the single-process loss; DDP averages
    # gradients over ranks, so rank gradients divided by the world size are the single-process ones.
    assert sum(loss for _, loss, _, _ in results) / 2 == pytest.approx(single_loss.item(), rel=1e-5)
    for rank, _, image_grad, text_grad in results:
        torch.testing.assert_close(image_grad / 2, single_images.grad[rank * 4:(rank + 1) * 4], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(text_grad / 2, single_texts.grad[rank * 4:(rank + 1) * 4], rtol=1e-4, atol=1e-6)


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
    with pytest.raises(SystemExit, match="16-mixed needs a CUDA GPU"):
        pretrain_main(["--pretrain_clip=ViT-Tiny-16", "--precision=16-mixed", "--accelerator=cpu", *flags])
    with pytest.raises(SystemExit, match="--warmup_steps"):
        pretrain_main(["--pretrain_clip=ViT-Tiny-16", *flags, "--warmup_steps=5"])
    with pytest.raises(SystemExit, match="unknown timm image model"):
        our_main(["--pretrain_image=not_a_model", *flags])


def test_two_process_ddp_training_validates_the_whole_dev_split(tiny_dataset, tmp_path):
    """2 CPU ranks (gloo): the distributed sampler pads the dev split, the metrics must not count pads."""
    command = [sys.executable, str(REPO / "src_openai_pretrain" / "main.py"), "--pretrain_clip=ViT-Tiny-16",
               "--image_resolution=32", "--devices=2", "--accelerator=cpu", "--strategy=ddp",
               *common_flags(tiny_dataset, tmp_path, "ddp", steps=2)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_dir = tmp_path / "models" / "ddp"
    single = evaluate(load_bundle(run_dir / "last.ckpt"), tiny_dataset, "dev", batch_size=8)["metrics"]
    validated = read_checkpoint(run_dir / "last.ckpt")["callbacks"]
    assert validated, "checkpoint callbacks state missing"
    assert "dev" in completed.stdout and "step 2" in completed.stdout
    assert f"text_to_image_R@1 {single['text_to_image_R@1']:.1f}" in completed.stdout


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
