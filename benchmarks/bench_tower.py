"""The default image tower against the network its weights come from, on real photos: agreement and speed.

    .venv/bin/python benchmarks/bench_tower.py --source /path/to/flickr8k   # ~3 minutes on 2 cores

The packaged EfficientNet-Lite0 file converts Google's TensorFlow checkpoint. The reference is
timm's `tf_efficientnet_lite0` given that file's tensors and inputs scaled by mean = std = 0.5,
built here directly from timm. Against it, on Flickr8k dev photos, each tower the project can
build from the same file is scored by pooled-feature cosine and ImageNet top-1 agreement (the
file's own classifier on each tower's features): the old default (`efficientnet_lite0` + ImageNet
statistics), each half of the fix alone, and the new default as `pretrained_towers_spec()` makes it.
Then the forward samples/s of the old and new tower, channels_last on and off, measured
interleaved in one run. With --report, results go to benchmarks/results/tower.json and BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
HALF = [0.5, 0.5, 0.5]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="the unpacked Flickr8k download (Flicker8k_Dataset/ and Flickr_8k.devImages.txt), "
                             "as for dataset/flickr8k/prepare.py")
    parser.add_argument("--images", type=int, default=300, help="dev photos scored")
    parser.add_argument("--size", type=int, default=224, help="input size (the tower's default)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward in the speed test")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=6, help="timed forwards per contender")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


def dev_photos(source: Path, count: int) -> list[Path]:
    folder = next((source / name for name in ("Flicker8k_Dataset", "Flickr8k_Dataset") if (source / name).is_dir()), None)
    split = source / "Flickr_8k.devImages.txt"
    if folder is None or not split.is_file():
        raise SystemExit(f"--source {source}: expected Flicker8k_Dataset/ and Flickr_8k.devImages.txt (the official download)")
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    return [folder / name for name in names[:count]]


def packaged_tensors() -> tuple[list, object, object]:
    """The packaged file's feature tensors in order, and its ImageNet classifier (weight, bias)."""
    import torch

    from clipsearch.models.image_tower import CLASSIFIER_PREFIXES, packaged_image_weights

    state_dict = torch.load(packaged_image_weights("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    features = [value for key, value in state_dict.items() if not key.startswith(CLASSIFIER_PREFIXES)]
    return features, state_dict["_fc.weight"], state_dict["_fc.bias"]


def reference_tower():
    import timm

    tensors, _, _ = packaged_tensors()
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    reference.load_state_dict(dict(zip(reference.state_dict(), tensors)))
    return reference


def project_tower(model_name: str):
    """The tower as the project builds it: its factory and its weight loader, from the packaged file."""
    from clipsearch.models.image_tower import create_image_tower, load_image_weights, packaged_image_weights

    tower = create_image_tower(model_name)
    load_image_weights(tower, model_name, packaged_image_weights("tf_efficientnet_lite0"))
    return tower.eval()


def pooled_features(tower, photos: list[Path], transform, batch_size: int):
    import torch
    from PIL import Image

    rows = []
    with torch.no_grad():
        for start in range(0, len(photos), batch_size):
            pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in photos[start : start + batch_size]])
            rows.append(tower(pixels.contiguous(memory_format=torch.channels_last)))
    return torch.cat(rows)


def agreement(args, photos: list[Path]) -> dict:
    import torch.nn.functional as F
    from torchvision import transforms as T

    from clipsearch.models.pretrained_towers import pretrained_towers_spec
    from clipsearch.models.transforms import IMAGENET_MEAN, IMAGENET_STD, make_image_transform

    _, classifier_weight, classifier_bias = packaged_tensors()
    # The reference's pixels: our eval resize and crop, then TensorFlow Lite's [-1, 1] scaling.
    to_pixels = T.Compose([T.Resize(args.size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(args.size),
                           T.ToTensor(), T.Normalize(HALF, HALF)])
    reference = pooled_features(reference_tower(), photos, to_pixels, args.batch_size)
    reference_top1 = (reference @ classifier_weight.T + classifier_bias).argmax(dim=1)
    default_image = pretrained_towers_spec()[0]["image"]
    contenders = {
        "old: efficientnet_lite0 + ImageNet mean/std": ("efficientnet_lite0", IMAGENET_MEAN, IMAGENET_STD),
        "normalisation fixed only: efficientnet_lite0 + 0.5/0.5": ("efficientnet_lite0", HALF, HALF),
        "architecture fixed only: tf_efficientnet_lite0 + ImageNet mean/std": ("tf_efficientnet_lite0", IMAGENET_MEAN, IMAGENET_STD),
        f"new default: {default_image['timm_name']} + mean {default_image['mean'][0]:g} / std {default_image['std'][0]:g}":
            (default_image["timm_name"], default_image["mean"], default_image["std"]),
    }
    scores = {}
    for name, (model_name, mean, std) in contenders.items():
        features = pooled_features(project_tower(model_name), photos, make_image_transform(args.size, mean, std, is_train=False),
                                   args.batch_size)
        cosine = F.cosine_similarity(features, reference, dim=1)
        top1 = (features @ classifier_weight.T + classifier_bias).argmax(dim=1)
        scores[name] = {"mean_cosine": round(cosine.mean().item(), 4), "min_cosine": round(cosine.min().item(), 4),
                        "top1_agreement_pct": round(100 * (top1 == reference_top1).float().mean().item(), 1),
                        "max_abs_difference": round((features - reference).abs().max().item(), 6)}
        print(name, scores[name], flush=True)
    return scores


def speed(args) -> dict:
    import torch

    images = torch.randn(args.batch_size, 3, args.size, args.size)
    contenders = {}
    for name, model_name in (("old (efficientnet_lite0)", "efficientnet_lite0"), ("new (tf_efficientnet_lite0)", "tf_efficientnet_lite0")):
        for layout, memory_format in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            model = project_tower(model_name).to(memory_format=memory_format)
            batch = images.contiguous(memory_format=memory_format)

            def forward(model=model, batch=batch):
                with torch.no_grad():
                    model(batch)

            contenders[f"{name}, {layout}"] = forward
    times = common.interleaved_ms(contenders, repeats=args.repeats, warmup=1)
    return {name: round(args.batch_size / (common.median(ms) / 1000), 1) for name, ms in times.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    photos = dev_photos(args.source, args.images)
    sys.path.insert(0, str(REPO / "package"))
    import torch

    torch.set_num_threads(args.threads)
    results = {**common.run_header(),
               "settings": {"images": len(photos), "size": args.size, "batch_size": args.batch_size,
                            "threads": args.threads, "repeats": args.repeats}}
    results["agreement_with_reference"] = agreement(args, photos)
    results["forward_samples_per_sec"] = speed(args)
    results["load_average_end"] = common.load_average()
    results["command"] = common.command_line("bench_tower.py", argv)
    common.publish("tower", results, report_markdown(results), args.report)
    return results


def report_markdown(results: dict) -> str:
    settings = results["settings"]
    agreement_rows = "\n".join(
        f"| {name} | {s['mean_cosine']:.3f} | {s['min_cosine']:.3f} | {s['top1_agreement_pct']:.1f} | {s['max_abs_difference']:.2g} |"
        for name, s in results["agreement_with_reference"].items()
    )
    rates = results["forward_samples_per_sec"]
    speed_rows = "\n".join(
        f"| {layout} | {rates[f'old (efficientnet_lite0), {layout}']:.1f} | {rates[f'new (tf_efficientnet_lite0), {layout}']:.1f} | "
        f"{rates[f'new (tf_efficientnet_lite0), {layout}'] / rates[f'old (efficientnet_lite0), {layout}']:.2f} |"
        for layout in ("channels_last", "contiguous")
    )
    return f"""## Image tower: the default against its weights' own network

Command: `{results['command']}`

{common.machine_lines(results)}
The packaged EfficientNet-Lite0 file against timm's `tf_efficientnet_lite0` given the same tensors
and inputs scaled by mean = std = 0.5 (the network and input scaling the TensorFlow checkpoint was
trained with), on {settings['images']} Flickr8k dev photos at {settings['size']} px. Top-1: the file's
own ImageNet classifier applied to each tower's pooled features, compared with the reference's.

| tower as built from the file | mean cosine | min cosine | ImageNet top-1 agreement % | max abs difference |
|---|---:|---:|---:|---:|
{agreement_rows}

Forward samples/s, batch {settings['batch_size']}, {settings['threads']} threads, median of {settings['repeats']}
forwards, old and new measured interleaved in one run. The machine was shared with other jobs
(load average above), so the absolute figures are low and noisy; the ratios are the result.

| layout | old | new | new / old |
|---|---:|---:|---:|
{speed_rows}
"""


if __name__ == "__main__":
    main()
