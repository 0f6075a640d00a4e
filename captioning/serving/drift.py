"""Drift of the live photos the model service captions: do they still look like the training images?

The model service keeps a `LiveDrift` for the package it serves: the encoder features of the
images it captions (those of /caption and /caption_batch requests, and of shadow copies sent to a
candidate), pooled over positions, go into a `DriftMonitor` of the package's drift reference
(`drift.npz`, `captioning.features.drift`) after each batch, and three gauges show its figures:

    captioning_drift_score       MMD² of the last `window` live images against the training images
    captioning_drift_threshold   the score above which they differ (p < the reference's alpha)
    captioning_drift_p_value     the score's permutation p-value

The score and p-value are NaN until `window` images were captioned, and all three are NaN when
the package carries no drift reference (drift monitoring off). A reload starts a new window.
deploy/prometheus/alerts.yml alerts on a score that stays above the threshold (CaptioningDriftHigh);
`drift_figures` reads the figures back from a /metrics page.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from captioning.features.drift import DriftMonitor, DriftReference
from captioning.serving.metrics import DriftMetrics

logger = logging.getLogger("captioning.service")

SERIES = {
    "score": "captioning_drift_score",
    "threshold": "captioning_drift_threshold",
    "p_value": "captioning_drift_p_value",
}


class LiveDrift:
    """The drift monitor of the package served, and its gauges (see the module docstring)."""

    def __init__(self, reference: DriftReference | None, gauges: DriftMetrics | None = None):
        self.reference = reference
        self.monitor = DriftMonitor(reference) if reference is not None else None
        self.gauges = gauges
        self._failed = False  # logged once: a broken monitor must not fill the log at every batch
        self._show(None)

    @classmethod
    def for_package(cls, folder: str | Path, config: dict[str, Any], gauges: DriftMetrics | None = None):
        """The monitor of the package in `folder` (PackageError when its drift.npz is damaged);
        off when it has none, or when its reference comes from other features than the
        package's encoder computes."""
        from captioning.inference.model_package import feature_key, load_drift

        reference = load_drift(folder, config)
        if reference is not None and reference.encoder and reference.encoder != feature_key(config):
            logger.warning(
                "drift monitoring off: the package's drift reference holds %s features, its encoder gives %s",
                reference.encoder,
                feature_key(config),
            )
            reference = None
        if reference is None:
            logger.info("drift monitoring off: the package %s has no drift reference", folder)
        else:
            logger.info(
                "drift monitoring: windows of %d images, threshold %.5f (alpha %g, %d training images)",
                reference.window,
                reference.threshold,
                reference.alpha,
                reference.images,
            )
        return cls(reference, gauges)

    def add(self, features) -> None:
        """Add a batch of live images' encoder features (B, N, C) and show the new score.
        Never raises: a failure here must not fail the captions already made."""
        if self.monitor is None:
            return
        try:
            self.monitor.add(features)
            score = self.monitor.score()
        except Exception:
            if not self._failed:
                logger.exception("drift monitor failed on a batch; its figures stay as they were")
                self._failed = True
            return
        self._show(score)

    def figures(self) -> dict[str, Any]:
        """The monitor's state as JSON-able figures (None where there is no value)."""
        if self.monitor is None:
            return {"enabled": False}
        score = self.monitor.score()
        return {
            "enabled": True,
            "window": self.monitor.window,
            "images_seen": self.monitor.seen,
            "score": score,
            "threshold": self.reference.threshold,
            "p_value": None if score is None else self.reference.p_value(score),
            "alarm": None if score is None else self.reference.alarm(score),
        }

    def _show(self, score: float | None) -> None:
        if self.gauges is None:
            return
        threshold = self.reference.threshold if self.reference is not None else math.nan
        self.gauges.threshold.set(threshold)
        self.gauges.score.set(math.nan if score is None else score)
        self.gauges.p_value.set(math.nan if score is None else self.reference.p_value(score))


def drift_figures(metrics_text: str) -> dict[str, float | None]:
    """The drift figures on a Prometheus /metrics page: score, threshold, p_value (None where
    the page has no such series or its value is NaN) and alarm (None without a score)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float | None] = dict.fromkeys(SERIES)
    names = {series: key for key, series in SERIES.items()}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            key = names.get(sample.name)
            if key is not None and not math.isnan(sample.value):
                found[key] = sample.value
    score, threshold = found["score"], found["threshold"]
    alarm = None if score is None or threshold is None else score > threshold
    return {**found, "alarm": alarm}
