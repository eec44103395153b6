"""Incremental encoding: an update cycle (add, modify, delete) against a full re-encode, both through the real CLI.

    .venv/bin/python benchmarks/bench_update.py                  # 1000 generated JPEGs; +50, 10 modified, -10
    .venv/bin/python benchmarks/bench_update.py --images 200 --model vit-tiny \
        --image_dir ../shared/data/flickr8k/Flicker8k_Dataset   # real photos, read in place

The collection is a folder of symlinks to JPEGs (those of --image_dir read in place, or generated
ones); a modified image replaces its link with a re-saved copy, so the shared files are
never touched. Each step runs `python -m clipsearch.cli.encode` as a user would, in a fresh
process, and is timed from start to exit (model loading included). The update and the full
re-encode (`--overwrite`, same folder state) must give the same collection; the script checks it.
Two reruns with nothing changed then time the plain size-and-mtime comparison against
`--recheck_content`, which also hashes every file.
With --report, results go to benchmarks/results/encode_update.json and the "Encoding: updates" section of BENCHMARKS.md.
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

import common
import torch
from bench_encode import MODELS, add_image_flags, build_checkpoint, source_images

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--images", type=int, default=1000, help="images in the first encode")
    add_image_flags(data, "encode_update")  # --work_dir is emptied first
    data.add_argument("--model", default="our", choices=MODELS, help="random-weight model to encode with")
    changes = parser.add_argument_group("changes before the update")
    changes.add_argument("--add", type=int, default=50, help="images added")
    changes.add_argument("--modify", type=int, default=10, help="images rewritten")
    changes.add_argument("--delete", type=int, default=10, help="images deleted")
    common.add_report_flags(parser)
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
    header = common.run_header()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    sources, images_source = source_images(args.image_dir, args.images + args.add, args.work_dir)
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
    # Nothing changed since: the plain rerun compares stats only, --recheck_content also hashes every file.
    unchanged, unchanged_manifest, _ = encode_seconds(checkpoint, dataset, emb_path)
    recheck, recheck_manifest, _ = encode_seconds(checkpoint, dataset, emb_path, "--recheck_content")
    assert unchanged_manifest["this_update"]["encoded"] == recheck_manifest["this_update"]["encoded"] == 0
    assert recheck_manifest["this_update"]["content_recheck"] == {"rechecked": expected, "changed": 0}

    from clipsearch.store import load_collection

    updated, fresh = load_collection(emb_path), load_collection(full_path)
    assert sorted(updated.paths) == sorted(fresh.paths)
    rows = {path: row for row, path in enumerate(fresh.paths)}
    worst = max(
        float((updated.embeddings[row] - fresh.embeddings[rows[path]]).abs().max()) for row, path in enumerate(updated.paths)
    )
    results = {
        **header,
        "load_average_end": common.load_average(),
        "model": args.model,
        "images": args.images,
        "images_source": images_source,
        "changes": {"added": args.add, "modified": args.modify, "deleted": args.delete},
        "commands": {"first": first_command, "update": update_command, "full": full_command},
        "seconds": {
            "first_encode": first, "update": update, "full_re_encode": full,
            "unchanged_update": unchanged, "unchanged_update_recheck_content": recheck,
        },
        "collection_bytes": sum(path.stat().st_size for path in dataset.iterdir()),
        "encode_loop_seconds": {
            "update": manifest["this_update"]["seconds"],
            "full_re_encode": full_manifest["this_update"]["seconds"],
        },
        "update_encoded": manifest["this_update"]["encoded"],
        "update_dropped": manifest["this_update"]["removed"],
        "max_abs_difference_update_vs_full": worst,
        "torch_threads": torch.get_num_threads(),
        "command": common.command_line("bench_update.py", argv),
    }
    print(json.dumps(results["seconds"]))
    common.publish("encode_update", results, report_markdown(results), args.report)
    return results


def report_markdown(results: dict) -> str:
    seconds, loop, changes = results["seconds"], results["encode_loop_seconds"], results["changes"]
    return common.report_section("Encoding: updates", results, [
        f"- Images: {results['images_source']}; the first {results['images']} encoded with the `{results['model']}` "
        "model (random weights), then "
        f"{changes['added']} added, {changes['modified']} modified, {changes['deleted']} deleted; each step is the "
        "real CLI in a fresh process, timed start to exit (model loading included)",
        "",
        *common.markdown_table(["step", "command", "wall s", "encode loop s", "images encoded"], [
            ["first encode", f"`{results['commands']['first']}`", f"{seconds['first_encode']:.1f}", "", results["images"]],
            ["update", "same command again", f"{seconds['update']:.1f}", f"{loop['update']:.1f}", results["update_encoded"]],
            ["full re-encode", "same command, `--overwrite`, into a new folder", f"{seconds['full_re_encode']:.1f}",
             f"{loop['full_re_encode']:.1f}", results["images"] + changes["added"] - changes["deleted"]],
            ["nothing changed", "same command again", f"{seconds['unchanged_update']:.1f}", "", 0],
            ["nothing changed, content rechecked", "same command, `--recheck_content`",
             f"{seconds['unchanged_update_recheck_content']:.1f}", "", 0],
        ], "llrrr"),
        "",
        f"- The update gives the same collection as the full re-encode (largest difference in any embedding "
        f"{results['max_abs_difference_update_vs_full']:.1e}); it dropped {results['update_dropped']} rows "
        "(deleted and modified images) and rewrote no old shard (checked). Wall time minus the encode loop is "
        "start-up (imports and model loading), the same for every step. `--recheck_content` read and hashed "
        f"all {results['images'] + changes['added'] - changes['deleted']} files "
        f"({results['collection_bytes'] / 2**20:.0f} MB) and found none changed.",
    ])


if __name__ == "__main__":
    main()
