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


def gate_table(metrics: dict[str, float], gates: dict, champion: dict[str, float] | None) -> list[dict]:
    """The gate decision metric by metric (the rows `gate_reasons` decides on): the candidate's
    value, the minimum, the champion's value and the margin to beat it by, and pass or fail."""
    names = list(dict.fromkeys([*(gates.get("min") or {}), *(gates.get("margin") or {})]))
    rows = []
    for metric in names:
        minimum = (gates.get("min") or {}).get(metric)
        margin = (gates.get("margin") or {}).get(metric) if champion is not None else None
        best = (champion or {}).get(metric)
        gate = {"min": {metric: minimum}} if minimum is not None else {}
        if margin is not None:
            gate["margin"] = {metric: margin}
        refused = gate_reasons({k: v for k, v in metrics.items() if k == metric}, gate, champion)
        rows.append(
            {
                "metric": metric,
                "candidate": metrics.get(metric),
                "minimum": None if minimum is None else float(minimum),
                "champion": best,
                "margin": None if margin is None else float(margin),
                "outcome": "fail" if refused else "pass",
            }
        )
    return rows
