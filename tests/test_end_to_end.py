"""From nothing, as a newcomer starts: every numbered script with its defaults, in a fresh copy of the
repository, typed from another folder.

The copy holds what a clone would (tracked files and new files git does not ignore; no sample
data, no models/latest, no caches), so state left by other tests or by the developer can never
hide a failure. Flags shorten a default only where it would take minutes. The tests run in order
and share the copy, as the README's first command does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.search import SearchEngine

REPO = Path(__file__).resolve().parents[1]
# The fewest steps a run needs to become models/latest (shorter ones are smoke runs).
TRAIN_STEPS = 50
TRAIN = ("1_pretrain_our.sh", f"--max_steps={TRAIN_STEPS}", f"--val_check_interval={TRAIN_STEPS}")


def fresh_copy(target: Path) -> Path:
    """The working tree as `git clone` of it, once committed, would give: ignored files left out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(REPO / ".venv")  # the installed environment, reused
    return target


class Newcomer:
    """A fresh copy of the repository and a folder of the user's own to type commands in."""

    def __init__(self, root: Path):
        self.clone = fresh_copy(root / "clipsearch")
        self.home = root / "home"
        self.home.mkdir()
        self.env = {key: value for key, value in os.environ.items() if key != "CLIPSEARCH_HOME"}
        # The copy's own code, not the checkout the shared .venv was installed from.
        self.env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(self.clone / "package"))

    def command(self, script: str, *flags: str) -> list[str]:
        door = ["bash", str(self.clone / script)] if script.endswith(".sh") else [str(self.clone / script)]
        return [*door, *flags]

    def run(self, script: str, *flags: str, returncode: int = 0) -> subprocess.CompletedProcess:
        completed = subprocess.run(self.command(script, *flags), cwd=self.home, env=self.env,
                                   capture_output=True, text=True, timeout=900)
        assert completed.returncode == returncode, (
            f"{script} {' '.join(flags)} exited {completed.returncode}:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}"
        )
        return completed


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory) -> Newcomer:
    return Newcomer(tmp_path_factory.mktemp("newcomer"))


def test_install_finds_the_environment_ready(newcomer):
    completed = newcomer.run("0_install.sh")
    assert "nothing to do" in completed.stdout
    assert not (newcomer.clone / "dataset" / "sample" / "train.tsv").exists()


def test_other_doors_start_from_nothing(newcomer):
    """A from-scratch door generates the sample data on first use; finetuning without OpenAI's file
    says in one line which file to get and where."""
    completed = newcomer.run("1_pretrain_openai.sh", "--fast_dev_run=1", "--batch_size=8")
    assert (newcomer.clone / "dataset" / "sample" / "train.tsv").is_file(), completed.stderr[-2000:]
    assert not (newcomer.clone / "models" / "latest").exists()
    missing = newcomer.run("1_finetune_openai.sh", "--fast_dev_run=1", returncode=1)
    assert missing.stderr.count("\n") == 1 and "models/openai/ViT-B-32.pt" in missing.stderr, missing.stderr


def test_a_training_stopped_by_ctrl_c_runs_again(newcomer):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-training exits at once;
    the same command then runs (test_the_first_command below)."""
    # A terminal's shell starts commands with SIGINT at its default; a suite itself started as a
    # background job (`cmd &` in a script) would hand down "ignored" instead.
    process = subprocess.Popen(newcomer.command(*TRAIN), cwd=newcomer.home, env=newcomer.env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    models = newcomer.clone / "models"
    deadline = time.monotonic() + 300
    while not any(models.glob("*/run.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # into the first steps
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-4000:]


def test_the_first_command_trains_encodes_and_searches(newcomer):
    newcomer.run(*TRAIN)
    latest = newcomer.clone / "models" / "latest" / "best.ckpt"
    assert latest.is_file()
    newcomer.run("2_inference_encode.sh", "--no_progress")
    manifest = json.loads((newcomer.clone / "dataset" / "sample" / "emb" / "manifest.json").read_text())
    assert manifest["counts"]["encoded"] == 4300
    completed = newcomer.run("3_inference_search.sh", "--query", "a red circle")
    grid = newcomer.clone / "outputs" / "search" / "a red circle.png"
    assert grid.is_file() and Image.open(grid).size[0] > 0
    assert str(newcomer.clone / "dataset" / "sample" / "images") in completed.stdout


def test_evaluate_with_its_defaults_scores_the_trained_model(newcomer):
    completed = newcomer.run("4_evaluate.sh")
    written = Path(completed.stdout.strip().splitlines()[-1].removeprefix("written to "))
    metrics = json.loads(written.read_text())["metrics"]
    assert metrics["text_to_image_R@5"] > 50, metrics  # chance: 1.7% of 300 dev images


def test_querybank_and_index_with_their_defaults(newcomer):
    newcomer.run("clipsearch", "querybank", "--size", "500")  # of 4000 captions: the default takes a minute
    newcomer.run("clipsearch", "index")
    emb = newcomer.clone / "dataset" / "sample" / "emb"
    assert (emb / "querybank.pt").is_file() and (emb / "index.json").is_file()
    completed = newcomer.run("3_inference_search.sh", "--querybank", "--query", "a red circle", "--no_grid", "--json")
    assert len(json.loads(completed.stdout.splitlines()[0])["results"]) > 0


def test_my_photos_from_my_own_folder(newcomer):
    """Relative paths are the user's folder's; the embeddings go to dataset/<name>/emb in the
    repository, not into the photos; search given --emb_path alone uses the model that encoded it."""
    photos = newcomer.home / "photos"
    photos.mkdir()
    for index in range(6):
        Image.new("RGB", (64, 48), ((index * 67) % 256, (index * 131) % 256, (index * 29) % 256)).save(photos / f"{index}.png")
    before = sorted(path.name for path in photos.iterdir())
    newcomer.run("2_inference_encode.sh", "--dataset_path", "photos", "--no_progress")
    assert sorted(path.name for path in photos.iterdir()) == before
    emb = newcomer.clone / "dataset" / "photos" / "emb"
    assert json.loads((emb / "manifest.json").read_text())["counts"]["encoded"] == 6
    completed = newcomer.run("3_inference_search.sh", "--emb_path", str(emb), "--image", "photos/3.png",
                             "--top_k", "1", "--json", "--no_grid")
    assert json.loads(completed.stdout)["results"][0]["path"] == str(photos / "3.png")
    assert f"model: {(newcomer.clone / 'models' / 'latest' / 'best.ckpt').resolve()}" in completed.stderr


def test_image_query_returns_itself_first(newcomer):
    emb = newcomer.clone / "dataset" / "sample" / "emb"
    engine = SearchEngine.from_files(newcomer.clone / "models" / "latest" / "best.ckpt", emb)
    paths = sorted((newcomer.clone / "dataset" / "sample" / "images" / "dev").glob("*.png"))[:20]
    results = engine.search_image([Image.open(path) for path in paths], top_k=1)
    assert [hits[0].path for hits in results] == [str(path) for path in paths]
