"""Whether a candidate may become champion: pure functions over its metrics, the gates and the
champion's metrics. A version's metrics travel as its tags `metric.NAME`."""

from __future__ import annotations

import contextlib

METRIC_TAG = "metric."


def metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    """The metrics as model-version tags (four decimals)."""
    return {f"{METRIC_TAG}{key}": f"{float(value):.4f}" for key, value in metrics.items()}


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    """The metrics a version's tags hold (tags that are not numbers are left out)."""
    result = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG):
            with contextlib.suppress(ValueError):
                result[key[len(METRIC_TAG) :]] = float(value)
    return result


def gate_reasons(metrics: dict[str, float], gates: dict, champion: dict[str, float] | None) -> list[str]:
    """Why a candidate must not become champion (empty when it passes).

    gates["min"]: metric -> lowest acceptable value. gates["margin"]: metric -> how much the
    candidate must beat the champion's value by (only when there is a champion).
    """
    reasons = []
    for metric, threshold in (gates.get("min") or {}).items():
        value = metrics.get(metric)
        if value is None:
            reasons.append(f"{metric} missing from the metrics (gate min {threshold})")
        elif value < float(threshold):
            reasons.append(f"{metric} {value:.2f} < minimum {float(threshold):.2f}")
    if champion is not None:
        for metric, margin in (gates.get("margin") or {}).items():
            value, best = metrics.get(metric), champion.get(metric)
            if value is None:
                reasons.append(f"{metric} missing from the metrics (gate margin {margin})")
            elif best is None:
                reasons.append(f"the champion has no {metric} to compare with")
            elif value < best + float(margin):
                reasons.append(f"{metric} {value:.2f} does not beat the champion's {best:.2f} by {float(margin):.2f}")
    return reasons
