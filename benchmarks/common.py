"""What the benchmark scripts share: machine description, interleaved timing, and where results go."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
# Tracked: rewritten only when a run is asked to (--report), so a trial run leaves the tree clean.
RESULTS_DIR = BENCHMARKS_DIR / "results"
SCRATCH_DIR = Path(tempfile.gettempdir()) / "clipsearch-bench"
REPORT_FILE = BENCHMARKS_DIR.parent / "BENCHMARKS.md"
QUALITY_HEADING = "## Quality (Flickr8k)"
QUALITY_MARKER = "<!-- bench:quality -->"
REPORT_HEADER = """# Benchmarks

Measured on shared machines; every section says which machine, how many threads, and the load
average at the start and end of its run (other processes competing for the cores show up there).
Each section is rewritten by its script when run with `--report`; see benchmarks/README.md.
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Where a run timed the GPU (bench_encode.py --accelerator gpu), which GPUs the machine had.
        **({"gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]}
           if torch.cuda.is_available() else {}),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_header() -> dict:
    """The first fields of every result: when, on what machine, under what load."""
    return {"date": now_iso(), "machine": machine_info(), "load_average_start": load_average()}


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, for the report."""
    flags = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"benchmarks/{script}", *flags])  # quoted: a --note with spaces pastes back whole


def timed(function: Callable[[], object]) -> float:
    """Milliseconds one call of `function` takes."""
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def interleaved_ms(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int,
                   settle_s: float = 0.0) -> dict[str, list[float]]:
    """Times of each contender, taken in rotating order so a burst of outside load hits all of them alike.

    `settle_s` pauses before each timed call, untimed: a library's worker threads keep spinning for
    a while after a call (numpy's OpenBLAS for about 0.1 s), and would otherwise slow the next
    contender if it runs on another thread pool (torch's, faiss's).
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            if settle_s:
                time.sleep(settle_s)
            times[name].append(timed(contenders[name]))
    return times


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """--report / --no_report: whether this run rewrites the tracked results."""
    group = parser.add_argument_group("report").add_mutually_exclusive_group()
    group.add_argument("--report", action="store_true",
                       help="rewrite benchmarks/results/<name>.json and this benchmark's section of BENCHMARKS.md")
    group.add_argument("--no_report", action="store_true",
                       help=f"the default: write the JSON to {SCRATCH_DIR} and leave the tracked files alone")


def work_dir(name: str) -> Path:
    """The default scratch folder of one benchmark's inputs and outputs (links, checkpoints, shards)."""
    return SCRATCH_DIR / f"{name}-work"


def results_dir(report: bool) -> Path:
    return RESULTS_DIR if report else SCRATCH_DIR


def write_results(name: str, results: dict, directory: Path | None = None) -> Path:
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def publish(name: str, results: dict, markdown: str, report: bool) -> Path:
    """Write the results, and with `report` their section of BENCHMARKS.md; returns the JSON's path."""
    path = write_results(name, results, results_dir(report))
    if report:
        update_report_section(name, markdown, REPORT_FILE)
        print(f"wrote {path} and the {name!r} section of {REPORT_FILE.name}")
    else:
        print(f"wrote {path} (tracked results unchanged; --report rewrites them)")
    return path


def machine_lines(results: dict) -> str:
    machine = results["machine"]
    gpus = f", GPUs: {', '.join(machine['gpus'])}" if machine.get("gpus") else ""
    return (
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu_model']}){gpus}, torch {machine['torch']}, "
        f"{machine['torch_threads']} torch threads\n"
        f"- Date: {results['date']}; load average (1/5/15 min) at start {results['load_average_start']}, "
        f"at end {results['load_average_end']}\n"
    )


def report_section(title: str, results: dict, body: list[str]) -> str:
    """One BENCHMARKS.md section: heading, the command that reproduces it, machine and load, `body`, findings."""
    lines = [f"## {title}", "", f"Command: `{results['command']}`", "", machine_lines(results).rstrip(), *body]
    if results.get("findings"):
        lines += ["", *results["findings"]]
    return "\n".join(lines) + "\n"


def markdown_table(columns: list[str], rows: list[list], align: str) -> list[str]:
    """A Markdown table's lines; `align` has one letter per column: l (names, left) or r (figures, right)."""
    rule = "|".join("---:" if letter == "r" else "---" for letter in align)
    return [f"| {' | '.join(columns)} |", f"|{rule}|", *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows)]


def update_report_section(name: str, markdown: str, report_file: Path = REPORT_FILE) -> None:
    """Replace this benchmark's marked section of BENCHMARKS.md, or add it.

    The quality sections (long runs, read last) stay at the end: a new quality section is
    appended, any other new one goes before the first quality section.
    """
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = report_file.read_text() if report_file.exists() else REPORT_HEADER
    first_quality = QUALITY_MARKER if QUALITY_MARKER in text else QUALITY_HEADING
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    elif not name.startswith("quality") and first_quality in text:
        before, after = text.split(first_quality, 1)
        text = before.rstrip() + "\n\n" + block + "\n\n" + first_quality + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    report_file.write_text(text)
