"""Training a caption model (the library's `train`), with its progress in the run log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioning.settings import Settings
from tasks import run_logger


class RunLog:
    """Training callbacks that report to the Prefect run log (one line per epoch)."""

    def __init__(self, logger):
        self.logger = logger
        self.started = False

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.started = True
        self.logger.info(
            "training on %s images (%s caption pairs), %s steps per epoch, %s parameters, %s, %s",
            info.get("train_images"),
            info.get("train_pairs"),
            info.get("steps_per_epoch"),
            info.get("parameters"),
            info.get("device"),
            info.get("precision"),
        )

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        shown = {key: round(value, 4) for key, value in metrics.items() if isinstance(value, float)}
        self.logger.info("epoch %d: %s", epoch, shown)

    def on_train_end(self, result) -> None:
        self.logger.info("best epoch: %s; package %s", result.best.get("epoch"), result.package_dir)


def prefect_run_tags() -> dict[str, str]:
    """The Prefect flow run this training belongs to, as MLflow run tags (its UI page when the
    server has a UI URL, else its API URL), so the MLflow run links back to it."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    if flow_run.id is None:
        return {}
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    ui = str(PREFECT_UI_URL.value() or "")
    # The page the UI shows a flow run on (the address Prefect's own "View at" log line gives).
    for url in (f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}", flow_run.api_url):
        if url and url.startswith(("http://", "https://")):
            tags["prefect.flow_run_url"] = url
            break
    return tags


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(settings: Settings, out_dir: str, tracking: str | None = None) -> dict[str, Any]:
    """Train as `settings` say into `out_dir`; a finished run there with the same settings is reused.

    With a `tracking` URI the run is logged to MLflow (params, losses, validation metrics, artifacts).
    The per-epoch history is also written to out_dir/history.csv.
    """
    from captioning.evaluation.report import write_history
    from captioning.training import train
    from tasks.artifacts import TrainingProgress, publish_training

    logger = run_logger()
    log = RunLog(logger)
    callbacks: list[Any] = [log, TrainingProgress(settings.train.epochs)]
    tracker = None
    if tracking:
        from captioning.training.tracking import MLflowCallback

        tags = {"orchestrator": "prefect", **prefect_run_tags()}
        tracker = MLflowCallback(tracking, settings.tracking.experiment, tags=tags)
        callbacks.append(tracker)
    try:
        result = train(settings, callbacks, out_dir=out_dir)
    except BaseException as error:
        if tracker is not None:
            tracker.on_train_failed(error)
        raise
    if tracker is not None and not log.started:
        # A finished run in out_dir was reused: no epoch ran, the MLflow run only records that.
        tracker.client.set_tag(tracker.run_id, "reused_training", str(out_dir))
        tracker.close()
        logger.info("reused the finished training in %s", out_dir)
    history = write_history(result.history, Path(out_dir) / "history.csv")
    run = {"tracking": tracking, "experiment_id": tracker.experiment_id, "run_id": tracker.run_id} if tracker else None
    publish_training(result.history, result.best, run)
    return {
        "package_dir": str(result.package_dir),
        "best": dict(result.best),
        "history": [dict(row) for row in result.history],
        "history_csv": str(history),
        "mlflow_run_id": getattr(tracker, "run_id", None),
    }
