"""Near-duplicates: precision and recall on real photos and their altered copies, and the time of a 1M-row collection.

    .venv/bin/python benchmarks/bench_duplicates.py --part photos --source <Flickr8k>/Flicker8k_Dataset
    .venv/bin/python benchmarks/bench_duplicates.py --part scale                # 1M x 512, planted pairs
    .venv/bin/python benchmarks/bench_duplicates.py --part report --report      # the section from results/

photos: --photos distinct photos are drawn (seeded) from --source; the first --with_copies of them
get four copies each (resized to half, re-encoded as JPEG quality 25, cropped to the centre 80%,
colour-shifted: saturation x1.6, brightness x1.15, a warm cast). The set is written under the
scratch folder (never into the repository), encoded by each model of --models, and `clipsearch
duplicates` (exact) runs at each threshold: a pair is right when both images come from one
photo. Models: `towers` is the packaged EfficientNet-Lite0 image tower at 224 px (ImageNet
weights) under the project's untrained projection, `models/...ckpt` any checkpoint (the sample
data's first run: the same tower trained 150 steps on 96 px shapes).

scale: --rows unit vectors around 1000 themes, --planted of them near copies (cosine 0.90-0.995)
of as many others, all among the first rows; the command's search through a temporary IVF index
(built for the run) against exact all-pairs on the first --exact_rows rows (the peer, same run),
and on all rows the time and the planted pairs found at each of --nprobes.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F
from bench_filters import themed_rows

NAME = "duplicates"
COPY_KINDS = ("resized", "jpeg", "crop", "colour")
THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("photos", "scale", "report"), required=True, help="which measurement")
    photos = parser.add_argument_group("photos")
    photos.add_argument("--source", default=None, help="a folder of real photos (Flickr8k's Flicker8k_Dataset)")
    photos.add_argument("--photos", type=int, default=600, help="distinct photos drawn")
    photos.add_argument("--with_copies", type=int, default=150, help="photos that get four altered copies each")
    photos.add_argument("--models", default="towers,models/latest/best.ckpt",
                        help="comma-separated: 'towers' (packaged image tower, untrained projection) or checkpoints")
    scale = parser.add_argument_group("scale")
    scale.add_argument("--rows", type=int, default=1_000_000, help="collection size")
    scale.add_argument("--dim", type=int, default=512, help="embedding dimension")
    scale.add_argument("--planted", type=int, default=10_000, help="near copies planted among the rows")
    scale.add_argument("--exact_rows", type=int, default=50_000, help="rows of the exact all-pairs peer")
    scale.add_argument("--threshold", type=float, default=0.9, help="cosine threshold of the scale run")
    scale.add_argument("--nprobes", default="1,4", help="IVF lists probed per row, each timed on the full run (the "
                       "command's default is always among them)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--work_dir", default=str(common.work_dir(NAME)), help="scratch folder (the photo set, encodings)")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Photos and their altered copies
# ---------------------------------------------------------------------------------------------


def altered(image, kind: str):
    from PIL import Image, ImageEnhance

    if kind == "resized":
        return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.BICUBIC), 90
    if kind == "jpeg":
        return image, 25
    if kind == "crop":
        dx, dy = image.width // 10, image.height // 10
        return image.crop((dx, dy, image.width - dx, image.height - dy)), 90
    shifted = ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(1.6)).enhance(1.15)
    red, green, blue = shifted.split()
    red, blue = red.point(lambda value: min(255, int(value * 1.1))), blue.point(lambda value: int(value * 0.88))
    return Image.merge("RGB", (red, green, blue)), 90


def make_photo_set(args, folder: Path) -> dict[str, str]:
    """The set on disk: {image path: the photo it comes from}; made once per (source, sizes, seed)."""
    from PIL import Image

    record = folder / "set.json"
    wanted = {"source": str(Path(args.source).resolve()), "photos": args.photos, "with_copies": args.with_copies,
              "seed": args.seed}
    if record.is_file() and json.loads(record.read_text()).get("made_from") == wanted:
        return json.loads(record.read_text())["origin"]
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "photos").mkdir(parents=True)
    (folder / "copies").mkdir()
    sources = sorted(path for path in Path(args.source).iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    chosen = random.Random(args.seed).sample(sources, args.photos)
    origin = {}
    for number, source in enumerate(chosen):
        target = folder / "photos" / source.name
        shutil.copyfile(source, target)
        origin[str(target)] = source.name
        if number < args.with_copies:
            with Image.open(source) as image:
                image = image.convert("RGB")
                for kind in COPY_KINDS:
                    copy, quality = altered(image, kind)
                    path = folder / "copies" / f"{source.stem}-{kind}.jpg"
                    copy.save(path, quality=quality)
                    origin[str(path)] = source.name
    record.write_text(json.dumps({"made_from": wanted, "origin": origin}, indent=1))
    return origin


def towers_checkpoint(folder: Path) -> Path:
    """The packaged EfficientNet-Lite0 and MiniLM towers at 224 px under the project's (untrained) projections."""
    from clipsearch.checkpoint import save_bundle
    from clipsearch.models import build_from_spec
    from clipsearch.models.image_tower import load_image_weights
    from clipsearch.models.pretrained_towers import load_text_weights, pretrained_towers_spec

    path = folder / "towers-224.ckpt"
    if not path.is_file():
        torch.manual_seed(0)
        spec, _ = pretrained_towers_spec(image_model="tf_efficientnet_lite0", image_size=224)
        bundle = build_from_spec(spec)
        load_text_weights(bundle.model, spec["text"]["source"])
        load_image_weights(bundle.model.visual, "tf_efficientnet_lite0", None)
        save_bundle(bundle, path)
    return path


def pair_scores(groups: list[list[int]], photo_of: list[str]) -> tuple[int, int, int]:
    """(pairs predicted, of them right, pairs there are): every pair inside a group against every pair of one photo."""
    predicted = {(a, b) for group in groups for a in group for b in group if a < b}
    right = sum(photo_of[a] == photo_of[b] for a, b in predicted)
    families: dict[str, int] = {}
    for photo in photo_of:
        families[photo] = families.get(photo, 0) + 1
    return len(predicted), right, sum(size * (size - 1) // 2 for size in families.values())


def bench_photos(args) -> dict:
    from clipsearch.cli.encode import main as encode_main
    from clipsearch.near_duplicates import find_duplicates
    from clipsearch.store import load_collection

    if not args.source:
        raise SystemExit("--part photos needs --source <a folder of real photos>")
    work = Path(args.work_dir)
    origin = make_photo_set(args, work / "set")
    results = {"photos": args.photos, "with_copies": args.with_copies, "images": len(origin), "models": {}}
    for model in [name.strip() for name in args.models.split(",") if name.strip()]:
        checkpoint = towers_checkpoint(work) if model == "towers" else Path(model)
        if not checkpoint.exists():
            print(f"skipping {model}: {checkpoint} not found")
            continue
        emb_path = work / f"emb-{model.replace('/', '_')}"
        encode_main(["--load_model", str(checkpoint), "--dataset_path", str(work / "set"), "--emb_path", str(emb_path),
                     "--split", "folder", "--no_progress"])
        collection = load_collection(emb_path)
        photo_of = [origin[path] for path in collection.paths]
        embeddings = collection.embeddings.contiguous()
        # How alike each kind of copy stays to its photo, and how alike distinct photos come.
        row_of = {path: row for row, path in enumerate(collection.paths)}
        originals = {name: row_of[path] for path, name in origin.items() if "/photos/" in path}
        cosines = {}
        for kind in COPY_KINDS:
            pairs = [(row_of[path], originals[name]) for path, name in origin.items() if path.endswith(f"-{kind}.jpg")]
            values = [float(embeddings[a] @ embeddings[b]) for a, b in pairs]
            cosines[kind] = {"median": round(float(np.median(values)), 4), "min": round(min(values), 4)}
        distinct = embeddings[list(originals.values())]
        similarity = distinct @ distinct.T
        similarity.fill_diagonal_(-1)
        nearest = similarity.max(dim=1).values
        cosines["distinct photos, nearest other"] = {"median": round(float(nearest.median()), 4),
                                                     "max": round(float(nearest.max()), 4)}
        by_threshold = {}
        for threshold in THRESHOLDS:
            report = find_duplicates(embeddings, threshold, exact=True)
            groups = [group.rows for group in report.groups]
            predicted, right, truth = pair_scores(groups, photo_of)
            group_of = {row: number for number, group in enumerate(groups) for row in group}
            kind_recall = {}
            for kind in COPY_KINDS:
                copies = [(row_of[path], originals[name]) for path, name in origin.items() if path.endswith(f"-{kind}.jpg")]
                joined = sum(group_of.get(copy, -1) == group_of.get(original, -2) for copy, original in copies)
                kind_recall[kind] = round(joined / len(copies), 3)
            by_threshold[str(threshold)] = {
                "groups": len(groups), "pairs_predicted": predicted, "pairs_right": right, "pairs_true": truth,
                "precision": round(right / predicted, 4) if predicted else None,
                "recall": round(right / truth, 4) if truth else None, "recall_by_copy": kind_recall,
                "seconds": report.seconds,
            }
            print(json.dumps({"model": model, "threshold": threshold, **by_threshold[str(threshold)]}))
        results["models"][model] = {"checkpoint": str(checkpoint), "cosines": cosines, "thresholds": by_threshold}
    return results


# ---------------------------------------------------------------------------------------------
# A million rows
# ---------------------------------------------------------------------------------------------


def planted_rows(args, generator: torch.Generator) -> torch.Tensor:
    """Unit rows around 1000 themes; rows planted..2*planted are near copies (cosine 0.90-0.995) of the first."""
    matrix, _ = themed_rows(args.rows, args.dim, 1000, generator)
    # cos = 1 / sqrt(1 + e^2): e from 0.1 to 0.484 puts each copy at 0.90-0.995 of its original.
    strength = 0.1 + 0.384 * torch.rand(args.planted, 1, generator=generator)
    noise = F.normalize(torch.randn(args.planted, args.dim, generator=generator), dim=-1)
    originals = matrix[: args.planted]
    noise = F.normalize(noise - (noise * originals).sum(1, keepdim=True) * originals, dim=-1)  # orthogonal to the original
    matrix[args.planted : 2 * args.planted] = F.normalize(originals + strength * noise, dim=-1)
    return matrix


def temporary_index(embeddings: torch.Tensor):
    """The index `clipsearch duplicates` builds for a large collection without one of its own."""
    from clipsearch.index import build_index
    from clipsearch.near_duplicates import DUPLICATE_NPROBE

    paths = [str(row) for row in range(embeddings.shape[0])]
    from clipsearch.store import order_fingerprint

    return build_index(embeddings, order_fingerprint(paths, embeddings.shape[1]), kind="ivf_sq8", recall_queries=0,
                       nprobe=DUPLICATE_NPROBE)


def through_index(embeddings: torch.Tensor, threshold: float, nprobes: list[int]) -> tuple[dict, dict[int, set]]:
    """The command's path for a large collection: a temporary index, then each row's range search, at each nprobe."""
    from clipsearch.near_duplicates import find_duplicates

    started = time.perf_counter()
    index = temporary_index(embeddings)
    built = time.perf_counter() - started
    timing = {"index": index.info["factory"], "build_s": round(built, 1), "pairs_s": {}}
    found = {}
    for nprobe in nprobes:
        index.set_nprobe(nprobe)
        report = find_duplicates(embeddings, threshold, index=index, exact=False, nprobe=nprobe)
        found[nprobe] = {(a, b) for group in report.groups for a in group.rows for b in group.rows if a < b}
        timing["pairs_s"][str(nprobe)] = round(report.seconds, 1)
        print(json.dumps({"rows": embeddings.shape[0], "nprobe": nprobe, "seconds": report.seconds, "pairs": len(found[nprobe])}))
    return timing, found


def bench_scale(args) -> dict:
    from clipsearch.near_duplicates import DUPLICATE_NPROBE, find_duplicates

    generator = torch.Generator().manual_seed(args.seed)
    matrix = planted_rows(args, generator)
    nprobes = sorted({int(value) for value in args.nprobes.split(",")} | {DUPLICATE_NPROBE})
    results = {"rows": args.rows, "dim": args.dim, "planted": args.planted, "threshold": args.threshold,
               "default_nprobe": DUPLICATE_NPROBE}
    # The peer: every pair of the first rows compared (the planted pairs among them), against the index path on the same rows.
    subset = matrix[: args.exact_rows]
    exact = find_duplicates(subset, args.threshold, exact=True)
    exact_pairs = {(a, b) for group in exact.groups for a in group.rows for b in group.rows if a < b}
    index_timing, index_pairs = through_index(subset, args.threshold, [DUPLICATE_NPROBE])
    found = index_pairs[DUPLICATE_NPROBE]
    results["subset"] = {
        "rows": args.exact_rows, "exact_s": exact.seconds, "exact_pairs": len(exact_pairs), "index": index_timing,
        "index_pair_recall": round(len(found & exact_pairs) / max(1, len(exact_pairs)), 4),
        "index_pair_precision": round(len(found & exact_pairs) / max(1, len(found)), 4),
    }
    print(json.dumps({"subset": results["subset"]}))
    timing, pairs = through_index(matrix, args.threshold, nprobes)
    planted = {(row, args.planted + row) for row in range(args.planted)}
    results["full"] = {**timing,
                       "planted_pairs_found": {str(nprobe): round(len(found & planted) / len(planted), 4) for nprobe, found in pairs.items()},
                       "other_pairs": {str(nprobe): len(found - planted) for nprobe, found in pairs.items()},
                       "exact_s_extrapolated": round(exact.seconds * (args.rows / args.exact_rows) ** 2)}
    print(json.dumps({"full": results["full"]}))
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    body = []
    photos = results.get("photos")
    if photos:
        body += ["", f"**Altered copies of real photos.** {photos['photos']} distinct Flickr8k photos, {photos['with_copies']} of "
                 f"them with four copies each ({', '.join(COPY_KINDS)}): {photos['images']} images, exact search of every "
                 "pair. Precision and recall over pairs of images from one photo. Command: "
                 f"`{photos['command']}`; load average {photos['load_average_start']} -> {photos['load_average_end']}.", ""]
        for model, measured in photos["models"].items():
            rows = []
            for threshold, values in measured["thresholds"].items():
                rows.append([threshold, values["groups"], values["precision"], values["recall"],
                             *(values["recall_by_copy"][kind] for kind in COPY_KINDS)])
            cosines = measured["cosines"]
            scored = [(2 * v["precision"] * v["recall"] / (v["precision"] + v["recall"]), threshold, v)
                      for threshold, v in measured["thresholds"].items() if v["precision"] and v["recall"]]
            best = max(scored, default=None)
            best_line = (f" Best F1 at threshold {best[1]}: precision {best[2]['precision']}, recall {best[2]['recall']}."
                         if best else "")
            body += [f"Model `{model}` (`{measured['checkpoint']}`): median cosine of a copy to its photo "
                     + ", ".join(f"{kind} {cosines[kind]['median']}" for kind in COPY_KINDS)
                     + f"; a distinct photo's nearest other photo: median {cosines['distinct photos, nearest other']['median']}, "
                     f"max {cosines['distinct photos, nearest other']['max']}.{best_line}", "",
                     *common.markdown_table(["threshold", "groups", "precision", "recall",
                                             *(f"recall {kind}" for kind in COPY_KINDS)], rows, "r" * (4 + len(COPY_KINDS))), ""]
    scale = results.get("scale")
    if scale:
        subset, full = scale["subset"], scale["full"]
        rows = [[f"{subset['rows']:,}", "exact, every pair", subset["exact_s"], "1 / 1", "-"],
                [f"{subset['rows']:,}", f"index ({subset['index']['index']}, nprobe {scale['default_nprobe']})",
                 f"{subset['index']['build_s']} + {subset['index']['pairs_s'][str(scale['default_nprobe'])]}",
                 f"{subset['index_pair_recall']} / {subset['index_pair_precision']}", "-"]]
        for nprobe, seconds in full["pairs_s"].items():
            rows.append([f"{scale['rows']:,}", f"index ({full['index']}, nprobe {nprobe})", f"{full['build_s']} + {seconds}",
                         "-", f"{full['planted_pairs_found'][nprobe]} ({full['other_pairs'][nprobe]} other pairs)"])
        rows.append([f"{scale['rows']:,}", "exact, every pair (extrapolated from the subset)", full["exact_s_extrapolated"], "-", "-"])
        body += [f"**{scale['rows']:,} rows.** {scale['rows']:,} x {scale['dim']} unit vectors around 1000 themes with "
                 f"{scale['planted']:,} planted near copies (cosine 0.90-0.995), threshold {scale['threshold']}; seconds are "
                 f"index build + range search. Command: `{scale['command']}`; load average {scale['load_average_start']} -> "
                 f"{scale['load_average_end']}.", "",
                 *common.markdown_table(["rows", "method", "seconds", "pairs vs exact (recall / precision)",
                                         "planted pairs found"], rows, "llrll"), ""]
    results.setdefault("findings", [])
    return common.report_section("Near-duplicates", results, body)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    path = (common.RESULTS_DIR if args.report else common.SCRATCH_DIR) / f"{NAME}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if args.part == "report":
        stored = stored or json.loads((common.RESULTS_DIR / f"{NAME}.json").read_text())
    else:
        header = {**common.run_header(), "command": common.command_line("bench_duplicates.py", argv)}
        measured = bench_photos(args) if args.part == "photos" else bench_scale(args)
        stored = {**stored, **header, args.part: {**header, **measured, "load_average_end": common.load_average()}}
    stored["load_average_end"] = common.load_average()
    stored["command"] = " and ".join(stored[part]["command"] for part in ("photos", "scale") if part in stored)
    common.publish(NAME, stored, markdown(stored), args.report)
    return stored


if __name__ == "__main__":
    main()
