"""The drift statistic on random features: calibrated on one distribution, alarmed by another.

Real photos are in tests/integration/test_drift_photos.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from captioning.features.drift import (
    DRIFT_FILE,
    DriftMonitor,
    DriftReference,
    DriftReferenceError,
    mmd2,
    pool,
    summary,
)

CHANNELS = 64


def features(rng: np.random.Generator, count: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Vectors that vary mostly along a few directions, as pooled encoder features do."""
    basis = np.random.default_rng(1234).normal(size=(8, CHANNELS))  # the same directions in every call
    return (rng.normal(size=(count, 8)) * scale) @ basis + rng.normal(size=(count, CHANNELS)) * 0.5 + shift


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    return DriftReference.fit(features(np.random.default_rng(0), 1000), window=50, seed=0)


def test_mmd2_is_about_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 16))
    same = mmd2(rng.normal(size=(200, 16)), base)
    small = mmd2(rng.normal(size=(200, 16)) + 0.3, base)
    large = mmd2(rng.normal(size=(200, 16)) + 1.0, base)
    assert abs(same) < 0.01
    assert same < small < large
    assert mmd2(base, base[::-1].copy()) == pytest.approx(mmd2(base, base))  # order does not matter
    with pytest.raises(ValueError, match="two vectors"):
        mmd2(base[:1], base)


def test_the_threshold_is_the_permutation_quantile(reference):
    assert reference.window == 50 and reference.images == 1000 and reference.alpha == 0.01
    assert len(reference.reference) == 500 and reference.components.shape == (CHANNELS, 32)
    above = float(np.mean(reference.null > reference.threshold))
    assert above <= 0.01
    assert reference.null.min() < 0 < reference.threshold  # scores of training windows centre on 0
    assert reference.p_value(reference.null.max() + 1) == pytest.approx(1 / (1 + len(reference.null)))
    assert reference.p_value(reference.null.min() - 1) == 1.0


def test_windows_from_the_training_distribution_rarely_alarm():
    alarms, windows, scores = 0, 0, []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        fitted = DriftReference.fit(features(rng, 1000), window=50, seed=seed)
        for _ in range(30):
            score = fitted.score(features(rng, 50))
            scores.append(score)
            alarms += fitted.alarm(score)
            windows += 1
    print(f"false alarms: {alarms} of {windows} windows (alpha 0.01); mean score {np.mean(scores):.5f}")
    assert alarms <= 0.05 * windows
    assert abs(np.mean(scores)) < 0.002  # the estimate is unbiased: no drift, a score of about 0


def test_shifted_or_wider_features_raise_the_alarm(reference):
    rng = np.random.default_rng(7)
    for shift, scale in ((0.5, 1.0), (0.0, 1.5), (1.0, 1.0)):
        score = reference.score(features(rng, 50, shift=shift, scale=scale))
        assert reference.alarm(score), (shift, scale, score, reference.threshold)
        assert reference.p_value(score) < 0.01


def test_score_takes_exactly_a_window_of_the_right_width(reference):
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="windows of 50 images, not 49"):
        reference.score(features(rng, 49))
    with pytest.raises(ValueError, match="63 channels"):
        reference.score(features(rng, 50)[:, :63])
    bad = features(rng, 50)
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reference.score(bad)


def test_fit_refuses_too_few_images():
    with pytest.raises(ValueError, match="at least 100 training images"):
        DriftReference.fit(features(np.random.default_rng(0), 99), window=50)
    with pytest.raises(ValueError, match="alpha"):
        DriftReference.fit(features(np.random.default_rng(0), 100), window=50, alpha=1.5)


def test_pool_averages_positions_of_numpy_or_torch_features():
    spatial = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    expected = spatial.astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(pool(spatial), expected)
    np.testing.assert_allclose(pool(torch.from_numpy(spatial)), expected)
    np.testing.assert_allclose(pool(expected), expected)  # already pooled
    with pytest.raises(ValueError, match="images, channels"):
        pool(np.zeros(5))


def test_save_and_load_give_the_same_reference(tmp_path, reference):
    path = reference.save(tmp_path)
    assert path == tmp_path / DRIFT_FILE and not list(tmp_path.glob("*.tmp"))
    loaded = DriftReference.load(tmp_path)
    for name in ("mean", "components", "reference", "null"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(reference, name))
    assert (loaded.gamma, loaded.threshold, loaded.window, loaded.alpha, loaded.images, loaded.encoder) == (
        reference.gamma,
        reference.threshold,
        50,
        0.01,
        1000,
        "",
    )
    window = features(np.random.default_rng(3), 50, shift=0.2)
    assert loaded.score(window) == reference.score(window)
    # The same reference gives the same bytes (a package's digest depends on its content only).
    first = path.read_bytes()
    reference.save(tmp_path)
    assert path.read_bytes() == first


def test_a_reference_of_encoder_features_is_a_small_file(tmp_path):
    rng = np.random.default_rng(0)
    pooled = np.abs(rng.normal(size=(600, 1280))).astype(np.float16)  # post-activation features are >= 0
    fitted = DriftReference.fit(pooled, window=100, encoder="lite0")
    size = fitted.save(tmp_path).stat().st_size
    print(f"drift.npz for 1280 channels, {len(fitted.reference)} reference vectors: {size / 1024:.0f} KB")
    assert size < 400_000
    assert DriftReference.load(tmp_path).encoder == "lite0"


def test_load_says_none_when_missing_and_refuses_a_damaged_file(tmp_path, reference):
    assert DriftReference.load(tmp_path) is None
    (tmp_path / DRIFT_FILE).write_bytes(b"not a zip file")
    with pytest.raises(DriftReferenceError, match="cannot be read"):
        DriftReference.load(tmp_path)

    reference.save(tmp_path)
    data = (tmp_path / DRIFT_FILE).read_bytes()
    (tmp_path / DRIFT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DriftReferenceError, match="cannot be read"):
        DriftReference.load(tmp_path)

    arrays = {name: getattr(reference, name) for name in ("mean", "components", "reference", "null")}
    scalars = dict(gamma=reference.gamma, threshold=reference.threshold, window=50, alpha=0.01, images=1000, encoder="")
    np.savez(tmp_path / DRIFT_FILE, format=99, **arrays, **scalars)
    with pytest.raises(DriftReferenceError, match="format 99"):
        DriftReference.load(tmp_path)
    np.savez(tmp_path / DRIFT_FILE, format=1, **{**arrays, "components": arrays["components"][:10]}, **scalars)
    with pytest.raises(DriftReferenceError, match="inconsistent"):
        DriftReference.load(tmp_path)
    np.savez(tmp_path / DRIFT_FILE, format=1, **arrays, **{**scalars, "gamma": np.array([1.0, 2.0])})
    with pytest.raises(DriftReferenceError, match="inconsistent"):
        DriftReference.load(tmp_path)
    np.savez(tmp_path / DRIFT_FILE, format=1, **arrays)  # no scalars
    with pytest.raises(DriftReferenceError, match="cannot be read"):
        DriftReference.load(tmp_path)


def test_monitor_scores_the_last_window_once_it_is_full(reference):
    monitor = DriftMonitor(reference)
    rng = np.random.default_rng(5)
    same = features(rng, 60)
    monitor.add(same[:30])
    assert monitor.score() is None and len(monitor) == 30
    monitor.add(same[30:])
    assert len(monitor) == 50 and monitor.seen == 60
    np.testing.assert_allclose(monitor.recent(), reference.project(same[10:]))  # the last 50, oldest first
    assert monitor.score() == pytest.approx(reference.score(same[10:]))
    assert not reference.alarm(monitor.score())

    shifted = features(rng, 50, shift=1.0)
    # Unpooled (B, N, C) features are pooled on the way in.
    monitor.add(np.repeat(shifted[:, None, :], 4, axis=1))
    assert monitor.seen == 110
    assert monitor.score() == pytest.approx(reference.score(shifted))
    assert reference.alarm(monitor.score())


def test_monitor_window_must_be_the_references():
    fitted = DriftReference.fit(features(np.random.default_rng(0), 200), window=20, permutations=50)
    assert DriftMonitor(fitted, 20).window == 20
    with pytest.raises(ValueError, match="windows of 20 images, not 30"):
        DriftMonitor(fitted, 30)


def test_monitor_is_safe_to_share_between_threads(reference):
    monitor = DriftMonitor(reference)
    rng = np.random.default_rng(9)
    batches = [features(rng, 3) for _ in range(80)]
    errors: list[BaseException] = []

    def work(part: list[np.ndarray]) -> None:
        try:
            for batch in part:
                monitor.add(batch)
                monitor.score()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(batches[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert monitor.seen == 240 and len(monitor) == 50
    # Every kept vector is one that was added, none twice: batches were never torn or mixed up.
    added = reference.project(np.concatenate(batches))
    kept = monitor.recent()
    matches = [np.flatnonzero(np.all(np.isclose(added, row), axis=1)) for row in kept]
    assert all(len(match) == 1 for match in matches)
    assert len({int(match[0]) for match in matches}) == 50
    assert monitor.score() == pytest.approx(reference.score_projected(kept))


def test_summary_scores_the_last_window_and_counts_alarmed_windows(reference):
    rng = np.random.default_rng(11)
    same = features(rng, 120)  # two complete windows from the newest back, 20 images left over
    quiet = summary(reference, same)
    assert quiet["images"] == 120 and quiet["window"] == 50 and quiet["windows"] == 2
    assert quiet["score"] == reference.score(same[-50:]) and quiet["alarm"] is False
    assert quiet["alarmed_windows"] == 0 and quiet["threshold"] == reference.threshold and quiet["alpha"] == 0.01
    assert quiet["p_value"] == reference.p_value(quiet["score"]) and quiet["reason"] == ""

    drifted = summary(reference, np.concatenate([same[:100], features(rng, 50, shift=1.0)]))
    assert drifted["alarm"] is True and drifted["windows"] == 3 and drifted["alarmed_windows"] == 1
    assert drifted["p_value"] < 0.01 and drifted["score"] > reference.threshold


def test_summary_without_a_reference_or_a_full_window_says_why(reference):
    few = summary(reference, features(np.random.default_rng(0), 30))
    assert few["score"] is None and few["alarm"] is None and few["windows"] == 0
    assert few["reason"] == "30 images, fewer than a window of 50" and few["threshold"] == reference.threshold
    none = summary(None, features(np.random.default_rng(0), 80))
    assert none["score"] is None and none["threshold"] is None and "no drift reference" in none["reason"]


def test_pool_finite_leaves_out_the_images_with_broken_features():
    from captioning.features.drift import pool, pool_finite

    stored = np.ones((4, 3, 8), dtype=np.float32)
    stored[1, 2, 5] = np.nan
    stored[3, 0, 0] = np.inf
    kept = pool_finite(stored)
    assert kept.shape == (2, 8) and np.isfinite(kept).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        pool(stored)
