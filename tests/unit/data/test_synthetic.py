"""The synthetic dataset: deterministic by seed, captions true to the pictures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from captioning.data.synthetic import (
    COLOURS,
    MANIFEST,
    NUMBERS,
    SHAPES,
    generate,
    load_synthetic,
    scene_of,
)
from captioning.settings import SyntheticSettings

SMALL = {"seed": 3, "train": 40, "val": 10, "test": 10, "image_size": 96}


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, **SMALL)
    return root


def entries(root: Path) -> list[dict]:
    return json.loads((root / MANIFEST).read_text())["records"]


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


def test_same_seed_same_bytes_and_captions(small, tmp_path):
    generate(tmp_path, **SMALL)
    assert files(tmp_path) == files(small)
    assert entries(tmp_path) == entries(small)


def test_other_seed_other_data(small, tmp_path):
    generate(tmp_path, **dict(SMALL, seed=4))
    assert files(tmp_path) != files(small)
    assert [e["captions"] for e in entries(tmp_path)] != [e["captions"] for e in entries(small)]


def test_pinned_content():
    # Captions come from random.Random seeded by text: the same on every machine and Python.
    # A change here means the dataset changed; bump FORMAT_VERSION when that is intended.
    from captioning.data.synthetic import _scene_rng, captions_for, make_scene, render

    digest = hashlib.sha256()
    for index in range(5):
        scene = make_scene(_scene_rng(0, "train", index), 224)
        digest.update("|".join(captions_for(scene)).encode())
        digest.update(render(scene, 224).tobytes())
    assert make_scene(_scene_rng(0, "train", 0), 224).shapes[0].colour == "red"
    assert digest.hexdigest() == PINNED_DIGEST


PINNED_DIGEST = "d118454e7d49911978b5962839c7235eade1b54dd2238fd20e6a92aeb34978b8"


def _colour_at(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))


def _runs(image: Image.Image, y: int, colour: tuple[int, int, int]) -> int:
    """How many separate stretches of `colour` a row of pixels crosses."""
    runs, inside = 0, False
    for x in range(image.width):
        hit = image.getpixel((x, y)) == colour
        runs += hit and not inside
        inside = hit
    return runs


def test_captions_are_true_to_the_pictures(small):
    size = SMALL["image_size"]
    kinds = set()
    for entry in entries(small):
        scene = scene_of(entry)
        kinds.add(scene.kind)
        image = Image.open(small / "images" / entry["image_id"]).convert("RGB")
        captions = entry["captions"]
        assert len(captions) == 5 and len(set(captions)) == 5
        for shape in scene.shapes:
            # The scene spec matches the pixels: each shape's colour sits at its centre.
            assert _colour_at(image, shape.x, shape.y) == COLOURS[shape.colour]
        first = scene.shapes[0]
        for caption in captions:
            words = caption.split()
            assert first.colour in words and any(w.startswith(first.shape) for w in words), caption
            # No colour or shape the picture lacks is named.
            assert {w for w in words if w in COLOURS} == {s.colour for s in scene.shapes}, caption
            assert {w.rstrip("s") for w in words if w.rstrip("s") in SHAPES} == {s.shape for s in scene.shapes}
        if scene.kind == "single":
            where = captions[0].split()[-1]  # left / right / top / bottom / centre
            fx, fy = first.x / size, first.y / size
            expected = {
                "left": fx < 0.4,
                "right": fx > 0.6,
                "top": fy < 0.4,
                "bottom": fy > 0.6,
                "centre": 0.4 <= fx <= 0.6 and 0.4 <= fy <= 0.6,
            }
            assert expected[where], (entry["image_id"], where, fx, fy)
        elif scene.kind == "count":
            number = captions[0].split()[0]
            assert number == NUMBERS[len(scene.shapes)]
            # Count the shapes in the picture itself along the row through their centres.
            assert _runs(image, first.y, COLOURS[first.colour]) == len(scene.shapes)
        else:
            left, right = scene.shapes
            assert left.x < size / 2 < right.x
            assert (
                captions[0]
                == f"a {left.colour} {left.shape} on the left and a {right.colour} {right.shape} on the right"
            )
            assert _colour_at(image, left.x, left.y) == COLOURS[left.colour]
            assert _colour_at(image, right.x, right.y) == COLOURS[right.colour]
    assert kinds == {"single", "count", "pair"}


def test_vocabulary_is_small(small):
    words = {w for e in entries(small) for c in e["captions"] for w in c.split()}
    assert len(words) <= 45, sorted(words)


def test_load_generates_once_and_regenerates_on_new_params(tmp_path):
    params = SyntheticSettings(seed=1, train=6, val=2, test=2, image_size=64)
    dataset = load_synthetic(tmp_path, params)
    assert dataset.name == "synthetic" and dataset.dropped == []
    assert [r.image_id for r in dataset.records][:2] == ["synth_000000.png", "synth_000001.png"]
    assert {s: len(rs) for s, rs in dataset.splits().items()} == {"train": 6, "val": 2, "test": 2}
    assert all(Path(r.path).is_file() and len(r.captions) == 5 for r in dataset.records)

    stamp = (tmp_path / MANIFEST).stat().st_mtime_ns
    again = load_synthetic(tmp_path, params)
    assert again.records == dataset.records
    assert (tmp_path / MANIFEST).stat().st_mtime_ns == stamp  # not regenerated

    assert load_synthetic(tmp_path).records == dataset.records  # without settings: read as it is
    with pytest.raises(FileNotFoundError, match="captioning data acquire synthetic"):
        load_synthetic(tmp_path / "nothing")

    bigger = load_synthetic(tmp_path, params.replace(train=8))
    assert len(bigger.splits()["train"]) == 8
    assert len(list((tmp_path / "images").iterdir())) == 12
    # A split's images do not depend on the other splits' sizes.
    assert bigger.records[0].captions == dataset.records[0].captions


def test_synthetic_passes_validation(tmp_path):
    from captioning.data.validate import expectations_for, validate_dataset

    params = SyntheticSettings(seed=2, train=6, val=2, test=2, image_size=64)
    dataset = load_synthetic(tmp_path / "data", params)
    result = validate_dataset(dataset, tmp_path / "report", expectations_for("synthetic", params))
    assert result.success, result.failures
    assert result.warnings == []


def test_bad_params_are_refused(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, seed=0, train=1, val=1, test=1, image_size=8)
