"""Deterministic synthetic image-caption dataset of coloured shapes, generated on first use."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipsearch.defaults import DEFAULT_DATASET, is_default_dataset
from clipsearch.durable import FolderLock, atomic_write

logger = logging.getLogger(__name__)

# Bump when the scenes, captions or file layout change, so existing copies are regenerated.
GENERATOR_VERSION = 1
COMPLETE_MARKER = ".complete"
META_FILE = "meta.json"
SAMPLE_IMAGE_SIZE = 96
SPLIT_SEED_OFFSETS = {"train": 0, "dev": 1}

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 80, 220),
    "yellow": (240, 215, 35),
    "purple": (135, 55, 180),
    "orange": (245, 135, 25),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "dark": (35, 35, 40),
}
# Object colours that would nearly vanish on a background are never drawn on it.
LOW_CONTRAST = {"white": {"white", "yellow"}, "dark": {"black"}, "gray": set()}
SIZES = {"small": 0.09, "large": 0.16}  # circumradius as a fraction of the image side
POSITIONS = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "on the left side of the image"),
    "right": ("on the right", "at the right side", "on the right side of the image"),
    "top": ("at the top", "near the top edge", "in the upper part of the image"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower part of the image"),
    "center": ("in the center", "in the middle", "in the middle of the image"),
}
# For two objects, objects[0] is the left (horizontal) or upper (vertical) one.
RELATIONS = {
    "horizontal": {"first": "to the left of", "second": "to the right of", "places": ("on the left", "on the right")},
    "vertical": {"first": "above", "second": "below", "places": ("at the top", "at the bottom")},
}
SUPERSAMPLING = 2  # drawn at twice the size and downscaled, for anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, as a fraction of the image side
    y: float
    radius: float  # circumradius, as a fraction of the image side
    rotation: float  # degrees
    rgb: tuple[int, int, int]  # the named colour with a little jitter


@dataclass(frozen=True)
class Scene:
    background: str
    background_rgb: tuple[int, int, int]
    layout: str  # a POSITIONS key for one object, a RELATIONS key for two
    objects: tuple[SceneObject, ...]
    noise_std: float


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _sample_object(rng: np.random.Generator, background: str, centre: tuple[float, float], exclude=()) -> SceneObject:
    allowed_colours = [c for c in COLOURS if c not in LOW_CONTRAST[background]]
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = allowed_colours[rng.integers(len(allowed_colours))]
        if (shape, colour) not in exclude:
            break
    size = ("small", "large")[rng.integers(2)]
    # Jitter keeps images from being pixel templates without moving an object into another
    # position's region or blurring small against large.
    return SceneObject(
        shape=shape,
        colour=colour,
        size=size,
        x=float(centre[0] + rng.uniform(-0.04, 0.04)),
        y=float(centre[1] + rng.uniform(-0.04, 0.04)),
        radius=float(SIZES[size] * rng.uniform(0.9, 1.1)),
        rotation=float(rng.uniform(-15.0, 15.0)),
        rgb=_jitter_rgb(rng, COLOURS[colour], 15),
    )


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene of one object at a named position, or two objects side by side or stacked."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    background_rgb = _jitter_rgb(rng, BACKGROUNDS[background], 10)
    if rng.random() < 0.5:
        layout = list(POSITIONS)[rng.integers(len(POSITIONS))]
        objects = (_sample_object(rng, background, POSITIONS[layout]),)
    else:
        layout = list(RELATIONS)[rng.integers(len(RELATIONS))]
        along = rng.uniform(0.4, 0.6)
        centres = [(0.27, along), (0.73, along)] if layout == "horizontal" else [(along, 0.27), (along, 0.73)]
        first = _sample_object(rng, background, centres[0])
        # Two identical shapes would make "a red circle left of a red circle" a useless caption.
        second = _sample_object(rng, background, centres[1], exclude={(first.shape, first.colour)})
        objects = (first, second)
    return Scene(background, background_rgb, layout, objects, noise_std=float(rng.uniform(3.0, 8.0)))


def _shape_outline(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred on (cx, cy); circles are handled by the caller."""
    if shape == "square":
        polar = [(radius, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        # A triangle looks smaller than a square of the same circumradius, so it is enlarged.
        polar = [(radius * 1.2, -90 + 120 * k) for k in range(3)]
    elif shape == "star":
        polar = [(radius * (1.2 if k % 2 == 0 else 0.5), -90 + 36 * k) for k in range(10)]
    elif shape == "cross":
        arm, half_width = radius * 1.05, radius * 0.36
        corners = [
            (half_width, -arm), (half_width, -half_width), (arm, -half_width), (arm, half_width),
            (half_width, half_width), (half_width, arm), (-half_width, arm), (-half_width, half_width),
            (-arm, half_width), (-arm, -half_width), (-half_width, -half_width), (-half_width, -arm),
        ]
        polar = [(float(np.hypot(x, y)), float(np.degrees(np.arctan2(y, x)))) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [
        (cx + r * np.cos(np.radians(angle + rotation)), cy + r * np.sin(np.radians(angle + rotation)))
        for r, angle in polar
    ]


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    canvas_size = image_size * SUPERSAMPLING
    canvas = Image.new("RGB", (canvas_size, canvas_size), scene.background_rgb)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx, cy, radius = obj.x * canvas_size, obj.y * canvas_size, obj.radius * canvas_size
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=obj.rgb)
        else:
            draw.polygon(_shape_outline(obj.shape, cx, cy, radius, obj.rotation), fill=obj.rgb)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, scene.noise_std, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: SceneObject) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}"


def describe_scene(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Two or three paraphrases, each naming every object's size, colour, shape and place, and the background."""
    background = scene.background
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        near, side, of_image = POSITION_PHRASES[scene.layout]
        full = _with_article(_describe(obj))
        templates = [
            f"{full} {near} on a {background} background",
            f"{_with_article(f'{obj.colour} {obj.shape}')}, {obj.size}, {side}, on a {background} background",
            f"there is {full} {of_image}, on a {background} background",
            f"{_with_article(background)} background with {full} {near}",
            f"{_describe(obj)} {side}, {background} background",
        ]
    else:
        first, second = scene.objects
        relation = RELATIONS[scene.layout]
        first_place, second_place = relation["places"]
        first_text, second_text = _with_article(_describe(first)), _with_article(_describe(second))
        templates = [
            f"{first_text} {relation['first']} {second_text}, on a {background} background",
            f"{second_text} {relation['second']} {first_text} on a {background} background",
            f"two shapes on a {background} background: {first_text} {first_place} and {second_text} {second_place}",
            f"{_with_article(background)} background with {second_text} {second_place} and {first_text} {first_place}",
        ]
    count = int(rng.integers(2, 4))
    chosen = sorted(rng.choice(len(templates), size=count, replace=False).tolist())
    return [templates[index] for index in chosen]


def generate_example(seed: int, split: str, index: int, image_size: int) -> tuple[Scene, Image.Image, list[str]]:
    """The scene, image and captions of one example, a pure function of its arguments.

    Each example has its own random stream, so changing the number of examples leaves the
    existing ones unchanged.
    """
    rng = np.random.default_rng([seed, SPLIT_SEED_OFFSETS[split], index])
    scene = sample_scene(rng)
    captions = describe_scene(scene, rng)
    image = render_scene(scene, image_size, rng)
    return scene, image, captions


def _write_split(root: Path, split: str, count: int, image_size: int, seed: int) -> None:
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = ["image\tcaption"]
    for index in range(count):
        _, image, captions = generate_example(seed, split, index, image_size)
        relative_path = f"images/{split}/{index:06d}.png"
        image.save(root / relative_path, format="PNG")
        lines.extend(f"{relative_path}\t{caption}" for caption in captions)
    atomic_write(root / f"{split}.tsv", "\n".join(lines) + "\n")


def _expected_meta(num_train: int, num_dev: int, image_size: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_dev": num_dev,
        "image_size": image_size,
        "seed": seed,
    }


def is_complete(root: Path, meta: dict) -> bool:
    required = [root / COMPLETE_MARKER, root / "train.tsv", root / "dev.tsv", root / META_FILE]
    if not all(path.is_file() for path in required):
        return False
    try:
        return json.loads((root / META_FILE).read_text(encoding="utf-8")) == meta
    except (OSError, ValueError):
        return False


def ensure_sample_dataset(
    path: str | os.PathLike = DEFAULT_DATASET,
    num_train: int = 4000,
    num_dev: int = 300,
    image_size: int = SAMPLE_IMAGE_SIZE,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Generate the sample dataset at `path` unless a complete copy with the same settings is there."""
    root = Path(path)
    meta = _expected_meta(num_train, num_dev, image_size, seed)
    if not force and is_complete(root, meta):
        return root
    root.mkdir(parents=True, exist_ok=True)
    # Several processes (DDP ranks starting at once) generate it once: the others wait, then find it done.
    with FolderLock(root, "generate", "generating the sample dataset", wait=True):
        if not force and is_complete(root, meta):  # another process finished while we waited
            return root
        logger.info("generating sample dataset in %s (%s)", root, meta)
        (root / COMPLETE_MARKER).unlink(missing_ok=True)
        # Only delete images from a folder this generator wrote, never from a user's folder.
        if (root / META_FILE).is_file():
            shutil.rmtree(root / "images", ignore_errors=True)
        atomic_write(root / META_FILE, json.dumps(meta, indent=2) + "\n")
        _write_split(root, "train", num_train, image_size, seed)
        _write_split(root, "dev", num_dev, image_size, seed)
        # Written last: a generation killed halfway leaves no marker and is redone next time.
        atomic_write(root / COMPLETE_MARKER, json.dumps(meta) + "\n")
        logger.info("sample dataset ready: %d train and %d dev images", num_train, num_dev)
    return root


def generated_image_size(dataset_path: str | os.PathLike) -> int | None:
    """The native image size of a generated sample dataset, or None for any other dataset.

    Training on the sample data defaults to this size: upscaling 96 px shapes to a tower's 224 px
    input adds no information and costs five times the compute.
    """
    meta_path = Path(dataset_path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return int(meta["image_size"]) if "generator_version" in meta and "image_size" in meta else None


def needs_generation(
    path: str | os.PathLike, num_train: int, num_dev: int, image_size: int, seed: int, force: bool = False
) -> bool:
    """Whether `ensure_sample_dataset` with these settings would (re)write the files at `path`."""
    return force or not is_complete(Path(path), _expected_meta(num_train, num_dev, image_size, seed))


def sample_image_size(dataset_path: str | os.PathLike) -> int | None:
    """`generated_image_size`, or the default size for the default sample folder not generated yet."""
    size = generated_image_size(dataset_path)
    if size is None and is_default_dataset(dataset_path) and not Path(dataset_path, META_FILE).exists():
        return SAMPLE_IMAGE_SIZE
    return size


def prepare_default_sample(dataset_path: str | os.PathLike) -> None:
    """Generate the default sample data when training asks for it and no complete copy is there.

    A complete copy made with other settings (e.g. more images) is used as it is, not regenerated.
    """
    if is_default_dataset(dataset_path) and not Path(dataset_path, COMPLETE_MARKER).is_file():
        ensure_sample_dataset(DEFAULT_DATASET)
