"""Tests for retrieval evaluation: the CLI on a tiny checkpoint, and a model whose recall must be 100."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from clipsearch.cli.common import UserError
from clipsearch.cli.evaluate import main
from clipsearch.evaluate import encode_split, evaluate
from clipsearch.models import ModelBundle

REPO = Path(__file__).resolve().parents[1]
# Pairwise different directions, so an image's colour matches only its own caption after normalising.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "cyan": (0, 255, 255)}


def write_colour_dataset(root: Path, corrupt_at: int | None = None) -> Path:
    """One PNG per colour with two captions each; optionally one corrupt file in the middle."""
    (root / "images").mkdir(parents=True)
    lines = ["image\tcaption"]
    for index, (name, rgb) in enumerate(COLOURS.items()):
        path = root / "images" / f"{name}.png"
        if index == corrupt_at:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken")
        else:
            Image.new("RGB", (20, 16), rgb).save(path)
        lines += [f"images/{name}.png\ta {name} square", f"images/{name}.png\t{name}"]
    (root / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


class MeanColourModel(nn.Module):
    """Images embed as their mean colour; captions as the colour their name stands for."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens):
        return tokens.float()


def colour_tokenizer(captions):
    return torch.tensor([next(rgb for name, rgb in COLOURS.items() if name in caption) for caption in captions])


def colour_bundle() -> ModelBundle:
    to_tensor = transforms.ToTensor()
    return ModelBundle(MeanColourModel(), to_tensor, to_tensor, colour_tokenizer, {"embed_dim": 3})


def test_matching_embeddings_give_perfect_recall_despite_a_skipped_image(tmp_path):
    # The corrupt image shifts every later image's row, so a wrong id mapping would lose recall.
    dataset = write_colour_dataset(tmp_path / "colours", corrupt_at=2)
    bundle = colour_bundle()
    bundle.model.train()
    result = evaluate(bundle, dataset, "dev", batch_size=2)

    metrics = result["metrics"]
    for direction in ("text_to_image", "image_to_text"):
        assert [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)] == [100.0, 100.0, 100.0]
        assert metrics[f"{direction}_median_rank"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0
    assert result["counts"]["images"] == 4
    assert result["counts"]["captions"] == 8
    assert result["counts"]["skipped_images"] == 1
    assert result["counts"]["skipped"] == {"corrupt image": 1}
    # Validation runs mid-training, so the model's mode is given back.
    assert bundle.model.training


def test_encode_split_rows_line_up(tmp_path):
    dataset = write_colour_dataset(tmp_path / "colours", corrupt_at=0)
    images, texts, caption_image_ids, report, _ = encode_split(colour_bundle(), dataset, "dev", batch_size=3)
    assert images.shape == (4, 3) and texts.shape == (8, 3)
    assert caption_image_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.allclose(
        nn.functional.normalize(images[caption_image_ids], dim=-1), nn.functional.normalize(texts, dim=-1)
    )
    assert report.total_skipped() == 1


def test_cli_on_tiny_checkpoint_writes_json(tiny_checkpoint, tmp_path, capsys):
    dataset = write_colour_dataset(tmp_path / "colours")
    out = tmp_path / "results" / "eval.json"
    main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(dataset), "--split", "dev",
          "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--out", str(out)])

    result = json.loads(out.read_text())
    assert result["checkpoint"] == str(Path(tiny_checkpoint).resolve())
    assert result["split"] == "dev" and result["dataset"] == str(dataset.resolve())
    assert result["counts"] == {"images": 5, "captions": 10, "skipped_images": 0, "skipped": {}, "conversions": {}}
    metrics = result["metrics"]
    for direction in ("text_to_image", "image_to_text"):
        for k in (1, 5, 10):
            assert 0.0 <= metrics[f"{direction}_R@{k}"] <= 100.0
        # Five images, so every image is within the top 10.
        assert metrics[f"{direction}_R@10"] == 100.0
        assert 1.0 <= metrics[f"{direction}_median_rank"] <= 5.0
    assert 0.0 <= metrics["mean_recall"] <= 100.0
    printed = capsys.readouterr().out
    assert "text->image" in printed and "image->text" in printed and "MeanR" in printed


def test_cli_default_output_sits_beside_the_checkpoint(tiny_checkpoint, tmp_path):
    dataset = write_colour_dataset(tmp_path / "colours" / "data")
    checkpoint = tmp_path / "models" / "tiny.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(Path(tiny_checkpoint).read_bytes())
    main(["--load_model", str(checkpoint), "--dataset_path", str(dataset), "--num_workers", "0", "--device", "cpu"])
    assert (tmp_path / "models" / "tiny.colours.dev.eval.json").is_file()


def test_bad_flags_are_rejected(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        main(["--load_model", str(tiny_checkpoint), "--dataset_path", str(tmp_path), "--batch_size", "0"])
    with pytest.raises(UserError, match="one device"):
        main(["--load_model", str(tiny_checkpoint), "--devices", "2"])


def run_evaluate_script(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "package"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", str(REPO / "4_evaluate.sh"), *flags], capture_output=True, text=True, env=env)


def test_user_mistakes_get_one_line_and_a_failing_exit(tiny_checkpoint, tmp_path):
    """A missing checkpoint, a shard given as the model, an empty folder: one line each, exit 1, no traceback."""
    from clipsearch.encoding.writer import write_shard

    dataset = write_colour_dataset(tmp_path / "colours")
    shard = write_shard(tmp_path / "0-000-2.ckpt", ["a.png", "b.png"], torch.randn(2, 4))
    (tmp_path / "empty").mkdir()
    cases = {
        "no such file": ["--load_model", str(tmp_path / "missing.ckpt"), "--dataset_path", str(dataset)],
        "an embedding shard, not a model": ["--load_model", str(shard), "--dataset_path", str(dataset), "--device", "cpu"],
        "holds no 'dev' table": ["--load_model", str(tiny_checkpoint), "--dataset_path", str(tmp_path / "empty")],
    }
    for expected, flags in cases.items():
        completed = run_evaluate_script(*flags)
        assert completed.returncode == 1, completed.stderr
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], completed.stderr


def test_flags_are_checked_before_torch_loads(tmp_path):
    code = ("import sys\nfrom clipsearch.cli.common import UserError\nfrom clipsearch.cli.evaluate import parse_args\n"
            f"try:\n    parse_args(['--load_model', {str(tmp_path / 'missing.ckpt')!r}])\nexcept UserError:\n    pass\n"
            "print(sorted(name for name in ('torch', 'lightning', 'pandas') if name in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "package")}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert completed.stdout.strip() == "[]", completed.stderr


def test_wrapper_script_passes_flags_through():
    completed = run_evaluate_script("--help")
    assert completed.returncode == 0, completed.stderr
    assert "--load_model" in completed.stdout and "--accelerator" in completed.stdout and "--devices" in completed.stdout


def test_split_embeddings_drop_the_groups_a_distributed_sampler_repeats():
    """Two ranks gathered: image 0 (two captions) came twice as padding; image 2 was skipped (no rows)."""
    from clipsearch.evaluate import split_embeddings

    image_embedding = {0: [1.0, 0.0], 1: [0.0, 1.0], 3: [1.0, 1.0]}
    caption_embedding = {(0, 0): [0.9, 0.1], (0, 1): [0.8, 0.2], (1, 0): [0.1, 0.9], (3, 0): [0.5, 0.5]}
    arrivals = [0, 3, 1, 0]  # rank 0 held images 0 and 3, rank 1 held 1 and the padding copy of 0
    encoded = {
        "image_ids": torch.tensor(arrivals),
        "image_embeddings": torch.tensor([image_embedding[i] for i in arrivals]),
        "caption_image_ids": torch.tensor([i for i in arrivals for _ in range(2 if i == 0 else 1)]),
        "text_embeddings": torch.tensor([caption_embedding[(i, p)] for i in arrivals for p in range(2 if i == 0 else 1)]),
    }
    image_ids, images, texts, caption_rows = split_embeddings(encoded)
    assert image_ids.tolist() == [0, 1, 3]
    assert images.tolist() == [image_embedding[0], image_embedding[1], image_embedding[3]]
    kept = sorted(zip(caption_rows.tolist(), (tuple(round(value, 4) for value in row) for row in texts.tolist())))
    expected = sorted([(0, tuple(caption_embedding[(0, 0)])), (0, tuple(caption_embedding[(0, 1)])),
                       (2, tuple(caption_embedding[(3, 0)])), (1, tuple(caption_embedding[(1, 0)]))])
    assert kept == expected


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 4096])
def test_identical_embeddings_score_perfect_recall_whatever_the_chunk_size(chunk_size):
    """A caption whose embedding is its image's must rank it first in both directions: scores that
    are compared come from one product, so a cosine never meets a differently rounded copy of itself."""
    from clipsearch.metrics import retrieval_metrics

    torch.manual_seed(0)
    images = torch.randn(50, 64)
    caption_image_ids = torch.arange(50).repeat_interleave(2)  # two captions per image
    texts = images[caption_image_ids].clone()
    texts[1::2] += 0.3 * torch.randn(50, 64)  # the second caption of each image is a near miss
    metrics = retrieval_metrics(images, texts, caption_image_ids, chunk_size=chunk_size)
    assert metrics["image_to_text_R@1"] == 100.0
    assert metrics["image_to_text_mean_rank"] == 1.0
    exact = retrieval_metrics(images, images.clone(), torch.arange(50), chunk_size=chunk_size)
    assert exact["image_to_text_R@1"] == exact["text_to_image_R@1"] == 100.0


def test_recall_ranks_equal_a_direct_count_on_random_embeddings():
    """Chunking changes nothing: ranks equal a count over one full score matrix, images without captions left out."""
    from clipsearch.metrics import retrieval_metrics

    torch.manual_seed(1)
    images, texts = torch.randn(30, 16), torch.randn(45, 16)
    caption_image_ids = torch.randint(0, 29, (45,))  # image 29 has no caption
    scores = nn.functional.normalize(texts, dim=-1) @ nn.functional.normalize(images, dim=-1).T  # [M, N]
    text_ranks = (scores > scores.gather(1, caption_image_ids[:, None])).sum(dim=1).float()
    image_ranks = []
    for image in caption_image_ids.unique():
        best_own = scores[caption_image_ids == image, image].max()
        image_ranks.append(float((scores[:, image] > best_own).sum()))
    metrics = retrieval_metrics(images, texts, caption_image_ids, chunk_size=4)
    assert metrics["text_to_image_mean_rank"] == pytest.approx(text_ranks.mean().item() + 1)
    assert metrics["image_to_text_mean_rank"] == pytest.approx(sum(image_ranks) / len(image_ranks) + 1)
    assert metrics["image_to_text_R@5"] == pytest.approx(100 * sum(rank < 5 for rank in image_ranks) / len(image_ranks))
