"""Copy a dataset with every image resized once, so training decodes small files instead of full photos.

Decoding a 500 x 375 JPEG costs about four times a 256 px one, and on a few CPU cores decoding
competes with the model for the same cores. img2dataset resizes at download time for the same
reason; this does it for a dataset already on disk:

    ./clipsearch resize_dataset --dataset_path dataset/flickr8k/data --out dataset/flickr8k/data256
"""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from clipsearch.data import DataReport, find_table, load_image, read_table
from clipsearch.durable import atomic_write

DEFAULT_SPLITS = ("train", "dev", "test")


def resize_one(job: tuple[str, str, int]) -> tuple[str, str | None]:
    """Resize so the shorter side is `size` (never upscale); returns (source, written path or None)."""
    source, target, size = job
    if Path(target).is_file():
        return source, target
    image = load_image(source)
    if image is None:
        return source, None
    scale = size / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=92)
    atomic_write(target, encoded.getbuffer())
    return source, target


def resize_dataset(dataset_path: str | Path, out: str | Path, size: int = 256, workers: int = 2,
                   splits: tuple[str, ...] = DEFAULT_SPLITS) -> dict[str, int]:
    """Write `<out>/<split>.tsv` tables whose images are resized copies under `<out>/images/`."""
    out = Path(out)
    report = DataReport()
    tables = {}
    for split in splits:
        try:
            find_table(dataset_path, split)
        except FileNotFoundError:
            continue
        tables[split] = read_table(dataset_path, split, report=report)
    if not tables:
        raise FileNotFoundError(f"no {'/'.join(splits)} tables in {dataset_path}")
    sources = sorted({path for table in tables.values() for path in table.image})
    # Names from a hash of the source path: unique even when two folders hold the same file name.
    targets = {s: str(out / "images" / f"{hashlib.sha1(s.encode()).hexdigest()[:16]}.jpg") for s in sources}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        written = dict(pool.map(resize_one, [(s, targets[s], size) for s in sources], chunksize=32))
    for source, target in written.items():
        if target is None:
            report.add("unreadable image", source)
    counts = {}
    for split, table in tables.items():
        table = table.assign(image=table.image.map(written)).dropna(subset=["image"])
        table = table.assign(image=table.image.map(lambda path: str(Path(path).relative_to(out))))
        atomic_write(out / f"{split}.tsv", table.to_csv(sep="\t", index=False))
        counts[split] = len(table)
    print(f"resized {len(sources)} images to {size} px into {out}: {counts}; {report.summary()}")
    return counts
