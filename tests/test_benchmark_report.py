"""Benchmark results: tracked files rewritten only with --report, BENCHMARKS.md section by section, in order."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_common():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sections_replace_themselves_and_quality_sections_stay_last(tmp_path):
    common = load_common()
    report = tmp_path / "BENCHMARKS.md"
    common.update_report_section("quality", "## Quality (Flickr8k)\nours v1", report)
    common.update_report_section("search", "## Search\nv1", report)
    common.update_report_section("quality_open_clip", "## Quality against open_clip\npeer", report)
    common.update_report_section("encode", "## Encoding\nv1", report)
    common.update_report_section("search", "## Search\nv2", report)
    common.update_report_section("quality", "## Quality (Flickr8k)\nours v2", report)
    text = report.read_text()
    order = [text.index(f"<!-- bench:{name} -->") for name in ("search", "encode", "quality", "quality_open_clip")]
    assert order == sorted(order)
    assert "Search\nv1" not in text and "ours v1" not in text and text.count("<!-- bench:search -->") == 1
    assert "ours v2" in text and "peer" in text
    # Every section is closed, and nothing sits inside another.
    for name in ("search", "encode", "quality", "quality_open_clip"):
        inside = text.split(f"<!-- bench:{name} -->", 1)[1].split(f"<!-- /bench:{name} -->", 1)[0]
        assert "<!-- bench:" not in inside


def test_a_run_rewrites_tracked_results_only_with_report(tmp_path, monkeypatch):
    common = load_common()
    results_dir, scratch_dir, report = tmp_path / "results", tmp_path / "scratch", tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(common, "RESULTS_DIR", results_dir)
    monkeypatch.setattr(common, "SCRATCH_DIR", scratch_dir)
    monkeypatch.setattr(common, "REPORT_FILE", report)
    parser = argparse.ArgumentParser()
    common.add_report_flags(parser)

    for flags in ([], ["--no_report"]):
        path = common.publish("search", {"ms": 1.0}, "## Search\ntrial", parser.parse_args(flags).report)
        assert path == scratch_dir / "search.json" and json.loads(path.read_text()) == {"ms": 1.0}
    assert not results_dir.exists() and not report.exists()

    path = common.publish("search", {"ms": 2.0}, "## Search\nreported", parser.parse_args(["--report"]).report)
    assert path == results_dir / "search.json" and json.loads(path.read_text()) == {"ms": 2.0}
    assert "## Search\nreported" in report.read_text()


def test_every_benchmark_has_the_report_flags_and_no_developer_paths():
    """A benchmark publishes only when asked, through common.py, and its defaults work on any checkout."""
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    assert {"bench_encode.py", "bench_search.py", "profile_search.py"} <= {script.name for script in scripts}
    for script in scripts:
        source = script.read_text()
        for prefix in ("/work/", "/home/", "/Users/"):
            assert f'"{prefix}' not in source, f"{script.name}: a default under {prefix} that only one machine has"
        if script.name == "common.py":
            continue
        # Flags and tracked files go through common.py alone, so --report means the same everywhere.
        assert '"--no_report"' not in source and '"--report"' not in source, f"{script.name}: its own report flag"
        assert "update_report_section(" not in source, f"{script.name}: rewrites BENCHMARKS.md without publish()"
        if "publish(" in source or "write_results(" in source:
            assert "add_report_flags(" in source, f"{script.name}: writes results but has no --report/--no_report"
        else:
            # profile_search.py prints its table and writes nothing: nothing to guard.
            assert "write_text(" not in source and "json.dump(" not in source, f"{script.name}: writes results itself"
    for script in (REPO / "benchmarks").glob("bench_*.py"):
        assert "add_report_flags(" in script.read_text(), f"{script.name}: no --report/--no_report"


def test_markdown_tables_align_names_left_and_figures_right():
    common = load_common()
    lines = common.markdown_table(["model", "img/s"], [["our", "1.5"], ["vit", 2]], "lr")
    assert lines == ["| model | img/s |", "|---|---:|", "| our | 1.5 |", "| vit | 2 |"]
    section = common.report_section("Search", {
        "command": "python benchmarks/bench_search.py", "date": "today", "load_average_start": [1, 1, 1],
        "load_average_end": [2, 2, 2], "findings": ["- met"],
        "machine": {"nproc": 2, "cpu_model": "cpu", "torch": "2", "torch_threads": 2},
    }, ["", *lines])
    assert section.startswith("## Search\n\nCommand: `python benchmarks/bench_search.py`\n\n- Machine: 2 CPUs")
    assert section.endswith("| vit | 2 |\n\n- met\n")


def test_the_open_clip_peer_extends_only_runs_made_under_the_same_settings(tmp_path, monkeypatch):
    """Its rates take an hour each, so --extend adds rates later; mixing budgets in one table is refused."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_quality_open_clip as peer
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    first = peer.parse_args(["--minutes", "49", "--lrs", "1e-4", "--dataset_path", "data", "--report"])
    metrics = {f"{direction}_{name}": 10.0 for direction in ("text_to_image", "image_to_text")
               for name in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")} | {"mean_recall": 30.0}
    run = {"lr": 1e-4, "wall_minutes": 49.0, "peak_rss_mib": 1.0, "samples_per_sec": 12.0, "final": {"metrics": metrics}}
    common.write_results("quality_open_clip", {
        "command": "python benchmarks/bench_quality_open_clip.py --lrs 1e-4", "date": "today",
        "machine": {"nproc": 2, "cpu_model": "cpu", "torch": "2", "torch_threads": 2},
        "load_average_start": [1, 1, 1], "load_average_end": [1, 1, 1],
        "settings": {key: str(value) for key, value in vars(first).items()},
        "image_normalisation": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "calibrated_samples_per_sec": 12.4, "pairs": 36352, "runs": [run], **run,
    }, tmp_path)

    other_budget = peer.parse_args(["--minutes", "50", "--lrs", "3e-4", "--dataset_path", "data", "--extend", "--report"])
    try:
        peer.recorded_results(other_budget, None)
        raise AssertionError("a run at another budget was accepted")
    except SystemExit as refusal:
        assert "--minutes 50.0 (recorded 49.0)" in str(refusal)

    same = peer.parse_args(["--minutes", "49", "--lrs", "3e-4", "--dataset_path", "data", "--extend", "--report"])
    results = peer.recorded_results(same, ["--lrs", "3e-4", "--extend"])
    assert results["pairs"] == 36352 and [run["lr"] for run in results["runs"]] == [1e-4]
    assert results["extended_by"] == ["python benchmarks/bench_quality_open_clip.py --lrs 3e-4 --extend"]
    later = {**run, "lr": 3e-4, "started_at": "later", "load_average": {"start": [2, 2, 2], "end": [1, 1, 1]}}
    results["runs"].append(later)
    section = peer.report_markdown(results)
    assert "Then, at its calibration: `python benchmarks/bench_quality_open_clip.py --lrs 3e-4 --extend`" in section
    assert "lr 0.0003 later, 2 / 1" in section and "| open_clip_train.main, lr 0.0003 |" in section


def test_the_quality_baseline_comes_from_its_logs_or_else_from_the_last_report(tmp_path, monkeypatch):
    """A fresh machine has no logs of the run the last report was made from; its recorded curves stand in."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_quality
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    curves = {"text_to_image_R@1": [[21.6, 274, 19.7], [59.5, 1099, 29.0]]}
    (tmp_path / "quality.json").write_text(json.dumps({"run_name": "earlier", "curves": curves}))
    assert bench_quality.baseline_curves(tmp_path / "models", tmp_path / "logs", "earlier", None) == curves
    with pytest.raises(SystemExit, match="records 'earlier', not this run"):
        bench_quality.baseline_curves(tmp_path / "models", tmp_path / "logs", "other", None)
