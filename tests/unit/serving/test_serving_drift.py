"""The model service's drift monitor: the features of the images it captions go into the package's
drift reference after each batch, and the gauges show the score, threshold and p-value."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from captioning.features.drift import DriftReference
from captioning.features.encoder import ENCODERS
from captioning.inference.predict import Captioner
from captioning.models import build_model
from captioning.serving.batches import caption_jobs
from captioning.serving.drift import LiveDrift, drift_figures
from captioning.vocab import Vocabulary
from harness.serving import synthetic_jpeg

CHANNELS = 48
WINDOW = 20


def features(rng: np.random.Generator, count: int, shift: float = 0.0) -> np.ndarray:
    """Unpooled features (count, 4 positions, CHANNELS), as the encoder gives them."""
    basis = np.random.default_rng(99).normal(size=(6, CHANNELS))
    pooled = rng.normal(size=(count, 6)) @ basis + rng.normal(size=(count, CHANNELS)) * 0.5 + shift
    return np.repeat(pooled[:, None, :], 4, axis=1) + rng.normal(size=(count, 4, CHANNELS)) * 0.1


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    pooled = features(np.random.default_rng(0), 400).mean(axis=1)
    return DriftReference.fit(pooled, window=WINDOW, seed=0, permutations=200, encoder="lite0")


def gauges(series) -> dict[str, float]:
    return {name: series.value(f"captioning_drift_{name}") for name in ("score", "threshold", "p_value")}


def test_the_gauges_follow_the_last_window_of_live_images(series, reference):
    live = LiveDrift(reference, series.drift)
    shown = gauges(series)
    assert shown["threshold"] == reference.threshold  # known from the start
    assert math.isnan(shown["score"]) and math.isnan(shown["p_value"])  # no window yet
    rng = np.random.default_rng(1)
    live.add(features(rng, 12))
    assert math.isnan(gauges(series)["score"]) and live.figures()["score"] is None
    live.add(features(rng, 12))
    quiet = gauges(series)
    assert quiet["score"] < reference.threshold and quiet["p_value"] > 0.01
    assert live.figures() == {
        "enabled": True,
        "window": WINDOW,
        "images_seen": 24,
        "score": quiet["score"],
        "threshold": reference.threshold,
        "p_value": quiet["p_value"],
        "alarm": False,
    }
    for _ in range(2):  # the whole window turns over to shifted images
        live.add(features(rng, 10, shift=1.5))
    drifted = gauges(series)
    assert drifted["score"] > reference.threshold and drifted["p_value"] < 0.01
    assert live.figures()["alarm"] is True


def test_figures_read_back_from_a_metrics_page(series, reference):
    nothing = {"score": None, "threshold": None, "p_value": None, "alarm": None}
    assert drift_figures("") == nothing  # a page without the series (a server without a model service)
    live = LiveDrift(reference, series.drift)
    before = drift_figures(series.text())
    assert before == {"score": None, "threshold": reference.threshold, "p_value": None, "alarm": None}
    live.add(features(np.random.default_rng(2), WINDOW, shift=1.5))
    after = drift_figures(series.text())
    assert after["alarm"] is True and after["score"] == pytest.approx(live.figures()["score"])
    assert after["p_value"] == pytest.approx(live.figures()["p_value"])


def test_without_a_reference_nothing_is_monitored(series):
    live = LiveDrift(None, series.drift)
    live.add(features(np.random.default_rng(0), 30))
    assert all(math.isnan(value) for value in gauges(series).values())
    assert live.figures() == {"enabled": False}


def test_features_the_reference_cannot_take_leave_the_figures_as_they_were(series, reference, caplog):
    live = LiveDrift(reference, series.drift)
    live.add(features(np.random.default_rng(3), WINDOW))
    before = gauges(series)
    wrong = np.zeros((5, 4, CHANNELS + 1))
    live.add(wrong)
    live.add(wrong)  # logged once, never raised: the captions of the batch are already made
    assert gauges(series) == before and live.monitor.seen == WINDOW
    assert sum("drift monitor failed" in record.message for record in caplog.records) == 1


# ---------------------------------------------------------------- through the captioning of a batch


@dataclass
class Job:
    image: bytes
    beam_size: int | None = None
    max_length: int | None = None
    return_attention: bool = False


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    torch.manual_seed(0)
    vocab = Vocabulary.build(["a red circle", "two blue squares", "a green star"], 1)
    dim = ENCODERS["lite0"].feature_dim
    model = build_model(
        {"decoder": "attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 8}, len(vocab), dim
    )
    config = {"model": model.config, "encoder": "lite0", "feature_dim": dim, "decoding": {"beam_size": 2}}
    return Captioner(model, vocab, config, device="cpu")


def test_each_captioned_image_is_handed_on_once_with_the_same_captions(captioner, series):
    images = [synthetic_jpeg(seed) for seed in range(3)]
    handed: list[torch.Tensor] = []
    jobs = [Job(images[0]), Job(b"not an image"), Job(images[1]), Job(images[2], beam_size=1)]
    results = caption_jobs(captioner, jobs, series.metrics, on_features=handed.append)
    # The batch with the unreadable image was captioned again one by one: the others once each.
    assert "error" in results[1] and sum(len(batch) for batch in handed) == 3
    expected = captioner.encode(images)
    got = torch.cat(handed)
    assert got.shape == expected.shape == (3, 49, ENCODERS["lite0"].feature_dim)
    assert sorted(got.sum(dim=(1, 2)).tolist()) == pytest.approx(sorted(expected.sum(dim=(1, 2)).tolist()), rel=1e-4)
    plain = caption_jobs(captioner, jobs, series.metrics)
    assert [r.get("caption") for r in plain] == [r.get("caption") for r in results]


def test_with_flip_only_the_image_itself_is_handed_on(captioner):
    images = [synthetic_jpeg(seed) for seed in range(2)]
    handed: list[torch.Tensor] = []
    decoding = captioner.settings_for(flip=True)
    results = captioner.caption(images, decoding, on_features=handed.append)
    assert results == captioner.caption(images, decoding)
    assert torch.allclose(handed[0], captioner.encode(images, flip=False), atol=1e-5)
