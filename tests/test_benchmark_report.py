"""Benchmark results: tracked files rewritten only with --report, BENCHMARKS.md section by section, in order."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

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
    """A benchmark publishes only when asked, and its defaults work on any checkout."""
    for script in sorted((REPO / "benchmarks").glob("bench_*.py")):
        source = script.read_text()
        assert "add_report_flags(" in source, f"{script.name}: no --report/--no_report (common.add_report_flags)"
        for prefix in ("/work/", "/home/", "/Users/"):
            assert f'"{prefix}' not in source, f"{script.name}: a default under {prefix} that only one machine has"
