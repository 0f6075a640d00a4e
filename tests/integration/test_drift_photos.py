"""Drift on real photos: Flickr8k test photos look like the training photos to the drift
monitor; a stream of synthetic scenes, or of blurred and colour-shifted photos, does not.

The reference is fitted on the pooled lite0 features of 300 Flickr8k training photos, for
windows of 50 images; the streams are the official test split's photos (100), synthetic
scenes (50) and 50 of the test photos heavily altered. Every image is encoded once for the
module. Needs the dataset mirror ($CAPTIONING_MIRROR with flickr8k/ inside, read in place).
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from captioning.config import mirror_dir
from captioning.data.datasets import load_dataset
from captioning.data.query import select
from captioning.data.synthetic import make_scene, render
from captioning.features.drift import DriftMonitor, DriftReference, pool
from captioning.features.encoder import ENCODERS, build_encoder
from captioning.images import open_image, preprocess

MIRROR = mirror_dir()
FLICKR = MIRROR / "flickr8k" if MIRROR else None
WINDOW = 50
BATCH = 10  # live images added to the monitor at a time

pytestmark = [
    pytest.mark.skipif(
        FLICKR is None or not (FLICKR / "Flickr8k.token.txt").is_file(),
        reason="needs the Flickr8k mirror: set CAPTIONING_MIRROR to a folder holding flickr8k/ (make test does)",
    ),
    pytest.mark.integration,
    pytest.mark.slow,  # encodes 500 photos on the CPU
]


def altered(image: Image.Image) -> Image.Image:
    """Heavy blur and a colour cast: red lifted, blue halved."""
    red, green, blue = image.filter(ImageFilter.GaussianBlur(6)).split()
    return Image.merge("RGB", (red.point(lambda v: min(255, v + 60)), green, blue.point(lambda v: v // 2)))


def encode(encoder, images: list) -> np.ndarray:
    """Pooled features (B, 1280) of images (paths or PIL images), through the shared preprocessing."""
    size = ENCODERS["lite0"].image_size
    pooled = []
    with torch.inference_mode():
        for start in range(0, len(images), 25):
            pooled.append(pool(encoder(preprocess(images[start : start + 25], size))))
    return np.concatenate(pooled)


@pytest.fixture(scope="module")
def features() -> dict[str, np.ndarray]:
    def loader(name):
        return load_dataset(name, root=FLICKR)

    train = select("flickr8k[train]-300s0", loader)
    test = select("flickr8k[test]-100s0", loader)
    encoder = build_encoder("lite0").optimize_for_inference()
    started = time.perf_counter()
    test_images = [open_image(record.path) for record in test]
    result = {
        "train": encode(encoder, [record.path for record in train]),
        "test": encode(encoder, test_images),
        # Alterations of the photos the test stream does not end with, so no window holds a
        # photo and its altered copy.
        "altered": encode(encoder, [altered(image) for image in test_images[:WINDOW]]),
        "synthetic": encode(encoder, [render(make_scene(random.Random(f"drift/{n}"), 224), 224) for n in range(50)]),
    }
    print(f"\nencoded {sum(len(v) for v in result.values())} images in {time.perf_counter() - started:.0f} s")
    return result


@pytest.fixture(scope="module")
def reference(features) -> DriftReference:
    fitted = DriftReference.fit(features["train"], window=WINDOW, seed=0, encoder="lite0")
    print(f"reference: {fitted.images} training photos, windows of {WINDOW}, threshold {fitted.threshold:.4f}")
    return fitted


def feed(monitor: DriftMonitor, vectors: np.ndarray, label: str) -> list[float | None]:
    """Add the vectors batch by batch; the score after each batch (None until the window is full)."""
    scores, seconds = [], []
    for start in range(0, len(vectors), BATCH):
        began = time.perf_counter()
        monitor.add(vectors[start : start + BATCH])
        scores.append(monitor.score())
        seconds.append(time.perf_counter() - began)
    shown = ", ".join("-" if s is None else f"{s:.4f}" for s in scores)
    print(
        f"{label}: scores {shown} (threshold {monitor.reference.threshold:.4f}); "
        f"add + score {1000 * np.mean(seconds):.2f} ms per batch of {BATCH}"
    )
    return scores


def test_test_photos_raise_no_alarm_and_synthetic_scenes_do(reference, features):
    monitor = DriftMonitor(reference)
    photos = feed(monitor, features["test"], "Flickr8k test photos")
    assert photos[:4] == [None] * 4  # the window fills after 50 images
    for score in photos[4:]:
        assert not reference.alarm(score), (score, reference.threshold)
    print(f"test photos: smallest p-value {min(reference.p_value(s) for s in photos[4:]):.3f}")

    # The same monitor, as traffic turns into synthetic scenes: 10, 20, ... 50 of the last 50.
    scenes = feed(monitor, features["synthetic"], "synthetic scenes after the photos")
    alarms = [reference.alarm(score) for score in scenes]
    print(f"first alarm with {BATCH * (alarms.index(True) + 1)} of {WINDOW} images synthetic")
    assert alarms[2:] == [True] * 3  # at the latest once more than half the window is synthetic
    assert scenes[-1] > 10 * reference.threshold and reference.p_value(scenes[-1]) < 0.01


def test_blurred_colour_shifted_photos_raise_the_alarm(reference, features):
    monitor = DriftMonitor(reference)
    scores = feed(monitor, features["altered"], "blurred, colour-shifted photos")
    assert reference.alarm(scores[-1]) and reference.p_value(scores[-1]) < 0.01
    # The unaltered photos they came from do not.
    original = reference.score(features["test"][:WINDOW])
    print(f"the same photos unaltered: {original:.4f} (p {reference.p_value(original):.3f})")
    assert not reference.alarm(original)


def test_the_reference_saved_in_a_package_folder_scores_the_same(tmp_path, reference, features):
    size = reference.save(tmp_path).stat().st_size
    loaded = DriftReference.load(tmp_path)
    print(f"drift.npz: {size / 1024:.0f} KB")
    assert size < 400_000 and loaded.encoder == "lite0" and loaded.threshold == reference.threshold
    for name in ("test", "synthetic"):
        window = features[name][-WINDOW:]
        assert loaded.score(window) == reference.score(window)
