"""A generated dataset of simple scenes with truthful captions.

Each image shows one to three large shapes (circle, square, triangle, star) in
one of four colours on a light background, plain or faintly striped. There are
three kinds of scene, each with five captions that follow a small fixed
grammar, so a small model can learn it in seconds (tests and the offline demo
train on it):

- single: one shape at the left, right, top, bottom or centre
  ("a red circle on the left", "there is a red circle on the left", ...);
- count: two or three identical shapes in a row ("two blue squares", ...);
- pair: two different shapes side by side
  ("a red circle on the left and a blue square on the right", ...).

Everything is derived from the seed with `random.Random` seeded by text (hashed
with SHA-512 by Python, the same on every machine) and drawn with integer
coordinates, so the same seed gives the same pixels and captions anywhere.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioning.data.records import Dataset, Record

if TYPE_CHECKING:
    from captioning.settings import SyntheticSettings

FORMAT_VERSION = 1
MANIFEST = "synthetic.json"
SPLITS = ("train", "val", "test")

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# Where a single shape sits, as fractions of the image side, and how captions say it.
POSITIONS = {
    "left": ((0.25, 0.5), "on the left"),
    "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "centre": ((0.5, 0.5), "in the centre"),
}
BACKGROUNDS = ((255, 255, 255), (232, 232, 232), (246, 238, 222))
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    x: int  # centre, pixels
    y: int
    radius: int  # half the shape's extent, pixels


@dataclass(frozen=True)
class Scene:
    kind: str  # single | count | pair
    shapes: tuple[Shape, ...]
    position: str | None  # single scenes only
    background: tuple[int, int, int]
    striped: bool


def _jitter(rng: random.Random, size: int, amount: float = 0.03) -> int:
    return round(rng.uniform(-amount, amount) * size)


def make_scene(rng: random.Random, size: int) -> Scene:
    """Draw a random scene description (no pixels yet)."""
    background = rng.choice(BACKGROUNDS)
    striped = rng.random() < 0.5
    roll = rng.random()
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if roll < 0.5:
        position = rng.choice(list(POSITIONS))
        (fx, fy), _ = POSITIONS[position]
        radius = round(size * rng.uniform(0.15, 0.18))
        item = Shape(
            shape, colour, round(fx * size) + _jitter(rng, size), round(fy * size) + _jitter(rng, size), radius
        )
        return Scene("single", (item,), position, background, striped)
    if roll < 0.75:
        count = rng.choice((2, 3))
        xs = (0.28, 0.72) if count == 2 else (0.19, 0.5, 0.81)
        radius = round(size * (rng.uniform(0.14, 0.16) if count == 2 else rng.uniform(0.11, 0.125)))
        y = round(0.5 * size) + _jitter(rng, size, 0.05)
        items = tuple(Shape(shape, colour, round(fx * size), y, radius) for fx in xs)
        return Scene("count", items, None, background, striped)
    other = (colour, shape)
    while other == (colour, shape):
        other = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    radius = round(size * rng.uniform(0.15, 0.17))
    y = round(0.5 * size) + _jitter(rng, size, 0.05)
    left = Shape(shape, colour, round(0.27 * size) + _jitter(rng, size, 0.02), y, radius)
    right = Shape(other[1], other[0], round(0.73 * size) + _jitter(rng, size, 0.02), y, radius)
    return Scene("pair", (left, right), None, background, striped)


def captions_for(scene: Scene) -> tuple[str, ...]:
    """Five captions that describe the scene truthfully, in a few fixed wordings."""
    first = scene.shapes[0]
    thing = f"{first.colour} {first.shape}"
    if scene.kind == "single":
        where = POSITIONS[scene.position][1]
        return (
            f"a {thing} {where}",
            f"there is a {thing} {where}",
            f"a {thing} {where} of the image",
            f"one {thing} {where}",
            f"a {thing} {where} of the picture",
        )
    if scene.kind == "count":
        things = f"{NUMBERS[len(scene.shapes)]} {thing}s"
        return (
            things,
            f"there are {things}",
            f"{things} in the image",
            f"{things} in a row",
            f"{things} next to each other",
        )
    second = scene.shapes[1]
    other = f"{second.colour} {second.shape}"
    return (
        f"a {thing} on the left and a {other} on the right",
        f"a {thing} and a {other}",
        f"there is a {thing} on the left and a {other} on the right",
        f"a {other} on the right and a {thing} on the left",
        f"a {thing} next to a {other}",
    )


def _outline(item: Shape) -> list[tuple[int, int]]:
    x, y, r = item.x, item.y, item.radius
    if item.shape == "square":
        side = round(r * 0.85)
        return [(x - side, y - side), (x + side, y - side), (x + side, y + side), (x - side, y + side)]
    if item.shape == "triangle":
        return [(x, y - r), (x + round(r * 0.95), y + round(r * 0.75)), (x - round(r * 0.95), y + round(r * 0.75))]
    # Star: five points, inner radius 45% of the outer one, one point straight up.
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((x + round(radius * math.cos(angle)), y + round(radius * math.sin(angle))))
    return points


def render(scene: Scene, size: int):
    """The scene as a PIL RGB image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    if scene.striped:
        # A faint texture: diagonal stripes a few levels darker than the background.
        shade = tuple(max(0, channel - 14) for channel in scene.background)
        for offset in range(-size, size, 14):
            draw.line([(offset, 0), (offset + size, size)], fill=shade, width=3)
    for item in scene.shapes:
        colour = COLOURS[item.colour]
        if item.shape == "circle":
            r = item.radius
            draw.ellipse([item.x - r, item.y - r, item.x + r, item.y + r], fill=colour)
        else:
            draw.polygon(_outline(item), fill=colour)
    return image


def _scene_rng(seed: int, split: str, index: int) -> random.Random:
    # Text seeds are hashed with SHA-512 by `random`, stable across machines and
    # runs, and keep one split's images independent of the other splits' sizes.
    return random.Random(f"captioning-synthetic/{seed}/{split}/{index}")


def _params(seed: int, train: int, val: int, test: int, image_size: int) -> dict[str, int]:
    return {"seed": int(seed), "train": int(train), "val": int(val), "test": int(test), "image_size": int(image_size)}


def generate(root: str | Path, seed: int, train: int, val: int, test: int, image_size: int) -> list[dict[str, Any]]:
    """Render the dataset into `root/images/` and write `root/synthetic.json`; returns its entries."""
    params = _params(seed, train, val, test, image_size)
    if min(train, val, test) < 0 or image_size < 32:
        raise ValueError(f"synthetic params must be non-negative sizes and image_size >= 32, got {params}")
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("synth_*.png"):
        old.unlink()
    entries = []
    number = 0
    for split in SPLITS:
        for index in range(params[split]):
            scene = make_scene(_scene_rng(seed, split, index), image_size)
            image_id = f"synth_{number:06d}.png"
            render(scene, image_size).save(images / image_id, format="PNG", optimize=False, compress_level=6)
            entries.append(
                {"image_id": image_id, "split": split, "captions": list(captions_for(scene)), "scene": asdict(scene)}
            )
            number += 1
    manifest = {"format": FORMAT_VERSION, "params": params, "records": entries}
    # The manifest is written last (atomically): an interrupted run leaves no manifest and is redone.
    temporary = root / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(temporary, root / MANIFEST)
    return entries


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_synthetic(root: str | Path | None = None, settings: SyntheticSettings | None = None) -> Dataset:
    """The synthetic dataset under `root` (default data_dir()/synthetic).

    With `settings` (params.yaml `synthetic`), it is generated first when missing or made with
    other settings; without them, the one on disk is read as it is (FileNotFoundError when none).
    """
    from captioning.config import data_dir

    root = Path(root) if root else data_dir() / "synthetic"
    manifest = _read_manifest(root)
    if settings is not None:
        wanted = _params(settings.seed, settings.train, settings.val, settings.test, settings.image_size)
        if manifest is None or manifest.get("format") != FORMAT_VERSION or manifest.get("params") != wanted:
            generate(root, **wanted)
            manifest = _read_manifest(root)
    elif manifest is None or manifest.get("format") != FORMAT_VERSION:
        raise FileNotFoundError(f"no synthetic dataset in {root}: `captioning data acquire synthetic` generates it")
    images = (root / "images").resolve()
    records = [
        Record(entry["image_id"], str(images / entry["image_id"]), entry["split"], tuple(entry["captions"]))
        for entry in manifest["records"]
    ]
    return Dataset("synthetic", records, [])


def scene_of(entry: dict[str, Any]) -> Scene:
    """Rebuild a Scene from its manifest entry (for checks and tests)."""
    data = dict(entry["scene"])
    data["shapes"] = tuple(Shape(**item) for item in data["shapes"])
    data["background"] = tuple(data["background"])
    return Scene(**data)
