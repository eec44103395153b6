"""Training samples/s of each variant's door on the sample data, through the real entry points.

    .venv/bin/python benchmarks/bench_variants.py            # ~3 minutes on 2 CPU cores

Each door trains `--steps` steps (no validation until the end) and logs samples/s every few steps
to TensorBoard (the first step, which pays for start-up, is left out by the trainer). Reports the
median logged rate. With --report, results go to benchmarks/results/variants.json and
BENCHMARKS.md; otherwise to a scratch folder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
# Door, flags: the small configurations a CPU user starts with (the our-CLIP one is the default run).
VARIANTS = {
    "our (MiniLM-L6 + EfficientNet-Lite0, 96 px)": ("src_our/main.py", []),
    "openai pretrain (ViT-Tiny-16, 64 px)": ("src_openai_pretrain/main.py", ["--pretrain_clip=ViT-Tiny-16"]),
    "openai pretrain (ViT-Small-16, 96 px)": ("src_openai_pretrain/main.py", ["--pretrain_clip=ViT-Small-16"]),
    "openai pretrain (RN-Tiny, 64 px)": ("src_openai_pretrain/main.py", ["--pretrain_clip=RN-Tiny"]),
}


def logged_rates(log_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in events.Scalars("train/samples_per_sec")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="training steps per variant")
    parser.add_argument("--batch_size", type=int, default=32, help="pairs per step")
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader workers")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


def report_markdown(results: dict) -> str:
    rows = [[name, rate] for name, rate in results["samples_per_sec"].items()]
    return common.report_section("Training throughput of each variant", results, [
        "", *common.markdown_table(["variant (door, sample data)", "samples/s"], rows, "lr"),
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = {**common.run_header(), "batch_size": args.batch_size, "steps": args.steps, "samples_per_sec": {},
               "command": common.command_line("bench_variants.py", argv)}
    with tempfile.TemporaryDirectory() as work:
        for name, (door, flags) in VARIANTS.items():
            run = f"variant{len(results['samples_per_sec'])}"
            command = [sys.executable, door, *flags, f"--max_steps={args.steps}", f"--batch_size={args.batch_size}",
                       f"--num_workers={args.num_workers}", f"--val_check_interval={args.steps}", "--log_every_n_steps=5",
                       f"--run_name={run}", f"--models_dir={work}/models", f"--logs_dir={work}/logs"]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "package")}
            subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
            rates = logged_rates(Path(work) / "logs" / run)
            results["samples_per_sec"][name] = round(statistics.median(rates), 1)
            print(f"{name}: {results['samples_per_sec'][name]} samples/s")
    results["load_average_end"] = common.load_average()
    common.publish("variants", results, report_markdown(results), args.report)
    return results


if __name__ == "__main__":
    main()
