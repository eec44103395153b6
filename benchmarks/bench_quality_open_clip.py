"""Flickr8k quality of open_clip's own trainer given our CLIP's towers, for the same minutes of CPU.

    .venv/bin/python benchmarks/bench_quality.py --run_name flickr8k-our-60min ...   # ours first
    .venv/bin/python benchmarks/bench_quality_open_clip.py --minutes 60 --lrs 1e-4,3e-4,1e-3

The peer of bench_quality.py. `python -m open_clip_train.main` trains the same packaged towers
(MiniLM-L6 through open_clip's HuggingFace adapter, the ImageNet TF EfficientNet-Lite0 through its
timm adapter as `tf_efficientnet_lite0` with that network's mean = std = 0.5 input scaling, both
with linear projections to 256 dimensions and mean pooling, as ours) on Flickr8k train, and each
final checkpoint is scored on the dev split by the same code as `4_evaluate.sh`.

open_clip trains whole epochs of a CSV and anneals its learning rate over them, so the time
budget becomes a sample count: a short calibration run measures its samples/s on this machine,
then the real run gets one epoch of rate x budget pairs (the training pairs reshuffled and
repeated). open_clip has one learning rate for all parameters; to give it a fair chance, one
full-budget run per learning rate in --lrs (each about --minutes long) is recorded, and the best
by mean recall is its row. Include the rates our run used (before the --tower_lr fix, every
parameter of ours trained at --lr). With --report, results go to benchmarks/results/quality_open_clip.json
and the "Quality against open_clip" section of BENCHMARKS.md.

Each run takes about --minutes, so the rates need not run in one sitting: --extend keeps the runs
already recorded, reuses their calibration (the same pairs, in the same order), and runs only the
rates in --lrs that are not there yet.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

import common
from bench_train import OPEN_CLIP_RATE, run_child

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "clipsearch-MiniLM-L6-EfficientNet-Lite0"
CALIBRATION_STEPS = 24
# open_clip 3.3's table of HuggingFace architectures lacks the two names its partial text locking
# looks up for BERT (KeyError 'layer_attr'); the launcher adds them, then registers our config.
OPEN_CLIP_LAUNCHER = (
    "import sys, open_clip; from open_clip.hf_configs import arch_dict; "
    "arch_dict['bert']['config_names'].setdefault('layer_attr', 'layer'); "
    "arch_dict['bert']['config_names'].setdefault('token_embeddings_attr', 'embeddings'); "
    "open_clip.add_model_config(sys.argv[1]); from open_clip_train.main import main; main(sys.argv[2:])"
)


def learning_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-4,1e-3, not {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"expected positive learning rates, not {text!r}")
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of the real run")
    parser.add_argument("--dataset_path", default=str(REPO / "dataset/flickr8k/data256"), help="Flickr8k in our format")
    parser.add_argument("--batch_size", type=int, default=128, help="pairs per step")
    parser.add_argument("--image_size", type=int, default=192, help="open_clip trains and evaluates at one size")
    parser.add_argument("--lrs", type=learning_rates, default=learning_rates("1e-4,3e-4,1e-3"),
                        help="comma-separated learning rates, one full-budget run each (open_clip has one rate for all parameters)")
    parser.add_argument("--warmup", type=int, default=40, help="warmup steps")
    parser.add_argument("--lock_text_unlocked_layers", type=int, default=2,
                        help="as ours: text tower frozen but its last N layers (-1: text fully trainable)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--note", default=None, help="a sentence printed under the settings (e.g. which rates are still to run)")
    parser.add_argument("--work_dir", type=Path, default=common.work_dir("quality_open_clip"), help="scratch folder")
    parser.add_argument("--extend", action="store_true",
                        help="add the rates in --lrs not yet recorded to the recorded results, at their calibration")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


def write_model(work_dir: Path, image_size: int) -> tuple[Path, Path]:
    """open_clip's config for our towers, and its initial weights with both packaged towers loaded."""
    import open_clip
    import torch

    from clipsearch.models.image_tower import DEFAULT_IMAGE_MODEL, load_image_weights
    from clipsearch.models.pretrained_towers import packaged_text_model_dir

    text_dir = str(packaged_text_model_dir())
    config = {
        "embed_dim": 256,
        "vision_cfg": {"timm_model_name": DEFAULT_IMAGE_MODEL, "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": image_size},
        "text_cfg": {"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": 64},
    }
    config_dir = work_dir / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{MODEL_NAME}.json").write_text(json.dumps(config, indent=2))
    open_clip.add_model_config(str(config_dir))
    model = open_clip.create_model(MODEL_NAME)  # loads MiniLM's weights from the packaged folder
    # Our loader maps the packaged Lite0 file onto a timm model; open_clip's trunk is one.
    load_image_weights(model.visual.trunk, DEFAULT_IMAGE_MODEL, None)
    weights = work_dir / "initial.pt"
    torch.save(model.state_dict(), weights)
    return config_dir, weights


def write_pairs(table, path: Path, count: int, seed: int) -> Path:
    """`count` training pairs with absolute paths: whole shuffled passes over the table, then a part."""
    rows = list(zip(table["image"], table["caption"]))
    generator = random.Random(seed)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < count:
        generator.shuffle(rows)
        chosen.extend(rows[: count - len(chosen)])
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows((os.path.abspath(image), caption) for image, caption in chosen)
    return path


def image_normalisation() -> tuple[list[float], list[float]]:
    """The mean and std the packaged tower's weights were trained with, as our default spec records them."""
    from clipsearch.models.image_tower import DEFAULT_IMAGE_MODEL, image_input_config

    config = image_input_config(DEFAULT_IMAGE_MODEL)
    return config["mean"], config["std"]


def open_clip_command(args, config_dir: Path, weights: Path, table: Path, run_dir: Path, name: str, lr: float) -> list[str]:
    mean, std = image_normalisation()
    text_lock = ([] if args.lock_text_unlocked_layers < 0
                 else ["--lock-text", f"--lock-text-unlocked-layers={args.lock_text_unlocked_layers}",
                       "--lock-text-freeze-layer-norm"])  # ours freezes locked layers whole
    return [
        sys.executable, "-c", OPEN_CLIP_LAUNCHER, str(config_dir),
        f"--model={MODEL_NAME}", f"--pretrained={weights}", f"--train-data={table}", "--dataset-type=csv",
        "--csv-separator=\t", "--csv-img-key=image", "--csv-caption-key=caption",
        "--image-mean", *map(str, mean), "--image-std", *map(str, std), *text_lock,
        f"--batch-size={args.batch_size}", f"--workers={args.workers}", "--epochs=1", f"--warmup={args.warmup}",
        f"--lr={lr}", "--wd=0.2", "--precision=fp32", "--device=cpu", "--report-to=", "--save-frequency=1",
        "--log-every-n-steps=2", f"--logs={run_dir}", f"--name={name}", "--seed=0",
    ]


def evaluate_checkpoint(config_dir: Path, checkpoint: Path, dataset: str) -> dict:
    """Score open_clip's checkpoint with our evaluator, through open_clip's own eval preprocessing."""
    import open_clip

    from clipsearch.evaluate import evaluate
    from clipsearch.models import ModelBundle

    mean, std = image_normalisation()
    open_clip.add_model_config(str(config_dir))
    model, train_transform, eval_transform = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(checkpoint), image_mean=mean, image_std=std
    )
    bundle = ModelBundle(model.eval(), train_transform, eval_transform, open_clip.get_tokenizer(MODEL_NAME),
                         {"embed_dim": 256})
    return evaluate(bundle, dataset, "dev", batch_size=64, num_workers=1)


# What a recorded run must share with a new one for --extend to put them in one table.
COMPARABLE_SETTINGS = ("minutes", "dataset_path", "batch_size", "image_size", "warmup", "lock_text_unlocked_layers")


def recorded_results(args, argv: list[str] | None) -> dict:
    """The results --extend adds to, refused if they were run under other settings."""
    path = common.results_dir(args.report) / "quality_open_clip.json"
    if not path.is_file():
        raise SystemExit(f"error: --extend found no recorded results at {path}; run without --extend first")
    results = json.loads(path.read_text())
    differing = [key for key in COMPARABLE_SETTINGS if results["settings"].get(key) != str(getattr(args, key))]
    if differing:
        raise SystemExit("error: --extend needs the recorded runs' settings; these differ: " + ", ".join(
            f"--{key} {getattr(args, key)} (recorded {results['settings'].get(key)})" for key in differing))
    results.setdefault("extended_by", []).append(common.command_line("bench_quality_open_clip.py", argv))
    if args.note:
        results["note"] = args.note
    return results


def calibrate(args, table, config_dir: Path, weights: Path) -> float:
    """open_clip's steady samples/s on this machine, from a short run."""
    calibration_dir = args.work_dir / "calibration"
    calibration_pairs = write_pairs(table, args.work_dir / "calibration.tsv", CALIBRATION_STEPS * args.batch_size, 1)
    run_child(open_clip_command(args, config_dir, weights, calibration_pairs, calibration_dir, "run", args.lrs[0]),
              calibration_dir)
    # Its rate climbs over the first dozen steps (allocator and oneDNN warm-up); the later half of
    # the logged windows is the steady rate the real run will see.
    windows = [float(v) for v in OPEN_CLIP_RATE.findall((calibration_dir / "output.log").read_text())]
    return common.median(windows[len(windows) // 2 :])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "package"))
    from clipsearch.data import read_table
    from clipsearch.evaluate import format_metrics

    if args.extend:
        results = recorded_results(args, argv)  # before any work: a mismatch costs nothing
    args.work_dir.mkdir(parents=True, exist_ok=True)
    config_dir, weights = write_model(args.work_dir, args.image_size)
    table = read_table(args.dataset_path, "train")

    if not args.extend:
        rate = calibrate(args, table, config_dir, weights)
        results = {
            **common.run_header(),
            "command": common.command_line("bench_quality_open_clip.py", argv),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "image_normalisation": dict(zip(("mean", "std"), image_normalisation())),
            "calibrated_samples_per_sec": rate,
            "pairs": int(rate * args.minutes * 60) // args.batch_size * args.batch_size,
            "runs": [],
        }
        if args.note:
            results["note"] = args.note
    rate, pairs = results["calibrated_samples_per_sec"], results["pairs"]
    print(f"open_clip runs at {rate:.1f} samples/s here: {args.minutes:g} minutes = {pairs} pairs", flush=True)
    # Seeded, so an extending run trains on the very pairs, in the same order, as the recorded ones.
    train_pairs = write_pairs(table, args.work_dir / "train.tsv", pairs, 0)

    recorded_rates = {run["lr"] for run in results["runs"]}
    for lr in args.lrs:
        if lr in recorded_rates:
            print(f"lr {lr:g}: already recorded, not rerun", flush=True)
            continue
        run_dir = args.work_dir / f"run-lr{lr:g}"
        started_at, load_at_start = common.now_iso(), common.load_average()
        timing = run_child(open_clip_command(args, config_dir, weights, train_pairs, run_dir, "run", lr), run_dir)
        rates = [float(v) for v in OPEN_CLIP_RATE.findall((run_dir / "output.log").read_text())][1:]
        final = evaluate_checkpoint(config_dir, run_dir / "run" / "checkpoints" / "epoch_1.pt", args.dataset_path)
        print(f"lr {lr:g}:\n{format_metrics(final['metrics'])}", flush=True)
        results["runs"].append({
            "lr": lr,
            "started_at": started_at,
            "load_average": {"start": load_at_start, "end": common.load_average()},
            "wall_minutes": timing["seconds"] / 60,
            "peak_rss_mib": timing["peak_rss_mib"],
            "samples_per_sec": common.median(rates) if rates else None,
            "final": final,
        })
        # The best run so far stays at the top level, where bench_quality.py's plot reads it; each
        # finished run is written at once, should a later one fail.
        best = max(results["runs"], key=lambda run: run["final"]["metrics"]["mean_recall"])
        results.update({key: best[key] for key in ("lr", "wall_minutes", "peak_rss_mib", "samples_per_sec", "final")})
        results["load_average_end"] = common.load_average()
        common.write_results("quality_open_clip", results, common.results_dir(args.report))
    common.publish("quality_open_clip", results, report_markdown(results), args.report)
    return results


def report_markdown(results: dict) -> str:
    from clipsearch.evaluate import format_metrics

    ours_file = common.RESULTS_DIR / "quality.json"
    ours = json.loads(ours_file.read_text()) if ours_file.is_file() else None
    several = len(results["runs"]) > 1
    rows = [(f"open_clip_train.main, lr {run['lr']:g}{' (best)' if several and run['lr'] == results['lr'] else ''}",
             run["wall_minutes"], run["final"]["metrics"]) for run in results["runs"]]
    if ours:
        rows.insert(0, (f"ours (`{ours['run_name']}`)", ours["training_minutes"], ours["final"]["metrics"]))
    table = "\n".join(
        f"| {name} | {minutes:.0f} | {m['text_to_image_R@1']:.1f} | {m['text_to_image_R@5']:.1f} | "
        f"{m['text_to_image_R@10']:.1f} | {m['image_to_text_R@1']:.1f} | {m['image_to_text_R@10']:.1f} |"
        for name, minutes, m in rows
    )
    settings = results["settings"]
    note = f"- {results['note']}\n" if results.get("note") else ""
    extensions = "".join(f"\nThen, at its calibration: `{command}`\n" for command in results.get("extended_by", []))
    dated_runs = [run for run in results["runs"] if "started_at" in run]
    run_dates = ("- Each run's start and load average (start / end): " + "; ".join(
        f"lr {run['lr']:g} {run['started_at']}, {run['load_average']['start'][0]} / {run['load_average']['end'][0]}"
        for run in dated_runs) + ".\n") if dated_runs else ""
    normalisation = results["image_normalisation"]
    return f"""## Quality against open_clip's trainer (Flickr8k, equal CPU time)

Command: `{results['command']}`
{extensions}
{common.machine_lines(results).rstrip()}
- open_clip {settings['image_size']} px train and test, batch {settings['batch_size']}, one run per learning rate
  (each for every parameter), warmup {settings['warmup']}, text tower locked but its last
  {settings['lock_text_unlocked_layers']} layers, image tower trainable; both towers from the packaged weights, the image
  tower as `tf_efficientnet_lite0` with mean {normalisation['mean'][0]:g} / std {normalisation['std'][0]:g}.
{note}{run_dates}- The {'best run' if several else 'run'} (lr {results['lr']:g}) ran {results['samples_per_sec'] or float('nan'):.1f} samples/s (calibrated {results['calibrated_samples_per_sec']:.1f}),
  {results['pairs']} pairs in {results['wall_minutes']:.1f} minutes, peak RSS {results['peak_rss_mib']:.0f} MiB.

| trainer | minutes | text->image R@1 | R@5 | R@10 | image->text R@1 | R@10 |
|---|---:|---:|---:|---:|---:|---:|
{table}

The {'best ' if several else ''}open_clip run's final checkpoint:

```
{format_metrics(results["final"]["metrics"])}
```
"""


if __name__ == "__main__":
    main()
