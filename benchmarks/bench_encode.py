"""Encoding throughput: the real encode CLI (reader -> model -> writer) against the model alone on decoded tensors.

    .venv/bin/python benchmarks/bench_encode.py                        # 256 generated JPEGs, "our" model
    .venv/bin/python benchmarks/bench_encode.py --image_dir ../shared/data/flickr8k/Flicker8k_Dataset \
        --images 256 --workers 0,2 --models our,vit-tiny                # real photos, read in place
    python benchmarks/bench_encode.py --accelerator gpu --precision 16-mixed --models our,vit-b-32 \
        --images 4096 --batch_size 256                                  # on a GPU (benchmarks/gpu_check.sh)
    .venv/bin/python benchmarks/bench_encode.py --source tars           # the same JPEGs packed in webdataset tars

The pipeline runs `python -m clipsearch.cli.encode` in this process, on a folder of symlinks to
JPEGs: those of --image_dir read in place (e.g. Flickr8k), or photo-sized generated ones; with --source tars,
on webdataset tars of --tar_samples of those JPEGs each (with a .txt and a .json, as img2dataset writes
them), read through the tar reader. Its steady rate comes from
two runs of different image counts: (count difference) / (time difference) cancels the start-up
(DataLoader workers, first batch) that a short run would otherwise be dominated by. The ceiling is
the same model, threads and batch size on the same images decoded and transformed beforehand.
Models have random weights: speed does not depend on them. vit-b-32 is the architecture behind
clip-retrieval's published rate (1500 samples/s on an RTX 3080, image and text embedded), the
reference for a GPU run. With --report, results go to
benchmarks/results/encode.json and the "Encoding" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import common
import numpy as np
import torch

MODELS = ("our", "vit-tiny", "vit-b-32")
ARCHITECTURES = {"vit-tiny": "ViT-Tiny-16", "vit-b-32": "ViT-B-32"}
TARGET_RATIO = 0.98  # of the model-only rate (issue 30)


def image_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def add_image_flags(group, name: str) -> None:
    """--image_dir and --work_dir, shared with bench_update.py: where the JPEGs come from and scratch goes."""
    group.add_argument("--image_dir", type=image_folder, default=None,
                       help="folder of JPEGs read in place, e.g. Flickr8k's Flicker8k_Dataset (default: generated JPEGs)")
    group.add_argument("--work_dir", type=Path, default=common.work_dir(name),
                       help="scratch folder for generated JPEGs, links, checkpoints, shards")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--images", type=int, default=256, help="images of the longer run (the shorter has half)")
    data.add_argument("--source", choices=("folder", "tars"), default="folder",
                      help="what the pipeline reads: a folder of the JPEGs, or webdataset tars of them")
    data.add_argument("--tar_samples", type=int, default=128,
                      help="samples per tar with --source tars, a multiple of --batch_size so no batch is cut short "
                           "(img2dataset writes 10,000; each tar is a shard, written and fsynced when it ends)")
    add_image_flags(data, "encode")
    run = parser.add_argument_group("run")
    run.add_argument("--models", default="our", help=f"comma-separated, from {', '.join(MODELS)}")
    run.add_argument("--batch_size", type=int, default=64, help="images per model call (the CLI's default)")
    run.add_argument("--workers", default="0,1,2",
                     help="comma-separated --num_workers settings to try; the CLI's default is always included")
    run.add_argument("--repeats", type=int, default=2, help="measurements per setting (median reported)")
    run.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"), help="where the model runs (the GPU: cuda:0)")
    run.add_argument("--precision", default="32", choices=("32", "16-mixed", "bf16-mixed"),
                     help="the encode CLI's --precision, for the pipeline and the model-only ceiling alike")
    run.add_argument("--cpu_threads", type=int, default=None,
                     help="the model's torch threads on the CPU, in the pipeline (the CLI's --cpu_threads) and the "
                          "ceiling alike (default: the CLI's, every core); 1 on 2 cores leaves a core to the "
                          "decoding worker, as a GPU node's cores are left to its workers")
    common.add_report_flags(parser)
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    args.workers = sorted({int(value) for value in args.workers.split(",") if value.strip()})
    if args.images < 2 * args.batch_size:
        parser.error("--images must be at least two batches, so the two runs differ by whole batches")
    if args.source == "tars" and ((args.images // 2) % args.tar_samples or args.tar_samples % args.batch_size):
        parser.error("--source tars: half of --images must be whole tars of --tar_samples, whole batches each")
    return args


def generated_jpegs(folder: Path, count: int) -> list[Path]:
    """Photo-sized (500 x 375) smooth noise JPEGs, for machines without Flickr8k."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    paths = []
    for number in range(count):
        path = folder / f"generated_{number:05d}.jpg"
        if not path.exists():
            coarse = generator.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((500, 375), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def source_images(image_dir: Path | None, count: int, work_dir: Path) -> tuple[list[Path], str]:
    """The first `count` JPEGs of `image_dir` (read in place), or as many generated ones when it is None."""
    if image_dir is None:
        return generated_jpegs(work_dir / "generated", count), f"{count} generated 500x375 JPEGs"
    found = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in (".jpg", ".jpeg"))
    if len(found) < count:
        raise SystemExit(f"--image_dir {image_dir}: {len(found)} JPEGs, the run needs {count}; lower --images")
    return found[:count], f"first {count} JPEGs of {image_dir} (read in place)"


def link_folder(folder: Path, images: list[Path]) -> Path:
    """A folder of symlinks: the encode CLI scans a folder, and the images stay where they are."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for image in images:
        (folder / image.name).symlink_to(image.resolve())
    return folder


def tar_folder(folder: Path, images: list[Path], samples_per_tar: int) -> Path:
    """A folder of webdataset tars holding the JPEGs (each with a caption and a .json), as img2dataset writes them."""
    from clipsearch.tars import write_tar

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for number, start in enumerate(range(0, len(images), samples_per_tar)):
        samples = [(f"{number:05d}{index:04d}", {
            "jpg": path.read_bytes(), "txt": f"a photo, {path.stem}".encode(),
            "json": json.dumps({"url": f"https://example.com/{path.name}", "key": f"{number:05d}{index:04d}"}).encode(),
        }) for index, path in enumerate(images[start : start + samples_per_tar])]
        write_tar(folder / f"{number:05d}.tar", samples)
    return folder


def build_checkpoint(name: str, folder: Path) -> Path:
    from clipsearch.checkpoint import save_bundle
    from clipsearch.models import build_from_spec

    if name == "our":
        from clipsearch.models.pretrained_towers import pretrained_towers_spec

        spec, _ = pretrained_towers_spec()  # EfficientNet-Lite0 at its default 224 px
    else:
        from clipsearch.models.openai_clip import openai_clip_spec

        spec = openai_clip_spec(ARCHITECTURES[name])
    torch.manual_seed(0)
    return save_bundle(build_from_spec(spec), folder / f"{name}.ckpt")


def pipeline_seconds(checkpoint: Path, dataset: Path, emb_path: Path, batch_size: int, workers: int,
                     accelerator: str = "cpu", precision: str = "32", cpu_threads: int | None = None) -> float:
    """Seconds of the CLI's encoding loop (decode, model, shard writing), as its rank record states."""
    from clipsearch.cli import encode

    argv = [
        f"--load_model={checkpoint}", f"--dataset_path={dataset}", f"--emb_path={emb_path}", "--split=folder",
        f"--batch_size={batch_size}", f"--num_workers={workers}", f"--accelerator={accelerator}",
        f"--precision={precision}", "--overwrite", "--no_progress",
        *([f"--cpu_threads={cpu_threads}"] if cpu_threads else []),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        encode.main(argv)
    record = json.loads((emb_path / "rank-0.done.json").read_text())
    return float(record["seconds_this_run"])


def model_only_rate(checkpoint: Path, images: list[Path], batch_size: int, repeats: int,
                    accelerator: str = "cpu", precision: str = "32", cpu_threads: int | None = None) -> dict:
    """Images/s of the embedding stage alone on batches decoded and transformed beforehand (in host
    memory, as the pipeline's batches are: on a GPU the copy to it is part of the stage), with the
    torch threads the encode CLI gives one rank."""
    from clipsearch.checkpoint import load_bundle
    from clipsearch.data import load_image
    from clipsearch.encoding.mapper import ImageEmbedder

    torch.set_num_threads(cpu_threads or os.cpu_count() or 1)
    bundle = load_bundle(checkpoint)
    tensors = torch.stack([bundle.eval_transform(load_image(path)) for path in images])
    on_gpu = accelerator == "gpu"
    batches = [batch.pin_memory() if on_gpu else batch for batch in tensors.split(batch_size)]
    embedder = ImageEmbedder(bundle.model, "cuda" if on_gpu else "cpu", precision)

    def embed_all() -> None:
        for batch in batches:
            embedder(batch)
        if on_gpu:  # the GPU runs behind the host: a time stops when its work is done
            torch.cuda.synchronize()

    embed_all()  # warm-up: first-call allocations and kernel selection
    times = common.interleaved_ms({"model": embed_all}, repeats, warmup=0)["model"]
    return {"images_per_s": round(len(images) / (common.median(times) / 1000), 1), "all_ms": [round(t, 1) for t in times]}


def loader_rate(bundle, dataset: Path, source: str, batch_size: int, split: bool) -> float:
    """Images/s the encoder's loader delivers with one worker and no model: what one worker feeds.

    `split`: the worker stops at uint8 pixels and this process normalises each batch, as the encoder
    does; otherwise the worker runs the whole transform and ships float images (the path of
    transforms that do not split). Includes starting the worker.
    """
    from clipsearch.encoding import reader
    from clipsearch.models.transforms import split_normalize

    transform, normalize = split_normalize(bundle.eval_transform) if split else (bundle.eval_transform, None)
    if source == "tars":
        tars = sorted(str(path) for path in dataset.glob("*.tar"))
        loader = reader.make_tar_loader(list(enumerate(tars)), transform, batch_size, 1)
    else:
        paths = sorted(str(path) for path in dataset.iterdir())
        batches, _ = reader.shard_batches([(0, 0, len(paths))], batch_size)
        loader = reader.make_loader(paths, transform, batches, 1)
    started, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch.image_paths)
        if normalize is not None and batch.image_paths:
            normalize(batch.images)
    return round(count / (time.perf_counter() - started), 1)


def pipeline_row(workers: int, seconds: dict[str, list[float]], model_rates: list[float], images: int,
                 default_workers: int) -> dict:
    """One --num_workers setting's rates; its ratio to the model alone is taken within each repeat.

    Why within: this VM's speed drifts by up to a third from minute to minute, so a steady rate from
    medians over repeats set against a median model rate could land anywhere, even above 1. Repeat r
    ran both pipeline sizes and then the model alone, so `seconds[size][r]` and `model_rates[r]` saw
    the same minute.
    """
    half = images // 2
    short, long = common.median(seconds["short"]), common.median(seconds["long"])
    ratios = sorted(
        (images - half) / max(long_r - short_r, 1e-9) / model_rate
        for short_r, long_r, model_rate in zip(seconds["short"], seconds["long"], model_rates)
    )
    return {
        "num_workers": workers,
        "is_cli_default": workers == default_workers,
        "seconds_short": short,
        "seconds_long": long,
        "whole_run_images_per_s": round(images / long, 1),
        "steady_images_per_s": round((images - half) / max(long - short, 1e-9), 1),
        "ratio_to_model_only": round(common.median(ratios), 3),
        "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        "all_seconds": seconds,
    }


def bench_model(name: str, args, images: list[Path], default_workers: int) -> dict:
    folder = args.work_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(name, folder)
    half = args.images // 2
    if args.source == "tars":
        datasets = {
            "short": tar_folder(folder / "tars_short", images[:half], args.tar_samples),
            "long": tar_folder(folder / "tars_long", images, args.tar_samples),
        }
    else:
        datasets = {
            "short": link_folder(folder / "images_short", images[:half]),
            "long": link_folder(folder / "images_long", images),
        }
    settings = sorted(set(args.workers) | {default_workers})

    from clipsearch.checkpoint import load_bundle

    bundle = load_bundle(checkpoint)
    # One worker alone, uint8 pixels against float images, alternating.
    feed: dict[str, list[float]] = {"uint8": [], "float": []}
    for _ in range(args.repeats):
        for kind in feed:
            feed[kind].append(loader_rate(bundle, datasets["long"], args.source, args.batch_size, kind == "uint8"))
    # Pipeline settings and the ceiling alternate, so outside load hits them alike.
    pipeline: dict[int, dict[str, list[float]]] = {workers: {"short": [], "long": []} for workers in settings}
    model_rates = []
    for repeat in range(args.repeats):
        order = settings[repeat % len(settings):] + settings[: repeat % len(settings)]
        for workers in order:
            for size in ("short", "long"):
                seconds = pipeline_seconds(checkpoint, datasets[size], folder / f"emb_{size}", args.batch_size, workers,
                                           args.accelerator, args.precision, args.cpu_threads)
                pipeline[workers][size].append(seconds)
        model_rates.append(model_only_rate(checkpoint, images, args.batch_size, repeats=1, accelerator=args.accelerator,
                                           precision=args.precision, cpu_threads=args.cpu_threads)["images_per_s"])
    ceiling = sorted(model_rates)[len(model_rates) // 2]

    rows = [pipeline_row(workers, pipeline[workers], model_rates, args.images, default_workers) for workers in settings]
    for row in rows:
        print(json.dumps({name: row}))
    best = max(rows, key=lambda row: row["ratio_to_model_only"])
    return {
        "model": name,
        "image_size": bundle.spec["image"]["size"],
        "batch_size": args.batch_size,
        "model_only_images_per_s": ceiling,
        "model_only_all": model_rates,
        "one_worker_images_per_s": {kind: common.median(rates) for kind, rates in feed.items()},
        "one_worker_all": feed,
        "pipeline": rows,
        "best_num_workers": best["num_workers"],
        "best_ratio": best["ratio_to_model_only"],
        "default_ratio": next(row["ratio_to_model_only"] for row in rows if row["is_cli_default"]),
    }


def ratio_text(row: dict) -> str:
    low, high = row["ratio_range"]
    return f"{row['ratio_to_model_only']:.2f} ({low:.2f} to {high:.2f})"


def report_markdown(results: dict) -> str:
    rows = [
        [model["model"], model["image_size"], model["batch_size"], f"{model['model_only_images_per_s']:.1f}",
         f"{model['one_worker_images_per_s']['uint8']:.0f} / {model['one_worker_images_per_s']['float']:.0f}",
         f"{row['num_workers']}{' (default)' if row['is_cli_default'] else ''}", f"{row['steady_images_per_s']:.1f}",
         f"{row['whole_run_images_per_s']:.1f}", ratio_text(row)]
        for model in results["models"] for row in model["pipeline"]
    ]
    tars = results.get("source") == "tars"
    source = f" in webdataset tars of {results['tar_samples']} samples (+ .txt, .json)" if tars else ""
    threads = results.get("cpu_threads")
    title = "Encoding from webdataset tars" if tars else "Encoding"
    if threads:
        title += f", the model on {threads} of {results['machine']['nproc']} cores"
    return common.report_section(title, results, [
        f"- Images: {results['images_source']}{source}; pipeline = the encode CLI in-process (`--split=folder "
        f"--accelerator={results.get('accelerator', 'cpu')} --precision={results.get('precision', '32')}"
        f"{f' --cpu_threads={threads}' if threads else ''}`), "
        f"steady rate from runs of {results['images'] // 2} and {results['images']} images; "
        "model-only = the same `ImageEmbedder` on pre-decoded tensors; one worker alone = the encoder's "
        "loader with one worker and no model, the worker shipping uint8 pixels (the encoder's way) or float "
        f"images (the whole transform in the worker); median of {results['repeats']} alternating measurements",
        "",
        *common.markdown_table(
            ["model", "image px", "batch", "model-only img/s", "one worker alone img/s: uint8 / float", "--num_workers",
             "pipeline img/s (steady)", "pipeline img/s (whole run)", f"pipeline / model-only, median (range) of repeats (target >= {TARGET_RATIO})"],
            rows, "lrrrrrrrr"),
    ])


def findings(results: dict) -> list[str]:
    return [
        f"- {model['model']}: best --num_workers={model['best_num_workers']} gives {model['best_ratio']:.2f} of the "
        f"model-only rate ({'met' if model['best_ratio'] >= TARGET_RATIO else 'missed'}); the CLI default "
        f"({results['cli_default_num_workers']}) gives {model['default_ratio']:.2f}."
        for model in results["models"]
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)  # as the header reports it
    header = common.run_header()
    images, images_source = source_images(args.image_dir, args.images, args.work_dir)
    from clipsearch.allocator import reuse_freed_memory
    from clipsearch.cli.common import default_num_workers

    # The encode CLI tunes malloc as it starts (allocator.py); the model-only ceiling runs in this same
    # process, so it gets the same allocator from the start, whichever is measured first.
    reuse_freed_memory()
    default_workers = default_num_workers()  # the encode CLI's default for one device
    results = {
        **header,
        "images": args.images,
        "images_source": images_source,
        "source": args.source,
        **({"tar_samples": args.tar_samples} if args.source == "tars" else {}),
        "repeats": args.repeats,
        "accelerator": args.accelerator,
        "precision": args.precision,
        "cpu_threads": args.cpu_threads,
        "cli_default_num_workers": default_workers,
        "models": [bench_model(name, args, images, default_workers) for name in args.models],
    }
    results["load_average_end"] = common.load_average()
    results["command"] = common.command_line("bench_encode.py", argv)
    results["findings"] = findings(results)
    name = ("encode_tars" if args.source == "tars" else "encode") + (f"_threads{args.cpu_threads}" if args.cpu_threads else "")
    common.publish(name, results, report_markdown(results), args.report)
    return results


if __name__ == "__main__":
    main()
