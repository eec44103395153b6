"""Training throughput and peak memory: our Lightning trainer against open_clip's own trainer, same model and data.

    .venv/bin/python benchmarks/bench_train.py                       # ViT-Small-16 (96 px), batch 64, CPU
    .venv/bin/python benchmarks/bench_train.py --steps 10,40 --workers 1 --repeats 2

Both trainers run as child processes from the command line, on the generated sample dataset,
with the same open_clip architecture (our local ViT-Small-16 config, QuickGELU, fp32), batch size,
DataLoader workers and threads, and no validation. Each is timed from the outside at two step
counts; (step difference x batch) / (time difference) is the steady rate with start-up, model
building and the final checkpoint cancelled out. Peak memory is the largest resident set of the
trainer process or any of its DataLoader workers (wait4's ru_maxrss). open_clip_train cannot see our
config folder by itself, so it is started through a two-line launcher that registers the folder
with open_clip.add_model_config first. With --report, results go to benchmarks/results/train.json
and the "Training" section of BENCHMARKS.md; otherwise to a scratch folder.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "package" / "clipsearch" / "models" / "configs"
OPEN_CLIP_LAUNCHER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
OPEN_CLIP_RATE = re.compile(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run = parser.add_argument_group("run")
    run.add_argument("--model", default="ViT-Small-16", help="an open_clip or local config name both trainers build")
    run.add_argument("--batch_size", type=int, default=64, help="pairs per step")
    run.add_argument("--steps", default="2,6", help="the two step counts whose time difference is measured")
    run.add_argument("--workers", type=int, default=1, help="DataLoader workers of both trainers (ours defaults to cores - 1)")
    run.add_argument("--repeats", type=int, default=1, help="measurements per trainer and step count (median reported)")
    run.add_argument("--work_dir", type=Path, default=common.work_dir("train"), help="scratch folder for data, logs and checkpoints")
    common.add_report_flags(parser)
    args = parser.parse_args(argv)
    args.steps = sorted(int(value) for value in args.steps.split(","))
    if len(args.steps) != 2 or args.steps[0] < 1 or args.steps[0] == args.steps[1]:
        parser.error("--steps takes two different positive step counts, e.g. 2,6")
    return args


def prepare_data(work_dir: Path, batch_size: int, steps: list[int]) -> tuple[Path, dict[int, Path]]:
    """The sample dataset, and for open_clip one absolute-path CSV per step count (it trains whole epochs)."""
    from clipsearch.data import read_table
    from clipsearch.sample_data import ensure_sample_dataset

    dataset = ensure_sample_dataset(work_dir / "sample")
    table = read_table(dataset, "train")
    tables = {}
    for step_count in steps:
        rows = step_count * batch_size
        if rows > len(table):
            raise SystemExit(f"{step_count} steps of {batch_size} need {rows} pairs; the sample has {len(table)}")
        path = work_dir / f"open_clip_train_{step_count}.csv"
        with open(path, "w", newline="") as file:
            writer = csv.writer(file, delimiter="\t", lineterminator="\n")
            writer.writerow(["image", "caption"])
            for image, caption in zip(table["image"][:rows], table["caption"][:rows]):
                writer.writerow([os.path.abspath(image), caption])
        tables[step_count] = path
    return dataset, tables


def our_command(args, dataset: Path, step_count: int, run_dir: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "src_openai_pretrain" / "main.py"),
        f"--pretrain_clip={args.model}", f"--dataset_path={dataset}", "--val_split=none",
        f"--batch_size={args.batch_size}", f"--num_workers={args.workers}", f"--max_steps={step_count}",
        "--accelerator=cpu", "--devices=1", "--precision=32", "--resume=none",
        f"--checkpoint_every_steps={10 * step_count}", "--log_every_n_steps=2",
        f"--models_dir={run_dir / 'models'}", f"--logs_dir={run_dir / 'logs'}", "--run_name=bench",
    ]


def open_clip_command(args, table: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-c", OPEN_CLIP_LAUNCHER, str(CONFIG_DIR),
        f"--model={args.model}", "--force-quick-gelu", f"--train-data={table}", "--dataset-type=csv",
        "--csv-separator=\t", "--csv-img-key=image", "--csv-caption-key=caption",
        f"--batch-size={args.batch_size}", f"--workers={args.workers}", "--epochs=1", "--warmup=1",
        "--lr=5e-4", "--wd=0.2", "--precision=fp32", "--device=cpu", "--report-to=", "--save-frequency=1",
        "--log-every-n-steps=2", f"--logs={run_dir}", "--name=bench", "--seed=0",
    ]


def run_child(command: list[str], run_dir: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of one trainer process, its output kept in run_dir/output.log."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    environment = {**os.environ, "PYTHONPATH": str(REPO / "package"), "HF_HUB_OFFLINE": "1"}
    with open(run_dir / "output.log", "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = (run_dir / "output.log").read_text()[-3000:]
        raise SystemExit(f"{' '.join(command[:3])} ... failed ({process.returncode}):\n{tail}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def logged_rates(trainer: str, run_dir: Path) -> list[float]:
    """The samples/s each trainer logs itself (ours: TensorBoard train/samples_per_sec)."""
    if trainer == "open_clip":
        return [float(value) for value in OPEN_CLIP_RATE.findall((run_dir / "output.log").read_text())]
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    events = EventAccumulator(str(run_dir / "logs" / "bench"))
    events.Reload()
    if "train/samples_per_sec" not in events.Tags().get("scalars", []):
        return []
    return [event.value for event in events.Scalars("train/samples_per_sec")]


def report_markdown(results: dict) -> str:
    setup = results["setup"]
    rows = [
        [label, f"{row['steady_samples_per_s']:.1f}", f"{row['seconds'][0]:.1f}", f"{row['seconds'][1]:.1f}",
         f"{row['logged_samples_per_s']:.1f}", f"{row['peak_rss_mib']:.0f}"]
        for name, label in (("ours", "ours (`src_openai_pretrain/main.py`)"), ("open_clip", "open_clip_train.main"))
        for row in [results["trainers"][name]]
    ]
    return common.report_section("Training", results, [
        f"- Model {setup['model']} (open_clip architecture from our config, QuickGELU, fp32), batch {setup['batch_size']}, "
        f"{setup['workers']} DataLoader worker(s), CPU, no validation; data: the generated sample dataset "
        f"({setup['image_px']} px PNGs)",
        f"- Steady samples/s = (({setup['steps'][1]} - {setup['steps'][0]}) steps x batch) / (time difference) over two "
        f"runs timed from outside; median of {setup['repeats']} alternating measurements. Peak RSS: largest resident "
        "set of the trainer or one of its workers",
        "",
        *common.markdown_table(
            ["trainer", "steady samples/s", f"s for {setup['steps'][0]} steps", f"s for {setup['steps'][1]} steps",
             "self-logged samples/s (median)", "peak RSS MiB"],
            rows, "lrrrrr"),
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    header = common.run_header()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dataset, tables = prepare_data(args.work_dir, args.batch_size, args.steps)
    runs = {(trainer, steps): [] for trainer in ("ours", "open_clip") for steps in args.steps}
    logged = {"ours": [], "open_clip": []}
    for repeat in range(args.repeats):
        order = ["ours", "open_clip"] if repeat % 2 == 0 else ["open_clip", "ours"]
        for step_count in args.steps:
            for trainer in order:
                run_dir = args.work_dir / f"{trainer}_{step_count}"
                if trainer == "ours":
                    command = our_command(args, dataset, step_count, run_dir)
                else:
                    command = open_clip_command(args, tables[step_count], run_dir)
                outcome = run_child(command, run_dir)
                runs[(trainer, step_count)].append(outcome)
                if step_count == args.steps[1]:
                    logged[trainer].extend(logged_rates(trainer, run_dir))
                print(json.dumps({"trainer": trainer, "steps": step_count, **{k: round(v, 2) for k, v in outcome.items()}}))

    trainers = {}
    for trainer in ("ours", "open_clip"):
        short = common.median([run["seconds"] for run in runs[(trainer, args.steps[0])]])
        long = common.median([run["seconds"] for run in runs[(trainer, args.steps[1])]])
        samples = (args.steps[1] - args.steps[0]) * args.batch_size
        # The first logged window of open_clip includes start-up; leave it out as ours does.
        rates = logged[trainer][1:] if trainer == "open_clip" else logged[trainer]
        trainers[trainer] = {
            "seconds": [short, long],
            "all_seconds": {str(steps): [round(run["seconds"], 2) for run in runs[(trainer, steps)]] for steps in args.steps},
            "steady_samples_per_s": round(samples / max(long - short, 1e-9), 1),
            "logged_samples_per_s": round(common.median(rates), 1) if rates else float("nan"),
            "peak_rss_mib": round(max(run["peak_rss_mib"] for steps in args.steps for run in runs[(trainer, steps)]), 1),
        }
    from clipsearch.models.openai_clip import openai_clip_spec

    results = {
        **header,
        "setup": {
            "model": args.model,
            "image_px": openai_clip_spec(args.model)["image"]["size"],
            "batch_size": args.batch_size,
            "steps": args.steps,
            "workers": args.workers,
            "repeats": args.repeats,
        },
        "trainers": trainers,
        "load_average_end": common.load_average(),
        "command": common.command_line("bench_train.py", argv),
    }
    ours, theirs = trainers["ours"], trainers["open_clip"]
    ratio = ours["steady_samples_per_s"] / theirs["steady_samples_per_s"]
    results["ours_over_open_clip"] = round(ratio, 3)
    results["findings"] = [
        f"- Ours runs at {ratio:.2f} x open_clip's steady samples/s ({'met' if ratio >= 1 else 'missed'}: target >= 1); "
        f"peak RSS {ours['peak_rss_mib']:.0f} MiB against {theirs['peak_rss_mib']:.0f} MiB."
    ]
    common.publish("train", results, report_markdown(results), args.report)
    return results


if __name__ == "__main__":
    main()
