"""Drift of live photos through the real service (`bentoml serve`), read from its /metrics page.

Which way round: the tiny package learnt from synthetic scenes, so for its own drift reference
Flickr8k photos are the shift. Both directions are tested:

- the tiny package's own reference (fitted at training time on its 160 synthetic training
  scenes): held-out synthetic scenes raise no alarm, Flickr8k test photos do;
- served: the same package with its reference refitted on 300 Flickr8k training photos (the
  reference a model trained on Flickr8k carries), built into a bento as a release would be.
  Flickr8k test photos sent to /caption_batch keep the gauges below the threshold after
  every batch; blurred, colour-shifted test photos, then synthetic scenes, raise the alarm.

Needs the dataset mirror ($CAPTIONING_MIRROR with flickr8k/ inside, read in place).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest
import requests
from PIL import Image, ImageFilter

from captioning.config import PROJECT_ROOT, mirror_dir
from captioning.data.datasets import load_dataset
from captioning.data.query import select
from captioning.features.drift import DRIFT_FILE, DriftReference, pool
from captioning.inference.model_package import (
    check_package_files,
    load_drift,
    load_frequencies,
    load_memory,
    load_package,
    read_config,
    save_package,
)
from captioning.inference.predict import Captioner
from captioning.serving.drift import drift_figures
from harness import serving
from harness.trained import held_out_features

MIRROR = mirror_dir()
FLICKR = MIRROR / "flickr8k" if MIRROR else None
WINDOW = 50  # the served reference's window
BATCH = 10  # photos per /caption_batch request

pytestmark = [
    pytest.mark.skipif(
        FLICKR is None or not (FLICKR / "Flickr8k.token.txt").is_file(),
        reason="needs the Flickr8k mirror: set CAPTIONING_MIRROR to a folder holding flickr8k/ (make test does)",
    ),
    pytest.mark.integration,
    pytest.mark.slow,  # encodes about 600 photos on the CPU
]


def flickr(query: str) -> list:
    return select(query, lambda name: load_dataset(name, root=FLICKR))


def altered(path) -> bytes:
    """A photo heavily blurred with a colour cast (red lifted, blue halved), as JPEG bytes."""
    red, green, blue = Image.open(path).convert("RGB").filter(ImageFilter.GaussianBlur(6)).split()
    image = Image.merge("RGB", (red.point(lambda v: min(255, v + 60)), green, blue.point(lambda v: v // 2)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_paths() -> list[str]:
    """The official test split's photos, 100 of them (the same every time)."""
    return [record.path for record in flickr("flickr8k[test]-100s0")]


@pytest.fixture(scope="module")
def test_photos(photo_paths) -> list[bytes]:
    return [open(path, "rb").read() for path in photo_paths]


def test_the_tiny_packages_own_reference_sees_photos_as_drift_and_scenes_not(tiny_model, test_photos):
    config = read_config(tiny_model)
    assert (tiny_model / DRIFT_FILE).is_file() and DRIFT_FILE in check_package_files(tiny_model)
    reference = load_drift(tiny_model, config)
    assert (reference.window, reference.images, reference.encoder) == (20, 160, "lite0")
    _, scenes, _ = held_out_features()  # held-out synthetic test scenes, from the feature cache
    scene_score = reference.score(pool(scenes)[: reference.window])
    photos = Captioner.load(tiny_model).encode(test_photos[: reference.window])
    photo_score = reference.score(photos)
    print(f"tiny reference: scenes {scene_score:.4f}, photos {photo_score:.4f}, threshold {reference.threshold:.4f}")
    assert not reference.alarm(scene_score)
    assert reference.alarm(photo_score) and reference.p_value(photo_score) < 0.01


@pytest.fixture(scope="module")
def photo_package(tiny_model, tmp_path_factory):
    """The tiny package saved again with a reference fitted on Flickr8k training photos, encoded
    as the service encodes uploads."""
    captioner = Captioner.load(tiny_model)
    train = [record.path for record in flickr("flickr8k[train]-300s0")]
    reference = DriftReference.fit(captioner.encode(train), window=WINDOW, seed=0, encoder="lite0")
    model, vocab, config = load_package(tiny_model)
    return save_package(
        tmp_path_factory.mktemp("photo-package") / "model",
        model,
        vocab,
        config,
        frequencies=load_frequencies(tiny_model, config),
        memory=load_memory(tiny_model, config),
        drift=reference,
    )


@pytest.fixture(scope="module")
def photo_service(photo_package, tmp_path_factory):
    """The service running the photo package from a bento's model store, as a release image does."""
    home = tmp_path_factory.mktemp("drift-service")
    env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    code = "import sys, bento; from pathlib import Path; bento.build(Path(sys.argv[1]), '1', Path(sys.argv[2]))"
    built = subprocess.run(
        [sys.executable, "-c", code, str(photo_package), str(home / "captioning.bento")],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    stored = home / "bentoml" / "models" / "captioner" / "v1"
    assert (stored / DRIFT_FILE).read_bytes() == (photo_package / DRIFT_FILE).read_bytes()
    server = serving.start_service("bento:captioner:v1", home)
    yield server
    server.stop()


def figures(server) -> dict:
    return drift_figures(requests.get(server.url + "/metrics", timeout=10).text)


def send(server, images: list[bytes], label: str) -> list[dict]:
    """Each batch of images to /caption_batch; the drift figures on /metrics after each."""
    seen = []
    for start in range(0, len(images), BATCH):
        files = [("image", (f"{n}.jpg", data, "image/jpeg")) for n, data in enumerate(images[start : start + BATCH])]
        answer = requests.post(server.url + "/caption_batch", files=files, timeout=120)
        assert answer.status_code == 200, answer.text
        seen.append(figures(server))
    shown = ", ".join("-" if f["score"] is None else f"{f['score']:.4f}" for f in seen)
    print(f"{label}: scores {shown} (threshold {seen[-1]['threshold']:.4f})")
    return seen


def test_photos_raise_no_alarm_and_altered_photos_or_scenes_do(photo_service, photo_package, photo_paths, test_photos):
    reference = load_drift(photo_package, read_config(photo_package))
    start = figures(photo_service)
    assert start["threshold"] == pytest.approx(reference.threshold) and start["score"] is None

    photos = send(photo_service, test_photos, "Flickr8k test photos")
    assert [f["score"] for f in photos[:4]] == [None] * 4  # the window fills after 50 photos
    for shown in photos[4:]:
        assert shown["alarm"] is False and shown["p_value"] > reference.alpha, shown
    # Probes and the model's info are no caption requests: only the 100 photos were counted.
    for path in ("/healthz", "/readyz", "/livez"):
        requests.get(photo_service.url + path, timeout=10)
    info = requests.get(photo_service.url + "/model", timeout=10).json()["drift"]
    assert info["images_seen"] == len(test_photos) and info["score"] == pytest.approx(
        photos[-1]["score"], abs=1e-6
    )  # rounded in JSON

    # Photos the test stream does not end with, altered: no window holds a photo and its copy.
    shifted = send(photo_service, [altered(path) for path in photo_paths[:WINDOW]], "blurred, colour-shifted")
    assert shifted[-1]["alarm"] is True and shifted[-1]["p_value"] < reference.alpha
    assert shifted[-1]["score"] > reference.threshold

    scenes = send(photo_service, [serving.synthetic_jpeg(seed) for seed in range(WINDOW)], "synthetic scenes")
    assert all(shown["alarm"] for shown in scenes)
    assert scenes[-1]["score"] > 10 * reference.threshold and not math.isnan(scenes[-1]["p_value"])


def test_the_alert_rule_compares_the_series_the_service_exports(photo_service):
    """CaptioningDriftHigh's expression names the two gauges the model service exports."""
    import yaml

    rules = yaml.safe_load((PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "CaptioningDriftHigh"]
    assert rule["expr"].split() == ["captioning_drift_score", ">", "captioning_drift_threshold"]
    assert rule["for"] == "10m"
    page = requests.get(photo_service.url + "/metrics", timeout=10).text
    for name in ("captioning_drift_score", "captioning_drift_threshold", "captioning_drift_p_value"):
        assert f"# TYPE {name} gauge" in page
    assert math.isfinite(figures(photo_service)["threshold"])
