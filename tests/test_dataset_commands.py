"""The dataset commands: sample_data never regenerates a dataset that has embeddings; resize_dataset's errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipsearch.cli.common import UserError
from clipsearch.cli.resize_dataset import main as resize_main
from clipsearch.cli.sample_data import main as sample_main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--num_train", "3", "--num_dev", "2", "--image_size", "24"]


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_dataset_with_embeddings_is_not_regenerated_in_place(tmp_path, capsys):
    root = tmp_path / "sample"
    arguments = ["--path", str(root), *SMALL]
    sample_main(arguments)
    (root / "emb").mkdir()
    (root / "emb" / "0-000-64.ckpt").write_bytes(b"shard")
    before = file_bytes(root)

    sample_main(arguments)  # the same settings: nothing to regenerate, so it is allowed
    with pytest.raises(UserError, match=r"emb.*stale.*--path"):
        sample_main(["--path", str(root), "--num_train", "5", "--num_dev", "2", "--image_size", "24"])
    with pytest.raises(UserError, match="stale"):
        sample_main([*arguments, "--force"])
    assert file_bytes(root) == before

    elsewhere = tmp_path / "sample-5"
    sample_main(["--out", str(elsewhere), "--num_train", "5", "--num_dev", "2", "--image_size", "24"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(elsewhere)
    assert len(list((elsewhere / "images" / "train").iterdir())) == 5


def test_the_refusal_is_one_line_and_exits_1(tmp_path):
    root = tmp_path / "sample"
    (root / "emb").mkdir(parents=True)
    (root / "emb" / "manifest.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(REPO / "package")}
    # Both doors, the command's module and python -m clipsearch <command>, reach the same command.
    for door in (["clipsearch.cli.sample_data"], ["clipsearch", "sample_data"]):
        completed = subprocess.run([sys.executable, "-m", *door, "--path", str(root), *SMALL],
                                   capture_output=True, text=True, env=env, timeout=60)
        assert completed.returncode == 1, completed.stderr
        assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1, completed.stderr
    assert not (root / "images").exists()


def test_sample_data_rejects_bad_sizes_before_writing(tmp_path):
    with pytest.raises(SystemExit):
        sample_main(["--path", str(tmp_path / "small"), "--image_size", "8"])
    with pytest.raises(SystemExit):
        sample_main(["--path", str(tmp_path / "small"), "--num_train", "0"])
    assert not (tmp_path / "small").exists()


def test_resize_dataset_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resize_main(["--dataset_path", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="its own folder"):
        resize_main(["--dataset_path", str(tmp_path), "--out", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no train/dev/test tables in"):
        resize_main(["--dataset_path", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])


def test_resize_dataset_writes_smaller_copies(tmp_path):
    sample_main(["--path", str(tmp_path / "sample"), "--num_train", "3", "--num_dev", "2", "--image_size", "64"])
    resize_main(["--dataset_path", str(tmp_path / "sample"), "--out", str(tmp_path / "small"), "--size", "32",
                 "--workers", "1"])
    from PIL import Image

    from clipsearch.data import read_table

    table = read_table(tmp_path / "small", "train")
    assert len(set(table.image)) == 3
    assert all(Image.open(path).size == (32, 32) for path in set(table.image))
