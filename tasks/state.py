"""The retrain record as Prefect tasks: has anything changed since the last training, and
recording what a training saw (its `RetrainRecord`, from the library's `captioning.registry.retrain_record`)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import run_logger


@task(name="check-for-new-data", cache_policy=NO_CACHE)
def check_for_new_data(dataset: str, params: Any, use_feedback: bool = True) -> dict[str, Any]:
    """Compare the data and settings with the last training: {"new": bool, "reasons": [...], ...}."""
    from captioning.registry.retrain_record import check_for_new_data as check

    result = check(dataset, params, use_feedback=use_feedback)
    if result["new"]:
        run_logger().info("retraining: %s", "; ".join(result["reasons"]))
    else:
        run_logger().info(
            "nothing new since %s (data %s, settings %s)",
            result["last"].get("trained_at"),
            result["data"],
            result["params"],
        )
    return result


@task(name="record-training", cache_policy=NO_CACHE)
def record_training(check: dict[str, Any], outcome: dict[str, Any], started_at: str) -> str:
    """Remember what this training saw; `started_at` bounds the feedback it could have used."""
    from captioning.registry.retrain_record import record_training as record

    path = record(check, outcome, started_at)
    run_logger().info("retrain record written to %s", path)
    return str(path)
