"""The README's main job through the real numbered scripts: train on the sample data, encode, search."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.data import read_table
from clipsearch.sample_data import ensure_sample_dataset
from clipsearch.search import SearchEngine

REPO = Path(__file__).resolve().parents[1]
# A shortened default run: the same model and data as `bash 1_pretrain_our.sh`, fewer steps.
TRAIN_STEPS = 60


def run_script(script: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(["bash", str(REPO / script), *flags], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}"
    return completed


@pytest.fixture(scope="module")
def trained_search(tmp_path_factory):
    """Train with the default flags (shortened), encode the dev images, return what search needs."""
    work = tmp_path_factory.mktemp("e2e")
    dataset = ensure_sample_dataset(REPO / "dataset" / "sample")
    run_script("1_pretrain_our.sh", f"--models_dir={work / 'models'}", f"--logs_dir={work / 'logs'}",
               f"--max_steps={TRAIN_STEPS}", f"--val_check_interval={TRAIN_STEPS}", "--run_name=e2e")
    checkpoint = work / "models" / "latest" / "best.ckpt"
    run_script("2_inference_encode.sh", f"--load_model={checkpoint}", f"--dataset_path={dataset}", "--split=dev",
               f"--emb_path={work / 'emb'}", "--no_progress")
    return work, dataset, checkpoint


def test_search_script_writes_the_result_grid(trained_search):
    work, dataset, checkpoint = trained_search
    completed = run_script("3_inference_search.sh", f"--load_model={checkpoint}", f"--emb_path={work / 'emb'}",
                           "--query=Hello World", "--top_k=10", f"--out_dir={work / 'out'}")
    grid = work / "out" / "Hello World.png"
    assert grid.is_file() and Image.open(grid).size[0] > 0
    assert str(dataset / "images" / "dev") in completed.stdout


def test_dev_captions_find_their_images(trained_search):
    """Most dev captions rank their own image in the top 5 of the 300 dev images (chance: 1.7%)."""
    work, dataset, checkpoint = trained_search
    engine = SearchEngine.from_files(checkpoint, work / "emb")
    table = read_table(dataset, "dev")
    results = engine.search_text(table.caption.tolist(), top_k=5)
    found = sum(row.image in {hit.path for hit in hits} for row, hits in zip(table.itertuples(), results))
    assert found / len(table) > 0.5, f"only {found} of {len(table)} dev captions found their image in the top 5"


def test_image_query_returns_itself_first(trained_search):
    work, dataset, checkpoint = trained_search
    engine = SearchEngine.from_files(checkpoint, work / "emb")
    paths = sorted(set(read_table(dataset, "dev").image))[:20]
    results = engine.search_image([Image.open(path) for path in paths], top_k=1)
    assert [hits[0].path for hits in results] == paths


def test_evaluate_script_scores_the_trained_checkpoint(trained_search):
    """4_evaluate.sh takes --accelerator/--devices like the other scripts and agrees with the search test above."""
    work, dataset, checkpoint = trained_search
    out = work / "eval.json"
    run_script("4_evaluate.sh", f"--load_model={checkpoint}", f"--dataset_path={dataset}", "--split=dev",
               "--accelerator=cpu", "--devices=1", f"--out={out}")
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["text_to_image_R@5"] > 50, metrics
