"""What each flow shows in the Prefect UI: artifacts built from the library's results.

Every artifact has a stable key (lowercase letters, digits, dashes), so the Artifacts page shows
one entry per kind with its history across runs: `acquisition-synthetic`, `validation-synthetic`,
`training-epochs`, `evaluation-comparison`, `registration-gate`, `release-stages`, ...

The `*_table` / `*_markdown` functions build the content from plain results (tested as plain
functions); the `publish_*` functions create the artifacts, inside a flow or task run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable
from uuid import UUID

METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from `parts`: lowercase letters, digits and single dashes."""
    text = "-".join(str(part) for part in parts if part)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "artifact"


def _number(value: Any, digits: int = 2) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) else value


def _megabytes(size: int | None) -> str:
    return "" if size is None else f"{size / 1e6:.1f} MB"


def _cells(values: Iterable[Any]) -> str:
    return "| " + " | ".join("" if value is None else str(value) for value in values) + " |"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """`rows` (dicts with the same keys) as a Markdown table."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = [_cells(header), _cells("---" for _ in header)]
    lines += [_cells(row.get(name) for name in header) for row in rows]
    return "\n".join(lines)


def file_link(path: str | Path) -> str:
    """A file:// URL of `path` (Prefect link artifacts take any URL)."""
    return Path(path).resolve().as_uri()


# --------------------------------------------------------------------------- acquisition


def folder_size(folder: str | Path) -> tuple[int, int]:
    """(files, bytes) under `folder`."""
    files = size = 0
    for path in Path(folder).rglob("*"):
        if path.is_file():
            files += 1
            size += path.stat().st_size
    return files, size


def acquisition_markdown(name: str, folder: str, data_hash: str | None, marker: dict | None) -> str:
    """What acquiring `name` fetched (the archives of its `.acquired.json` marker, with their
    digests), how large the folder is, and the DVC hash that versions it."""
    files, size = folder_size(folder)
    how = f"{marker['method']} on {marker['acquired_at']}" if marker else "generated or collected here (no download)"
    lines = [
        f"# Dataset {name}",
        "",
        f"- folder: `{folder}` ({files} files, {_megabytes(size)})",
        f"- acquired by: {how}",
        f"- DVC hash of data/: `{data_hash or 'not versioned'}`",
    ]
    archives = [
        {
            "archive": entry.get("filename") or entry.get("source"),
            "from": entry.get("url") or entry.get("source"),
            "size": _megabytes(entry.get("bytes")) or "",
            "sha256": entry.get("sha256", ""),
            "verified by": entry.get("verified", ""),
        }
        for entry in (marker or {}).get("archives", [])
    ]
    if archives:
        lines += ["", "## Fetched", "", markdown_table(archives)]
    return "\n".join(lines) + "\n"


def publish_acquisition(name: str, folder: str, data_hash: str | None) -> None:
    from prefect.artifacts import create_markdown_artifact

    from captioning.data.acquire import read_marker

    create_markdown_artifact(
        acquisition_markdown(name, folder, data_hash, read_marker(folder)),
        key=artifact_key("acquisition", name),
        description=f"What was fetched for {name}, its size, digests and DVC hash",
    )


# --------------------------------------------------------------------------- validation


def validation_table(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per expectation of the suite (validation.json's `checks`): passed or failed, how
    many values broke it and the first of its messages."""
    return [
        {
            "expectation": check.get("check"),
            "result": "passed"
            if check.get("success")
            else ("failed" if check.get("severity") == "error" else "warned"),
            "severity": check.get("severity"),
            "unexpected": check.get("unexpected_count", 0),
            "example": (check.get("messages") or [""])[0][:200],
        }
        for check in checks
    ]


def publish_validation(outcome: dict[str, Any]) -> None:
    """The expectations of a validation (its validation.json beside the report) and a link to the
    Great Expectations HTML report."""
    import json

    from prefect.artifacts import create_link_artifact, create_table_artifact

    name, report = outcome["dataset"], Path(outcome["report"])
    details = report.parent / "validation.json"  # gone when reports/ was cleaned after a cached run
    checks = json.loads(details.read_text(encoding="utf-8")).get("checks", []) if details.is_file() else []
    verdict = "passed" if outcome["success"] else f"failed ({len(outcome['failures'])} failure(s))"
    create_table_artifact(
        validation_table(checks),
        key=artifact_key("validation", name),
        description=f"{name} {verdict}: {outcome['summary'].get('images')} images, "
        f"{outcome['summary'].get('captions')} captions",
    )
    create_link_artifact(
        file_link(report),
        link_text=f"validation report of {name} ({report})",
        key=artifact_key("validation-report", name),
        description=f"Great Expectations report of {name}",
    )


# --------------------------------------------------------------------------- features


def features_table(built: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per data query whose images were encoded (build_features results)."""
    return [
        {
            "query": item["query"],
            "images": item["images"],
            "encoded": item["encoded"],
            "reused": item["images"] - item["encoded"],
            "seconds": _number(item.get("seconds", 0.0), 1),
            "store": item.get("store"),
        }
        for item in built
    ]


def publish_features(built: list[dict[str, Any]], encoder: str) -> None:
    from prefect.artifacts import create_table_artifact

    encoded = sum(item["encoded"] for item in built)
    create_table_artifact(
        features_table(built),
        key=artifact_key("features", encoder),
        description=f"{encoded} images encoded with {encoder}, "
        f"{sum(item['images'] for item in built) - encoded} read from the cache",
    )


# --------------------------------------------------------------------------- training


def mlflow_run_url(tracking: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run when the store is a tracking server (None for a database)."""
    if not tracking.startswith(("http://", "https://")):
        return None
    return f"{tracking.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def epochs_table(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch: the losses and validation scores (numbers rounded, samples left out)."""
    return [
        {key: _number(value, 4) for key, value in row.items() if isinstance(value, (int, float, str)) and key != "step"}
        for row in history
    ]


class TrainingProgress:
    """A training callback: a progress artifact at 0 % when training starts, moved at each epoch."""

    def __init__(self, epochs: int, key: str = "training-progress"):
        self.epochs, self.key = max(1, int(epochs)), key
        self.artifact_id: UUID | None = None

    def on_train_start(self, info: dict[str, Any]) -> None:
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = create_progress_artifact(
            0.0, key=self.key, description=f"training: 0 of {self.epochs} epoch(s)"
        )

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact_id is not None:
            done = min(100.0, 100.0 * epoch / self.epochs)
            update_progress_artifact(self.artifact_id, done, description=f"training: {epoch} of {self.epochs} epoch(s)")

    def on_train_end(self, result) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact_id is not None:  # early stopping ends before the last epoch
            update_progress_artifact(self.artifact_id, 100.0, description="training finished")


def publish_training(history: list[dict[str, Any]], best: dict[str, Any], run: dict[str, str] | None) -> None:
    """The table of epochs and where the MLflow run is (`run`: tracking, experiment_id, run_id)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    rows = epochs_table(history)
    if rows:
        best_epoch = best.get("epoch")
        create_table_artifact(rows, key="training-epochs", description=f"{len(rows)} epoch(s), best: {best_epoch}")
    if not run:
        return
    url = mlflow_run_url(run["tracking"], run["experiment_id"], run["run_id"])
    if url:
        create_link_artifact(url, link_text=f"MLflow run {run['run_id']}", key="training-mlflow-run")
        return
    create_markdown_artifact(
        f"MLflow run `{run['run_id']}` (experiment {run['experiment_id']}) in the store `{run['tracking']}`: "
        f"`mlflow ui --backend-store-uri {run['tracking']}` shows it.",
        key="training-mlflow-run",
    )


# --------------------------------------------------------------------------- evaluation


def comparison_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison table's rows (model, decoding setting, scores), scores rounded."""
    return [
        {"model": row["model"], "decoding": row["decoding"], **{m: _number(row.get(m)) for m in METRICS if m in row}}
        for row in rows
    ]


def publish_evaluation(rows: list[dict[str, Any]], query: str, report: str) -> None:
    from prefect.artifacts import create_link_artifact, create_table_artifact

    create_table_artifact(
        comparison_rows(rows),
        key="evaluation-comparison",
        description=f"candidate and champion on {query}, at each decoding setting",
    )
    if Path(report).is_file():
        create_link_artifact(
            file_link(report),
            link_text=f"evaluation report with attention maps ({report})",
            key="evaluation-report",
        )


# --------------------------------------------------------------------------- registration


def gate_rows(metrics: dict[str, float], gates: dict, champion: dict[str, float] | None) -> list[dict[str, Any]]:
    """The gate decision, metric by metric (captioning.registry.gates.gate_table), rounded."""
    from captioning.registry.gates import gate_table

    return [{key: _number(value) for key, value in row.items()} for row in gate_table(metrics, gates, champion)]


def verdict_markdown(result: dict[str, Any], query: str) -> str:
    """The registration's verdict in words."""
    version = result["version"]
    if result["promoted"]:
        before = f"; it replaces version {result['previous']}" if result.get("previous") else " (the first one)"
        head = f"**Version {version} is the new champion**{before}."
    else:
        kept = f"version {result['champion']} stays champion" if result.get("champion") else "there is no champion yet"
        head = f"**Version {version} was not promoted**: {kept}."
    lines = [head, "", f"Scored on `{query}`."]
    if result.get("reasons"):
        lines += ["", "Why not:", ""] + [f"- {reason}" for reason in result["reasons"]]
    return "\n".join(lines) + "\n"


def publish_registration(result: dict[str, Any], metrics: dict[str, float], gates: dict, query: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        gate_rows(metrics, gates, result.get("champion_metrics")),
        key="registration-gate",
        description=f"version {result['version']}: {'passed' if result['promoted'] else 'failed'} the gates",
    )
    create_markdown_artifact(verdict_markdown(result, query), key="registration-verdict")


# --------------------------------------------------------------------------- retrain


DRIFT_ADVICE = (
    "Retraining on the same data will not fix drift: add photos like the recent uploads to the training "
    "data (with their captions), then retrain."
)


def _figure(value: Any, digits: int) -> str:
    return "" if value is None else f"{float(value):.{digits}g}"


def live_drift_rows(live: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model server of the live drift figures (captioning.release.live_drift)."""
    alarm = {True: "**yes**", False: "no", None: ""}
    return [
        {
            "version": server["version"],
            "server": server["server"],
            "drift score": _figure(server["score"], 4),
            "threshold": _figure(server["threshold"], 4),
            "p-value": _figure(server["p_value"], 3),
            "alarm": alarm[server["alarm"]] or server.get("note", ""),
        }
        for server in live.get("servers", [])
    ]


def live_drift_markdown(live: dict[str, Any] | None) -> str:
    """The "Live photos" section: the drift of what the served versions caption, where it was read,
    and what to do when it alarms; without figures, why there are none."""
    lines = ["## Live photos", ""]
    if not live or not live.get("servers"):
        reason = (live or {}).get("reason") or "no live drift figures: none were read"
        return "\n".join(lines + [reason]) + "\n"
    lines += [
        f"Drift of the photos each served version captions against its training images, "
        f"from {live['source']} at {live.get('read_at', '')}:",
        "",
        markdown_table(live_drift_rows(live)),
    ]
    alarmed = sorted({server["version"] for server in live["servers"] if server["alarm"]})
    if alarmed:
        lines += ["", f"**Drift alarm on version {', '.join(alarmed)}.** {DRIFT_ADVICE}"]
    return "\n".join(lines) + "\n"


def decision_markdown(
    dataset: str,
    registration: dict[str, Any],
    evaluation: dict[str, Any],
    gates: dict,
    train_query: str,
    live: dict[str, Any] | None = None,
) -> str:
    """The retrain run's decision on one page: the verdict, the comparison table (candidate and
    champion at each decoding setting), the gate decision metric by metric and the live photos' drift."""
    metrics, query = evaluation["metrics"], evaluation["query"]
    lines = [
        f"# Retrain of {dataset}: version {registration['version']}",
        "",
        f"Trained on `{train_query}`.",
        "",
        verdict_markdown(registration, query),
        "## Evaluation",
        "",
        markdown_table(comparison_rows(evaluation["rows"])),
        "",
        "## Gate decision",
        "",
        markdown_table(gate_rows(metrics, gates, registration.get("champion_metrics"))) or "no gates set",
        "",
        live_drift_markdown(live),
    ]
    return "\n".join(lines)


def publish_decision(
    dataset: str,
    registration: dict[str, Any],
    evaluation: dict[str, Any],
    gates: dict,
    train_query: str,
    live: dict[str, Any] | None = None,
) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        decision_markdown(dataset, registration, evaluation, gates, train_query, live),
        key=artifact_key("retrain-decision", dataset),
        description=registration["message"],
    )


def skipped_markdown(dataset: str, message: str, live: dict[str, Any] | None) -> str:
    """The decision of a retrain run that trained nothing: why, and the live photos' drift (an
    alarm there is what calls for new training data)."""
    lines = [f"# Retrain of {dataset}: skipped", "", f"**Nothing trained**: {message}.", "", live_drift_markdown(live)]
    return "\n".join(lines)


def publish_skipped(dataset: str, message: str, live: dict[str, Any] | None) -> None:
    """The skipped run's decision, under the same key as a trained one's: one history per dataset."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        skipped_markdown(dataset, message, live),
        key=artifact_key("retrain-decision", dataset),
        description=f"skipped: {message}",
    )


# --------------------------------------------------------------------------- release


def stages_table(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rollout stage: its outcome, the reason, and the check and figure that decided."""
    return [
        {
            "stage": verdict.get("stage"),
            "outcome": verdict.get("outcome"),
            "reason": verdict.get("reason"),
            "check": verdict.get("check"),
            "figure": _number(verdict.get("figure"), 4),
            "threshold": _number(verdict.get("threshold"), 4),
        }
        for verdict in verdicts
    ]


def release_markdown(message: str, built: dict[str, Any] | None, verdicts: list[dict[str, Any]]) -> str:
    """What a release built and rolled out (or why not), stage by stage."""
    lines = [f"**{message}**", ""]
    if built:
        how = f"built in {built['build_seconds']:.0f} s" if built.get("built") else "already built"
        lines += [
            f"- version: {built['version']} ({built.get('model')})",
            f"- image: `{built['image']}` ({_megabytes(built.get('size_bytes'))}, {how})",
            f"- bento: `{built.get('bento')}`",
        ]
    if verdicts:
        lines += ["", markdown_table(stages_table(verdicts))]
    return "\n".join(lines) + "\n"


def publish_release(message: str, built: dict[str, Any] | None, verdicts: list[dict[str, Any]]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(release_markdown(message, built, verdicts), key="release", description=message)
    if verdicts:
        create_table_artifact(stages_table(verdicts), key="release-stages", description=message)
