"""Flickr8k retrieval quality of a finished training run: recall against training time, and the final table.

    python dataset/flickr8k/prepare.py --source /path/to/flickr8k
    ./clipsearch resize_dataset --dataset_path dataset/flickr8k/data --out dataset/flickr8k/data256
    bash 1_pretrain_our.sh --dataset_path dataset/flickr8k/data256 --run_name flickr8k-our-60min ...
    .venv/bin/python benchmarks/bench_quality.py --run_name flickr8k-our-60min --command "<the training command>" --report

Reads the run's TensorBoard events (validation recall and the wall-clock time of each logged
point), evaluates the run's best checkpoint on the dev split with the same code as
`4_evaluate.sh`, plots recall against minutes of training, and with --report writes the "Quality"
section of BENCHMARKS.md and the plot under benchmarks/results/. The training itself is not repeated here: an hour of CPU is the experiment.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
# The packaged towers frozen, with only linear heads trained: the floor any training must beat.
FROZEN_FLOOR = {"text_to_image_R@1": 13.0, "text_to_image_R@10": 47.0}
TARGET = {"text_to_image_R@1": 30.0, "text_to_image_R@10": 75.0}
CURVES = ("text_to_image_R@1", "text_to_image_R@10", "image_to_text_R@1", "image_to_text_R@10")
# How the report names the packaged image towers (timm name -> name).
TOWER_NAMES = {"tf_efficientnet_lite0": "EfficientNet-Lite0", "tf_efficientnet_lite2": "EfficientNet-Lite2"}


def image_tower_name(params: dict) -> str:
    """The run's image tower as the report names it; runs made before the flag was recorded used Lite0."""
    timm_name = params.get("model", {}).get("pretrain_image", "tf_efficientnet_lite0")
    return TOWER_NAMES.get(timm_name, timm_name)


def read_scalars(log_dir: Path):
    """A run's TensorBoard scalars (an EventAccumulator) and their tags; stops if there are none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if not tags:
        raise SystemExit(f"no TensorBoard scalars in {log_dir}")
    return events, tags


def read_curves(log_dir: Path, started_at: float | None = None) -> dict[str, list[tuple[float, int, float]]]:
    """Per validation metric: (minutes since the run started, step, value).

    `started_at` is the run's start from its run.json; runs written before it was recorded count
    from their first logged event (which misses set-up and image caching).
    """
    events, tags = read_scalars(log_dir)
    started = started_at or min(events.Scalars(tag)[0].wall_time for tag in tags)
    return {
        name: [((e.wall_time - started) / 60, e.step, e.value) for e in events.Scalars(f"val/{name}")]
        for name in CURVES
        if f"val/{name}" in tags
    }


def minutes_before_training(log_dir: Path, started_at: float) -> float:
    """Minutes from the run's start to its first logged training step: loading and image caching."""
    events, tags = read_scalars(log_dir)
    return (min(events.Scalars(tag)[0].wall_time for tag in tags if tag.startswith("train/")) - started_at) / 60


def run_clock(run_dir: Path) -> tuple[float | None, int]:
    """When the run began (None for runs older than that record), and how many times it was resumed."""
    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, 0
    return record.get("started_at"), len(record.get("resumed_at", ()))


def charged_curves(models_dir: Path, logs_dir: Path, run_name: str, cache_from: str | None) -> tuple[dict, float]:
    """A run's validation curves (`read_curves`) and the minutes added to them for a borrowed image cache.

    A run whose image cache (same settings) was copied from `cache_from` skipped the caching its
    own start would have paid: the lender's minutes before its first step, beyond this run's, are
    charged to every point.
    """
    started_at, _ = run_clock(models_dir / run_name)
    curves = read_curves(logs_dir / run_name, started_at)
    if not cache_from:
        return curves, 0.0
    lender_started, _ = run_clock(models_dir / cache_from)
    if lender_started is None or started_at is None:
        raise SystemExit(f"{run_name}: a borrowed image cache needs both runs' run.json start times")
    borrowed = (minutes_before_training(logs_dir / cache_from, lender_started)
                - minutes_before_training(logs_dir / run_name, started_at))
    return {name: [(minutes + borrowed, step, value) for minutes, step, value in points]
            for name, points in curves.items()}, borrowed


def baseline_curves(models_dir: Path, logs_dir: Path, run_name: str, cache_from: str | None) -> dict:
    """The baseline run's charged curves from its logs, or, where they are gone (another machine), from
    the quality.json this report last wrote if that recorded the run."""
    if (logs_dir / run_name).is_dir():
        return charged_curves(models_dir, logs_dir, run_name, cache_from)[0]
    recorded_file = common.RESULTS_DIR / "quality.json"
    recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else {}
    if recorded.get("run_name") != run_name:
        raise SystemExit(f"--baseline_run {run_name}: no TensorBoard logs in {logs_dir / run_name}, "
                         f"and {recorded_file} records {recorded.get('run_name')!r}, not this run")
    return recorded["curves"]


def plot(tower: str, curves: dict, path: Path, baseline: tuple[str, dict] | None = None, peer: dict | None = None) -> None:
    """Recall against minutes; an earlier run's curves dashed, open_clip's final scores as stars."""
    try:
        import matplotlib
    except ImportError:  # kept out of requirements.txt (see requirements-bench.txt)
        print(f"bench_quality: matplotlib is not installed, so {path.name} is not drawn (pip install -r package/requirements-bench.txt).")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.6), dpi=120)
    colours = {}
    for name, points in curves.items():
        (line,) = axis.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=name.replace("_", " "))
        colours[name] = line.get_color()
    if baseline:
        label, baseline_curves = baseline
        for name in ("text_to_image_R@1", "text_to_image_R@10"):
            points = baseline_curves.get(name, [])
            axis.plot([p[0] for p in points], [p[2] for p in points], linestyle="--", marker=".", alpha=0.6,
                      color=colours.get(name), label=f"{name.replace('_', ' ')}, {label}")
    if peer:
        for name in ("text_to_image_R@1", "text_to_image_R@10"):
            axis.plot([peer["wall_minutes"]], [peer["final"]["metrics"][name]], marker="*", markersize=12,
                      linestyle="none", color=colours.get(name),
                      label=f"{name.replace('_', ' ')}, open_clip_train.main at its best rate, lr {peer['lr']:g}")
    for name, value in FROZEN_FLOOR.items():
        axis.axhline(value, linestyle=":", color="gray")
        axis.text(0.5, value + 0.8, f"frozen towers + linear heads, {name.replace('_', ' ')}", color="gray", fontsize=7)
    axis.set_xlabel("minutes of training (2 CPU cores, validation included)")
    axis.set_ylabel("recall (%) on Flickr8k dev (1000 images, 5000 captions)")
    axis.set_title(f'"Our" CLIP (MiniLM-L6 + {tower}) on Flickr8k')
    axis.set_xlim(left=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_name", required=True, help="run folder under --models_dir and --logs_dir")
    parser.add_argument("--models_dir", default=str(REPO / "models"), help="where the run's checkpoints are")
    parser.add_argument("--logs_dir", default=str(REPO / "logs"), help="where the run's TensorBoard events are")
    parser.add_argument("--dataset_path", default=str(REPO / "dataset/flickr8k/data256"), help="dataset with the dev table")
    parser.add_argument("--command", default="", help="the training command, quoted into the report")
    parser.add_argument("--baseline_run", default=None, help="an earlier run whose curves are drawn dashed for comparison")
    parser.add_argument("--image_cache_from", default=None,
                        help="a run whose image cache (same settings) was copied into this run's folder: the minutes "
                             "it spent before its first step, beyond this run's, are added to every point")
    parser.add_argument("--baseline_image_cache_from", default=None,
                        help="the same for --baseline_run, so both curves count caching alike")
    parser.add_argument("--image_resolution", type=int, default=None,
                        help="score the best checkpoint encoded at this size, as `clipsearch.export --image_resolution` "
                             "writes it (default: as it trained)")
    parser.add_argument("--scale_average", default=None, metavar="SIZES",
                        help="score it with these sizes averaged in, as `clipsearch.export --scale_average` writes it")
    parser.add_argument("--querybank", default=None, metavar="SPLIT",
                        help="also rank text->image querybank-normalised with this split's captions, as "
                             "`4_evaluate.sh --querybank SPLIT` and `3_inference_search.sh --querybank` do")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


def exported(bundle, image_resolution: int | None, scale_average: str | None):
    """The best checkpoint as `clipsearch.export` with these flags would write it, and the flags as text."""
    from clipsearch.cli.export import image_sizes
    from clipsearch.models.registry import with_image_size, with_scale_average

    flags = []
    if image_resolution is not None:
        bundle = with_image_size(bundle, image_resolution)
        flags.append(f"--image_resolution {image_resolution}")
    if scale_average is not None:
        bundle = with_scale_average(bundle, image_sizes(scale_average))
        flags.append(f"--scale_average {scale_average}")
    return bundle, " ".join(flags)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "package"))
    from clipsearch.checkpoint import load_bundle
    from clipsearch.evaluate import evaluate, format_metrics

    run_dir = Path(args.models_dir) / args.run_name
    params = json.loads((run_dir / "params.json").read_text())
    _, resumes = run_clock(run_dir)
    models_dir, logs_dir = Path(args.models_dir), Path(args.logs_dir)
    curves, borrowed_minutes = charged_curves(models_dir, logs_dir, args.run_name, args.image_cache_from)
    header = common.run_header()
    scored, export_flags = exported(load_bundle(run_dir / "best.ckpt"), args.image_resolution, args.scale_average)
    final = evaluate(scored, args.dataset_path, "dev", batch_size=64, num_workers=1, querybank_split=args.querybank)
    plot_path = common.results_dir(args.report) / "quality_recall_vs_time.png"
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    baseline = None
    if args.baseline_run:
        baseline = (args.baseline_run, baseline_curves(models_dir, logs_dir, args.baseline_run, args.baseline_image_cache_from))
    peer_file = common.RESULTS_DIR / "quality_open_clip.json"
    peer = json.loads(peer_file.read_text()) if peer_file.is_file() else None
    plot(image_tower_name(params), curves, plot_path, baseline, peer)
    results = {
        **header,
        "load_average_end": common.load_average(),
        "run_name": args.run_name,
        "training_command": args.command,
        "params": params,
        "training_minutes": max(points[-1][0] for points in curves.values()),
        "image_cache_from": args.image_cache_from,
        "borrowed_cache_minutes": borrowed_minutes,
        "baseline_image_cache_from": args.baseline_image_cache_from,
        "curves": curves,
        "export_flags": export_flags,
        "final": final,
    }
    metrics = final["metrics"]

    def verdict_of(scored_metrics: dict) -> str:
        met = results["training_minutes"] <= 60 and all(scored_metrics[name] >= value for name, value in TARGET.items())
        return ("met" if met else "not met") + " ({:.1f} / {:.1f})".format(*(scored_metrics[name] for name in TARGET))

    verdict = verdict_of(metrics)
    final_tables = f"```\n{format_metrics(metrics)}\n```"
    if args.querybank:
        bank = final["querybank"]
        plain = final["metrics_without_querybank"]
        verdict = (f"{verdict} with querybank normalisation (`--querybank {args.querybank}`), "
                   f"{verdict_of(plain)} by plain cosine")
        final_tables = (f"By plain cosine:\n\n```\n{format_metrics(plain)}\n```\n\nQuerybank-normalised "
                        f"(`4_evaluate.sh --querybank {args.querybank}`: a bias per image from {bank['captions']} "
                        f"{bank['split']} captions at the model's temperature, {bank['temperature']:.1f}; "
                        f"image->text ranks do not change):\n\n{final_tables}")
    rows = "\n".join(
        f"| {minutes:.1f} | {step} | "
        + " | ".join(f"{dict((n, p[i][2]) for n, p in curves.items()).get(name, float('nan')):.1f}" for name in CURVES)
        + " |"
        for i, (minutes, step, _) in enumerate(curves["text_to_image_R@1"])
    )
    baseline_line = (
        f"\n- The plot also shows the earlier run `{args.baseline_run}` (dashed"
        + (f", its cache borrowed from `{args.baseline_image_cache_from}` and charged alike" if args.baseline_image_cache_from else "")
        + ") and, when"
        " bench_quality_open_clip.py has run, open_clip's trainer (stars; its section says which towers it had)."
        " Runs older than run.json's start time count from their first logged step, which leaves out their set-up."
        if args.baseline_run else ""
    )
    resumed_line = (f"\n- The run was resumed {resumes} time(s): its minutes count wall time from its first start,"
                    " the time it lay stopped included." if resumes else "")
    borrowed_line = (f"\n- The run reused the image cache of `{args.image_cache_from}` (the same settings), copied into its"
                     f" folder; the {borrowed_minutes:.1f} minutes that run spent caching, beyond this run's own start-up,"
                     " are added to every point here." if args.image_cache_from else "")
    markdown = f"""## Quality (Flickr8k)

Command: `{args.command or 'see params'}`, then `python benchmarks/bench_quality.py --run_name {args.run_name}{(' ' + export_flags) if export_flags else ''}{f' --querybank {args.querybank}' if args.querybank else ''}`

- Machine: {results['machine']['nproc']} CPUs ({results['machine']['cpu_model']}); date {results['date']}
- "Our" CLIP: packaged MiniLM-L6 text tower + packaged ImageNet {image_tower_name(params)} image tower, trained
  {results['training_minutes']:.0f} minutes (wall clock from the run's start: loading, image caching and validation
  included) on Flickr8k train (6000 images, 30000 captions); evaluated on the dev split (1000 images, 5000
  captions) by `4_evaluate.sh`'s code.
- Target: text->image R@1 >= {TARGET['text_to_image_R@1']:.0f} and R@10 >= {TARGET['text_to_image_R@10']:.0f} within 60 minutes: {verdict}.
- Floor: the same towers frozen with linear heads reach about {FROZEN_FLOOR['text_to_image_R@1']:.0f} / {FROZEN_FLOOR['text_to_image_R@10']:.0f} (text->image R@1 / R@10).{resumed_line}{borrowed_line}{baseline_line}

Best checkpoint{f", exported with `{export_flags}` (the same weights; validation during training encoded at {params.get('model', {}).get('image_resolution')} px)" if export_flags else ""}:

{final_tables}

Validation during training:

| minutes | step | text->image R@1 | text->image R@10 | image->text R@1 | image->text R@10 |
|---:|---:|---:|---:|---:|---:|
{rows}

![recall against training time](benchmarks/results/{plot_path.name})
"""
    common.publish("quality", results, markdown, args.report)
    print(format_metrics(metrics))
    return results


if __name__ == "__main__":
    main()
