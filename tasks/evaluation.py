"""Scoring a model on a data query, the comparison table and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import run_logger


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(
    model: str,
    query: str,
    beam_size: int,
    max_length: int,
    feature_dir: str | None,
    tracking: str | None = None,
    report_path: str | None = None,
    metrics_path: str | None = None,
) -> dict[str, Any]:
    """Caption `query` with `model` (package folder or models:/ URI) and score it (percent), with
    the model's own decoding settings at `beam_size` and `max_length`.

    `feature_dir`: params features.dir; `tracking`: the registry a models:/ URI is read from.
    Writes the metrics JSON (`metrics_path`) and the HTML report (`report_path`) when given.
    """
    from captioning.evaluation.scoring import evaluate_model as evaluate
    from captioning.registry.locate import load_captioner

    logger = run_logger()
    captioner = load_captioner(model, tracking, with_encoder=False)  # features come from the cache
    result = evaluate(
        captioner,
        query,
        captioner.settings_for(beam_size=beam_size, max_length=max_length),
        attention_images=4 if report_path else 0,
        feature_dir=feature_dir,
        tracking=tracking,
    )
    payload = result.to_dict()
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if report_path:
        from captioning.evaluation.report import write_report

        payload["report"] = str(write_report(result, report_path, title=f"Evaluation of {model} on {query}"))
    logger.info(
        "%s on %s, beam %d: %s",
        model,
        query,
        beam_size,
        {name: round(value, 2) for name, value in result.metrics.items()},
    )
    return payload


@task(name="write-comparison", cache_policy=NO_CACHE)
def write_comparison(rows: list[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """The comparison table as Markdown and JSON in `out_dir`."""
    from captioning.evaluation.scoring import comparison_table
    from captioning.evaluation.scoring import write_comparison as write

    md_path, json_path = write(rows, out_dir)
    run_logger().info("comparison table:\n%s", comparison_table(rows)[0])
    return {"markdown": str(md_path), "json": str(json_path)}
