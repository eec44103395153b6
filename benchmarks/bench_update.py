"""Incremental encoding: an update cycle (add, modify, delete) against a full re-encode, both through the real CLI.

    .venv/bin/python benchmarks/bench_update.py                  # 1000 Flickr8k JPEGs; +50, 10 modified, -10
    .venv/bin/python benchmarks/bench_update.py --images 200 --model vit-tiny --no_report

The collection is a folder of symlinks to real JPEGs (Flickr8k read in place; generated JPEGs when
it is absent); a modified image replaces its link with a re-saved copy, so the shared files are
never touched. Each step runs `python -m clipsearch.cli.encode` as a user would, in a fresh
process, and is timed from start to exit (model loading included). The update and the full
re-encode (`--overwrite`, same folder state) must give the same collection; the script checks it.
Results go to benchmarks/results/encode_update.json and the "Encoding: updates" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_encode import FLICKR_IMAGES, build_checkpoint, generated_jpegs
from common import load_average, machine_info, machine_lines, now_iso, update_report_section, write_results

WORK_DIR = Path("/tmp/clipsearch-bench-update")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images in the first encode")
    parser.add_argument("--add", type=int, default=50, help="images added before the update")
    parser.add_argument("--modify", type=int, default=10, help="images rewritten before the update")
    parser.add_argument("--delete", type=int, default=10, help="images deleted before the update")
    parser.add_argument("--model", default="our", choices=("our", "vit-tiny"), help="random-weight model to encode with")
    parser.add_argument("--image_dir", type=Path, default=FLICKR_IMAGES, help="JPEGs read in place")
    parser.add_argument("--work_dir", type=Path, default=WORK_DIR, help="scratch folder")
    parser.add_argument("--no_report", action="store_true", help="write the JSON only, leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def encode_seconds(checkpoint: Path, dataset: Path, emb_path: Path, *extra: str) -> tuple[float, dict, str]:
    command = [
        sys.executable, "-m", "clipsearch.cli.encode", f"--load_model={checkpoint}", f"--dataset_path={dataset}",
        f"--emb_path={emb_path}", "--accelerator=cpu", "--no_progress", *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO / "package")})
    seconds = time.perf_counter() - started
    manifest = json.loads((emb_path / "manifest.json").read_text())
    shown = " ".join(["python -m clipsearch.cli.encode", *command[3:]])
    return round(seconds, 2), manifest, shown


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_start = load_average()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    total = args.images + args.add
    found = sorted(path for path in args.image_dir.glob("*.jpg")) if args.image_dir.is_dir() else []
    sources = found[:total] if len(found) >= total else generated_jpegs(args.work_dir / "generated", total)
    dataset = args.work_dir / "photos"
    dataset.mkdir()
    for source in sources[: args.images]:
        (dataset / source.name).symlink_to(source.resolve())
    checkpoint = build_checkpoint(args.model, args.work_dir)
    emb_path, full_path = args.work_dir / "emb", args.work_dir / "emb_full"

    first, manifest, first_command = encode_seconds(checkpoint, dataset, emb_path)
    assert manifest["counts"]["encoded"] == args.images
    first_shards = {path: path.stat().st_mtime_ns for path in emb_path.glob("*.ckpt")}

    from PIL import Image

    links = sorted(dataset.iterdir())
    for source in sources[args.images :]:
        (dataset / source.name).symlink_to(source.resolve())
    for link in links[: args.modify]:
        image = Image.open(link).convert("RGB").rotate(180)
        link.unlink()
        image.save(link, quality=90)  # a new file in place of the link: new size and mtime
    for link in links[-args.delete :] if args.delete else []:
        link.unlink()

    update, manifest, update_command = encode_seconds(checkpoint, dataset, emb_path)
    full, full_manifest, full_command = encode_seconds(checkpoint, dataset, full_path, "--overwrite")
    expected = args.images + args.add - args.delete
    assert manifest["counts"]["encoded"] == full_manifest["counts"]["encoded"] == expected
    assert manifest["this_update"]["encoded"] == args.add + args.modify
    assert {path: path.stat().st_mtime_ns for path in first_shards} == first_shards  # old shards untouched

    from clipsearch.store import load_collection

    updated, fresh = load_collection(emb_path), load_collection(full_path)
    assert sorted(updated.paths) == sorted(fresh.paths)
    rows = {path: row for row, path in enumerate(fresh.paths)}
    worst = max(
        float((updated.embeddings[row] - fresh.embeddings[rows[path]]).abs().max()) for row, path in enumerate(updated.paths)
    )
    results = {
        "date": now_iso(),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "model": args.model,
        "images": args.images,
        "changes": {"added": args.add, "modified": args.modify, "deleted": args.delete},
        "commands": {"first": first_command, "update": update_command, "full": full_command},
        "seconds": {"first_encode": first, "update": update, "full_re_encode": full},
        "encode_loop_seconds": {
            "update": manifest["this_update"]["seconds"],
            "full_re_encode": full_manifest["this_update"]["seconds"],
        },
        "update_encoded": manifest["this_update"]["encoded"],
        "update_dropped": manifest["this_update"]["removed"],
        "max_abs_difference_update_vs_full": worst,
        "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/bench_update.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
    }
    path = write_results("encode_update", results)
    if not args.no_report:
        update_report_section("encode_update", report_markdown(results))
    print(json.dumps(results["seconds"]), f"wrote {path}")
    return results


def report_markdown(results: dict) -> str:
    seconds, loop, changes = results["seconds"], results["encode_loop_seconds"], results["changes"]
    return "\n".join([
        "## Encoding: updates",
        "",
        f"Command: `{results['command']}`",
        "",
        machine_lines(results).rstrip(),
        f"- {results['images']} Flickr8k JPEGs encoded with the `{results['model']}` model (random weights), then "
        f"{changes['added']} added, {changes['modified']} modified, {changes['deleted']} deleted; each step is the "
        "real CLI in a fresh process, timed start to exit (model loading included)",
        "",
        "| step | command | wall s | encode loop s | images encoded |",
        "|---|---|---:|---:|---:|",
        f"| first encode | `{results['commands']['first']}` | {seconds['first_encode']:.1f} | | {results['images']} |",
        f"| update | same command again | {seconds['update']:.1f} | {loop['update']:.1f} | {results['update_encoded']} |",
        f"| full re-encode | same command, `--overwrite`, into a new folder | {seconds['full_re_encode']:.1f} | "
        f"{loop['full_re_encode']:.1f} | {results['images'] + changes['added'] - changes['deleted']} |",
        "",
        f"- The update gives the same collection as the full re-encode (largest difference in any embedding "
        f"{results['max_abs_difference_update_vs_full']:.1e}); it dropped {results['update_dropped']} rows "
        "(deleted and modified images) and rewrote no old shard (checked). Wall time minus the encode loop is "
        "start-up (imports and model loading), the same for every step.",
    ]) + "\n"


if __name__ == "__main__":
    main()
