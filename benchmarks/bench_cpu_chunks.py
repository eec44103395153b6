"""Image towers on a CPU: a few images per call against the whole batch, caching with or without a decoder, training in slices.

    .venv/bin/python benchmarks/bench_cpu_chunks.py --image_dir ../shared/data/flickr8k/Flicker8k_Dataset   # ~5 minutes on 2 cores

Part 1, the towers: `embed_images`, which every image encoding goes through (validation,
`4_evaluate.sh`, `2_inference_encode.sh`, image queries) and which on a CPU calls the tower on
`CPU_IMAGE_CHUNK` images at a time, against its peer, the same tower in eval mode called once on
the whole batch (what it did before). Both run interleaved in one process, on random 224 px
inputs, for each kind of tower the project builds: EfficientNet-Lite0 (the default), Lite2,
OpenAI's ViT-B/32 and RN50 (random weights: speed does not depend on them).

Part 2, the image cache of `--cache_image_views`: the locked stages of EfficientNet-Lite2 with 4
trained groups, 3 mirrored crops of each photo, built the way the trainer builds it (in one process
on a CPU) against one decoding worker process beside it (what `--num_workers 1` gave before).
Part 3, training: the trained stages of that Lite2 tower (from cached inputs, with stochastic
depth 0.2 as the Flickr8k recipe trains them), forward and backward over a batch of 256 in slices of
`CPU_TRAIN_IMAGE_SLICE` (the default of `--cpu_image_slice`), in slices of 128 (the default before)
and in one call over the whole batch, at 224 and 256 px.
With --report, results go to benchmarks/results/cpu_chunks.json and BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
TOWERS = {  # name in the report -> how to build its spec
    "EfficientNet-Lite0 (default)": ("pretrained_towers", "tf_efficientnet_lite0"),
    "EfficientNet-Lite2": ("pretrained_towers", "tf_efficientnet_lite2"),
    "OpenAI ViT-B/32": ("openai", "ViT-B/32"),
    "OpenAI RN50": ("openai", "RN50"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", type=Path, required=True, help="a folder of photos for the cache part (e.g. Flickr8k's)")
    parser.add_argument("--batch_size", type=int, default=128, help="images per embed_images call (validation's batch)")
    parser.add_argument("--size", type=int, default=224, help="input size")
    parser.add_argument("--cache_images", type=int, default=300, help="photos cached in each way")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per contender")
    parser.add_argument("--train_batch_size", type=int, default=256, help="images per training step in part 3")
    parser.add_argument("--train_sizes", default="224,256", help="input sizes of part 3, comma-separated")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


def build_model(kind: str, name: str, size: int, **options):
    from clipsearch.models import build_from_spec
    from clipsearch.models.openai_clip import openai_clip_spec
    from clipsearch.models.pretrained_towers import pretrained_towers_spec

    if kind == "openai":
        return build_from_spec(openai_clip_spec(name, image_size=size))
    return build_from_spec(pretrained_towers_spec(image_model=name, image_size=size, **options)[0])


def tower_speeds(args) -> dict:
    import torch

    from clipsearch.models.bundle import embed_images

    images = torch.randn(args.batch_size, 3, args.size, args.size)
    results = {}
    for label, (kind, name) in TOWERS.items():
        model = build_model(kind, name, args.size).model.eval()

        def chunked(model=model):
            with torch.inference_mode():
                embed_images(model, images)

        def whole(model=model):
            with torch.inference_mode():
                model.encode_image(images)

        times = common.interleaved_ms({"chunked": chunked, "whole": whole}, repeats=args.repeats, warmup=1)
        results[label] = {way: round(common.median(ms) / args.batch_size, 2) for way, ms in times.items()}
        print(label, results[label], flush=True)
    return results


def cache_speeds(args) -> dict:
    from clipsearch.image_cache import ImageFeatureCache
    from clipsearch.models.transforms import with_random_mirror

    photos = sorted(str(path) for path in args.image_dir.iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = photos[: args.cache_images]
    if not photos:
        raise SystemExit(f"--image_dir {args.image_dir}: no .jpg or .png photos")
    bundle = build_model("pretrained_towers", "tf_efficientnet_lite2", args.size)
    bundle.model.lock_image_tower(unlocked_groups=4)
    split = bundle.model.image_cache_split(args.size)
    bundle.model.eval()
    transform = with_random_mirror(bundle.train_transform)
    results = {}
    for label, workers in (("in one process (the trainer on a CPU)", 0), ("one decoding worker beside it", 1)):
        cache = ImageFeatureCache(tempfile.mkdtemp(prefix="bench-cache-"), photos, views=3, identity={"bench": 1})
        started = time.perf_counter()
        cache.build(split, transform, rank=0, seed=0, image_size=args.size, batch_size=args.batch_size,
                    num_workers=workers)
        seconds = time.perf_counter() - started
        results[label] = round(1000 * seconds / len(photos), 1)
        print(label, results[label], "ms per photo", flush=True)
    return results


def training_speeds(args) -> dict:
    """Per input size: milliseconds per image for each way of calling the trained stages."""
    import torch

    from clipsearch.models.bundle import in_cpu_chunks
    from clipsearch.train_config import CPU_TRAIN_IMAGE_SLICE

    results = {}
    for size in (int(text) for text in args.train_sizes.split(",")):
        model = build_model("pretrained_towers", "tf_efficientnet_lite2", size, image_drop_path=0.2).model
        model.lock_image_tower(unlocked_groups=4)
        split = model.image_cache_split(size)
        model.train()
        with torch.no_grad():
            cached = in_cpu_chunks(split.prefix, torch.randn(args.train_batch_size, 3, size, size))

        def step(slice_size: int, model=model, cached=cached):
            model.zero_grad(set_to_none=True)
            in_cpu_chunks(model.encode_cached_image, cached, slice_size).square().mean().backward()

        ways = {"whole": args.train_batch_size, "slices of 128": 128, f"slices of {CPU_TRAIN_IMAGE_SLICE}": CPU_TRAIN_IMAGE_SLICE}
        times = common.interleaved_ms({way: (lambda n=n: step(n)) for way, n in ways.items()},
                                      repeats=args.repeats, warmup=1)
        results[str(size)] = {way: round(common.median(ms) / args.train_batch_size, 2) for way, ms in times.items()}
        print("training", size, results[str(size)], flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "package"))
    import torch

    torch.set_num_threads(args.threads)
    from clipsearch.models.bundle import CPU_IMAGE_CHUNK
    from clipsearch.train_config import CPU_TRAIN_IMAGE_SLICE

    results = {**common.run_header(),
               "settings": {"batch_size": args.batch_size, "size": args.size, "chunk": CPU_IMAGE_CHUNK,
                            "threads": args.threads, "repeats": args.repeats, "cache_images": args.cache_images,
                            "train_batch_size": args.train_batch_size, "train_slice": CPU_TRAIN_IMAGE_SLICE,
                            "train_sizes": args.train_sizes}}
    results["ms_per_image"] = tower_speeds(args)
    results["cache_ms_per_photo"] = cache_speeds(args)
    results["training_ms_per_image"] = training_speeds(args)
    results["load_average_end"] = common.load_average()
    results["command"] = common.command_line("bench_cpu_chunks.py", argv)
    speedups = {label: times["whole"] / times["chunked"] for label, times in results["ms_per_image"].items()}
    cache = list(results["cache_ms_per_photo"].values())
    training = results["training_ms_per_image"]
    results["findings"] = [
        f"- A few images per call are {min(speedups.values()):.2f}x to {max(speedups.values()):.2f}x faster per "
        f"image than the whole batch of {args.batch_size}, for every tower.",
        f"- The cache is {cache[1] / cache[0]:.2f}x faster built in one process than with a decoder beside it.",
        *(f"- At {size} px, training the trained stages in slices of {CPU_TRAIN_IMAGE_SLICE} is "
          f"{ways['whole'] / ways[f'slices of {CPU_TRAIN_IMAGE_SLICE}']:.2f}x faster per image than one call over "
          f"{args.train_batch_size}, and {ways['slices of 128'] / ways[f'slices of {CPU_TRAIN_IMAGE_SLICE}']:.2f}x "
          "faster than slices of 128." for size, ways in training.items()),
    ]
    common.publish("cpu_chunks", results, report_markdown(results), args.report)
    return results


def report_markdown(results: dict) -> str:
    settings = results["settings"]
    tower_rows = [[label, f"{t['whole']:.1f}", f"{t['chunked']:.1f}", f"{t['whole'] / t['chunked']:.2f}"]
                  for label, t in results["ms_per_image"].items()]
    cache_rows = [[label, f"{ms:.1f}"] for label, ms in results["cache_ms_per_photo"].items()]
    training = results["training_ms_per_image"]
    body = [
        "",
        f"Milliseconds per {settings['size']} px image in eval mode, median of {settings['repeats']} calls on a batch of "
        f"{settings['batch_size']}, the two ways interleaved. \"{settings['chunk']} at a time\" is `embed_images` "
        "(validation, evaluation, encoding, image queries); the peer calls the tower once on the whole batch.",
        "",
        *common.markdown_table(["tower (random weights)", f"whole batch of {settings['batch_size']}",
                                f"{settings['chunk']} at a time", "speed-up"], tower_rows, "lrrr"),
        "",
        f"Caching the locked stages of EfficientNet-Lite2 (4 trained groups, 3 mirrored crops of each of "
        f"{settings['cache_images']} Flickr8k photos), milliseconds per photo:",
        "",
        *common.markdown_table(["how", "ms per photo"], cache_rows, "lr"),
        "",
        f"Training those trained stages (stochastic depth 0.2) from cached inputs, forward and backward over a batch of "
        f"{settings['train_batch_size']}, milliseconds per image, median of {settings['repeats']} steps interleaved:",
        "",
        *common.markdown_table(
            ["size", f"one call over {settings['train_batch_size']}", "slices of 128",
             f"slices of {settings['train_slice']} (`--cpu_image_slice` default)"],
            [[f"{size} px", *(f"{ms:.1f}" for ms in ways.values())] for size, ways in training.items()], "lrrr"),
    ]
    return common.report_section("Image towers on a CPU: a few images per call", results, body)


if __name__ == "__main__":
    main()
