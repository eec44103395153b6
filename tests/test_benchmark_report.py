"""BENCHMARKS.md is rewritten section by section; sections must land in order and replace themselves."""
from __future__ import annotations

import importlib.util
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
