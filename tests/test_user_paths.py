"""What a user types: tables with their own column names, paths from their own folder, the default
embedding folder and the model a folder records. Checked before torch loads, in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.cli.common import DEFAULT_MODEL, model_for
from clipsearch.cli.pretrain_our import parse_args as parse_our
from clipsearch.defaults import project_relative
from clipsearch.tables import read_table

PACKAGE = Path(__file__).resolve().parents[1] / "package"
# A child in which `import torch` fails: these answers must come before any model loads.
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from clipsearch.__main__ import main; main(sys.argv[1:])"


def run_without_torch(*argv: str, home: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CLIPSEARCH_HOME"}
    env.update(PYTHONPATH=str(PACKAGE), HF_HUB_OFFLINE="1")
    if home is not None:
        env["CLIPSEARCH_HOME"] = str(home)
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def assert_one_line_error(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode == 1, completed
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
    for fragment in fragments:
        assert fragment in lines[0], completed.stderr


@pytest.fixture
def titled_dataset(tmp_path) -> Path:
    """A dataset whose tables name their columns as open_clip's CSVs often do: filepath, title."""
    dataset = tmp_path / "titled"
    (dataset / "images").mkdir(parents=True)
    rows = ["filepath\ttitle"]
    for index in range(4):
        Image.new("RGB", (32, 32), (index * 60, 0, 0)).save(dataset / "images" / f"{index}.png")
        rows.append(f"images/{index}.png\ta picture number {index}")
    for split in ("train", "dev"):
        (dataset / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return dataset


@pytest.mark.parametrize("command, needs_caption", [
    (["pretrain_our"], True), (["pretrain_openai"], True), (["finetune_openai"], True),
    (["evaluate"], True), (["encode"], False),
])
def test_other_column_names_are_one_line_naming_what_the_table_has(command, needs_caption, titled_dataset, tmp_path):
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"not read: the table is checked first or the file only for existence")
    model_flags = ["--load_model", str(model)] if command[0] in ("evaluate", "encode") else []
    completed = run_without_torch(*command, "--dataset_path", str(titled_dataset), *model_flags)
    assert_one_line_error(completed, "its columns are filepath, title", "--image_column")
    assert ("--caption_column" in completed.stderr) == needs_caption


def test_named_columns_are_read_and_leave_default_runs_as_they_were(titled_dataset):
    table = read_table(titled_dataset, "train", image_column="filepath", caption_column="title")
    assert list(table.caption) == [f"a picture number {index}" for index in range(4)]
    assert table.image[0] == str(titled_dataset / "images" / "0.png")
    named = parse_our(["--dataset_path", str(titled_dataset), "--image_column", "filepath", "--caption_column", "title"])
    assert (named.image_column, named.caption_column) == ("filepath", "title")
    assert named.identity["image_column"] == "filepath"
    # Runs made before the flags existed keep their identity, so they still resume.
    assert "image_column" not in parse_our([]).identity and "caption_column" not in parse_our([]).identity


def test_the_default_embedding_folder_is_the_projects_and_never_mixes_two_folders(tmp_path):
    project, photos = tmp_path / "project", tmp_path / "mine" / "photos"
    project.mkdir()
    photos.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(photos / "a.png")
    taken = project / "dataset" / "photos" / "emb"
    taken.mkdir(parents=True)
    (taken / "model.json").write_text(json.dumps({"dataset_path": str(tmp_path / "other" / "photos")}))
    model = project / "model.ckpt"
    model.write_bytes(b"only its existence is checked here")
    completed = run_without_torch("encode", "--dataset_path", "photos", "--load_model", str(model), home=project,
                                  cwd=photos.parent)
    assert_one_line_error(completed, f"holds the embeddings of {tmp_path / 'other' / 'photos'}", "--emb_path")
    assert sorted(path.name for path in photos.iterdir()) == ["a.png"]  # nothing written into the user's folder


def test_search_takes_the_model_the_folder_records(tmp_path, capsys):
    emb = tmp_path / "emb"
    emb.mkdir()
    assert model_for(emb, None) == DEFAULT_MODEL  # nothing recorded
    (emb / "model.json").write_text(json.dumps({"load_model": "/models/run/best.ckpt"}))
    assert model_for(emb, None) == "/models/run/best.ckpt"
    assert "model: /models/run/best.ckpt, which encoded" in capsys.readouterr().err
    assert model_for(emb, "open_clip:ViT-B-32/openai") == "open_clip:ViT-B-32/openai"  # a flag wins


def test_a_run_names_its_data_the_same_from_any_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "dataset" / "pets").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("CLIPSEARCH_HOME", str(project))
    monkeypatch.chdir(project)
    assert project_relative("dataset/pets") == "dataset/pets"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert project_relative("../project/dataset/pets") == "dataset/pets"
    assert project_relative("../other/pets") == str(tmp_path / "other" / "pets")
    assert project_relative("s3://bucket/shards/{0..9}.tar") == "s3://bucket/shards/{0..9}.tar"
