"""The search command as a user meets it: help, one-line errors before the model loads, JSON, history."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clipsearch.cli.common import DEFAULT_TOP_K
from clipsearch.cli.search import enable_line_editing, main, parse_args

PACKAGE = Path(__file__).resolve().parents[1] / "package"
# Run in a child where `import torch` fails: an answer that needs no model must not load it.
WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; "
    "from clipsearch.cli.common import run_command; from clipsearch.cli.search import main; "
    "run_command(main, sys.argv[1:])"
)


def run_search(*argv: str, block_torch: bool = False) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(PACKAGE), "HF_HUB_OFFLINE": "1"}
    command = ["-c", WITHOUT_TORCH] if block_torch else ["-m", "clipsearch.cli.search"]
    return subprocess.run(
        [sys.executable, *command, *argv], capture_output=True, text=True, env=environment, timeout=120
    )


def assert_one_line_error(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode == 1, completed
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
    for fragment in fragments:
        assert fragment in lines[0], completed.stderr


@pytest.fixture(scope="module")
def colour_emb(tmp_path_factory, tiny_checkpoint, colour_images):
    from clipsearch.cli.encode import main as encode_main

    emb_path = tmp_path_factory.mktemp("cli_emb")
    encode_main(
        ["--load_model", str(tiny_checkpoint), "--dataset_path", str(colour_images[0]), "--emb_path", str(emb_path)]
        + ["--num_workers", "0", "--no_progress"]
    )
    return emb_path


def test_help_shows_every_default_and_the_flags_accept_dashes():
    completed = run_search("--help", block_torch=True)
    assert completed.returncode == 0
    text = " ".join(completed.stdout.split())  # help wraps long lines
    for default in (f"(default: {DEFAULT_TOP_K})", "(default: 8000)", "model.json records, else models/latest/best.ckpt)"):
        assert default in text
    assert parse_args(["--top-k", "7", "--no-grid"]).top_k == 7
    assert parse_args([]).top_k == DEFAULT_TOP_K


def test_typo_gets_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--top_kk", "3"])
    assert exit_info.value.code == 2
    assert "did you mean --top_k?" in capsys.readouterr().err


def test_missing_image_fails_at_once_without_loading_the_model(tiny_checkpoint, colour_emb):
    completed = run_search(
        "--load_model", str(tiny_checkpoint), "--emb_path", str(colour_emb), "--image", "missing.jpg", block_torch=True
    )
    assert_one_line_error(completed, "--image missing.jpg")


def test_missing_paths_are_named_before_the_model_loads(tiny_checkpoint, colour_emb, tmp_path):
    assert_one_line_error(
        run_search("--load_model", str(tmp_path / "none.ckpt"), "--emb_path", str(colour_emb), block_torch=True),
        "--load_model",
    )
    assert_one_line_error(
        run_search("--load_model", str(tiny_checkpoint), "--emb_path", str(tmp_path / "no_emb"), block_torch=True),
        "--emb_path",
    )


def test_serve_on_a_port_in_use_fails_before_the_model_loads(tiny_checkpoint, colour_emb):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = str(holder.getsockname()[1])
        completed = run_search(
            "--load_model", str(tiny_checkpoint), "--emb_path", str(colour_emb), "--serve", "--port", port,
            block_torch=True,
        )
    finally:
        holder.close()
    assert_one_line_error(completed, f"port {port}", "in use")


def test_unreadable_image_is_reported_and_exits_non_zero(tiny_checkpoint, colour_emb, tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("just text")
    argv = ["--load_model", str(tiny_checkpoint), "--emb_path", str(colour_emb), "--no_grid", "--top_k", "2"]
    from clipsearch.cli.common import UserError

    with pytest.raises(UserError, match="1 of 2 queries could not be answered"):
        main([*argv, "--query", "red", "--image", str(not_an_image)])
    captured = capsys.readouterr()
    assert "2 results for 'red'" in captured.out  # the other queries were still answered
    assert "cannot search by" in captured.err and "not an image" in captured.err


def test_json_lines_and_no_grid(tiny_checkpoint, colour_emb, colour_images, tmp_path, capsys):
    out_dir = tmp_path / "grids"
    argv = ["--load_model", str(tiny_checkpoint), "--emb_path", str(colour_emb), "--out_dir", str(out_dir)]
    main([*argv, "--json", "--no_grid", "--top-k", "3", "--query", "red square", "--image", str(colour_images[1][5])])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [answer["query"]["kind"] for answer in answers] == ["text", "image"]
    assert answers[0]["query"]["text"] == "red square"
    assert all(len(answer["results"]) == 3 and answer["grid"] is None for answer in answers)
    assert answers[1]["results"][0]["path"] == str(colour_images[1][5])
    assert not out_dir.exists()

    main([*argv, "--json", "--top_k", "2", "--query", "two words"])
    grid = json.loads(capsys.readouterr().out)["grid"]
    assert grid == str(out_dir / "two words.png") and Path(grid).is_file()  # the name keeps its space


def test_interactive_history_is_saved_and_read_back(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readline.clear_history()
    save_history = enable_line_editing()
    readline.add_history("a red circle")
    save_history()
    assert (tmp_path / "clipsearch" / "search_history").read_text().splitlines()[-1] == "a red circle"
    readline.clear_history()
    enable_line_editing()
    assert readline.get_history_item(readline.get_current_history_length()) == "a red circle"
    readline.clear_history()


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_a_corrupt_shard_is_one_line_naming_the_file(tmp_path, tiny_checkpoint, colour_emb, damage):
    import shutil

    emb_path = tmp_path / "emb"
    shutil.copytree(colour_emb, emb_path)
    shard = sorted(emb_path.glob("*.ckpt"))[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        import pickle

        shard.write_bytes(pickle.dumps({"path": ["a.png"], "emb": os.system}))
    completed = run_search("--load_model", str(tiny_checkpoint), "--emb_path", str(emb_path), "--query", "x")
    assert_one_line_error(completed, shard.name)


def test_served_roots_come_from_the_encoding_records(tmp_path):
    from clipsearch.cli.search import collection_roots
    from clipsearch.encoding.writer import write_json

    emb_path = tmp_path / "data" / "emb"
    emb_path.mkdir(parents=True)
    serve = ["--serve", "--emb_path", str(emb_path)]
    # No record names the dataset: the default layout <dataset>/emb is assumed.
    assert collection_roots(parse_args(serve)) == [str((tmp_path / "data").resolve())]
    write_json(emb_path / "manifest.json", {"dataset_path": "/srv/photos"})
    assert collection_roots(parse_args([*serve, "--serve_root", "/mnt/more"])) == ["/mnt/more", "/srv/photos"]
    assert collection_roots(parse_args([*serve, "--serve_any_path"])) is None
    with pytest.raises(SystemExit):
        parse_args(["--serve_any_path"])  # only with --serve


@pytest.mark.parametrize("argv, fragment", [
    (["--query", "a dog", "--add", "1x:beach"], "weight '1x' is not a number"),
    (["--query", "a dog", "--subtract", "0:grass"], "other than 0"),
    (["--query", "a dog", "--where", "taken"], "expected FIELD OP VALUE"),
    (["--query", "a dog", "--where", "taken>="], "no value after"),
])
def test_bad_terms_and_filters_are_one_line_before_the_model_loads(tiny_checkpoint, colour_emb, argv, fragment):
    completed = run_search("--load_model", str(tiny_checkpoint), "--emb_path", str(colour_emb), *argv, block_torch=True)
    assert_one_line_error(completed, fragment)


def test_a_term_needs_a_query_to_follow(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--add", "beach", "--query", "a dog"])
    assert "put it after the --query or --image it belongs to" in capsys.readouterr().err


def test_terms_join_the_query_they_follow_and_filters_and_offset_apply(tiny_checkpoint, colour_emb, colour_images, capsys):
    from clipsearch.query_terms import IMAGE, TEXT, Term
    from clipsearch.search import SearchEngine

    image = str(colour_images[1][4])
    argv = ["--load_model", str(tiny_checkpoint), "--emb_path", str(colour_emb), "--json", "--no_grid", "--top_k", "3"]
    main([*argv, "--query", "red", "--add", image, "--query", "green", "--subtract", "2:blue", "--image", image])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [answer["query"]["kind"] for answer in answers] == ["combined", "combined", "image"]
    assert answers[0]["query"]["terms"] == [{"kind": "text", "weight": 1.0, "text": "red"},
                                            {"kind": "image", "weight": 1.0, "path": image}]
    assert answers[1]["query"]["terms"][1] == {"kind": "text", "weight": -2.0, "text": "blue"}
    engine = SearchEngine.from_files(tiny_checkpoint, colour_emb)
    from PIL import Image

    expected = engine.search([Term(TEXT, "red"), Term(IMAGE, Image.open(image).convert("RGB"))], 3)
    assert [result["id"] for result in answers[0]["results"]] == [hit.id for hit in expected]
    assert "size" in answers[0]["results"][0]["fields"] and "width" in answers[0]["results"][0]["fields"]

    main([*argv, "--query", "red", "--where", "path~*/group1/*", "--top_k", "12"])
    filtered = json.loads(capsys.readouterr().out)
    assert filtered["where"] == ["path~*/group1/*"] and len(filtered["results"]) == 4
    assert all("/group1/" in result["path"] for result in filtered["results"])
    main([*argv, "--query", "red", "--where", "path~*/group1/*", "--offset", "2"])
    page = json.loads(capsys.readouterr().out)
    assert [result["id"] for result in page["results"]] == [result["id"] for result in filtered["results"][2:]]
    assert [result["rank"] for result in page["results"]] == [3, 4]

    from clipsearch.cli.common import UserError

    with pytest.raises(UserError, match="no field 'colour'"):
        main([*argv, "--query", "red", "--where", "colour=red"])
