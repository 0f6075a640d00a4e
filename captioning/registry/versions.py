"""Model versions in the MLflow registry: registering one behind the metric gates, the champion and
previous aliases, rollback and the list of versions.

`register()` logs a package as an MLflow model (`captioning.registry.pyfunc`), creates a
version, tags its lineage and metrics, and moves the `champion` alias only when the gates pass
(`captioning.registry.gates`). Alias changes happen under the registration lock
(`captioning.registry.lock`) and are re-read afterwards, so two registrations racing cannot leave
`champion` and `previous` inconsistent. A tracking server that is down is reported at once
(`check_server`), and one that goes down part-way leaves the aliases coherent. Functions that need
settings take a `Settings`; the others take the tracking URI and the model name. MLflow is imported
inside functions only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from captioning.registry.gates import gate_reasons, metric_tags, metrics_from_tags
from captioning.registry.lineage import collect_lineage
from captioning.registry.lock import registry_lock, sqlite_writes
from captioning.registry.pyfunc import log_model
from captioning.registry.store import (
    RegistryError,
    alias_version,
    check_server,
    mlflow_client,
    sqlite_path,
    tracking_uri,
)

if TYPE_CHECKING:
    from captioning.settings import Settings

CHAMPION, PREVIOUS = "champion", "previous"

# What the registered model is, shown on its page in the MLflow UI.
MODEL_DESCRIPTION = (
    "An image captioner: a pretrained EfficientNet-Lite encoder reads the photo, a caption decoder "
    "trained here (params.yaml `model.decoder`) writes the sentence, decoded by beam search. "
    "Each version is a model package (weights, vocabulary, settings) registered by the retrain flow "
    "or `captioning register`, with its data, settings, test scores and gate verdict in its description. "
    f"The alias `{CHAMPION}` names the version the service serves; `{PREVIOUS}` the one it replaced "
    "(`captioning registry rollback` returns to it)."
)
# Settings that say where or how fast things run, not what the model is: left out of descriptions.
PLUMBING = {"features.dir", "features.workers", "features.batch_size", "train.progress", "train.threads"}
DESCRIBED_SECTIONS = ("data", "features", "vocab", "model", "train", "decoding")


@dataclass
class RegistrationResult:
    version: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    champion: str | None = None
    previous: str | None = None
    model_uri: str = ""
    champion_metrics: dict[str, float] | None = None  # what the margin gates compared with

    @property
    def message(self) -> str:
        if self.promoted:
            return f"version {self.version} promoted to {CHAMPION} (previous: {self.previous or 'none'})"
        return f"gate failed: version {self.version} not promoted: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "promoted": self.promoted,
            "reasons": self.reasons,
            "champion": self.champion,
            "previous": self.previous,
            "model_uri": self.model_uri,
            "champion_metrics": self.champion_metrics,
            "message": self.message,
        }


# --------------------------------------------------------------------------- settings


def model_name(settings: "Settings") -> str:
    return settings.register.model_name


def _experiment_id(uri: str, name: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite database) when missing."""
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    return client.create_experiment(name, artifact_location=location)


# --------------------------------------------------------------------------- the MLflow model


def _log_package(package_dir: Path, run_id: str | None, uri: str, experiment: str) -> tuple[str, str]:
    """Log the package as a pyfunc model; returns (model_uri, run_id)."""
    import mlflow

    # With a server URI MLflow prints run links to stdout, which is the commands' output (--json).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    start = {"run_id": run_id} if run_id else {"experiment_id": _experiment_id(uri, experiment), "run_name": "register"}
    with mlflow.start_run(**start) as run:
        return log_model(package_dir), run.info.run_id


def log_package(
    package_dir: str | Path, settings: "Settings", run_id: str | None = None, tracking: str | None = None
) -> str:
    """Log a package folder as an MLflow model (into `run_id`, or a new run of the settings'
    experiment); returns its model URI."""
    uri = tracking_uri(settings, tracking)
    with sqlite_writes(uri):
        return _log_package(Path(package_dir).resolve(), run_id, uri, settings.tracking.experiment)[0]


# --------------------------------------------------------------------------- the champion


def _champion_reference(client, name: str, query: str, given: dict[str, float] | None):
    """(champion version, its metrics on `query`, reason if they are not comparable)."""
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None, None, None
    if given is not None:
        return version, given, None
    tags = client.get_model_version(name, version).tags
    if tags.get("data_query") != str(query):
        reason = (
            f"the champion (version {version}) was scored on {tags.get('data_query')!r}, "
            f"not on {str(query)!r}: evaluate it on the same query first"
        )
        return version, None, reason
    return version, metrics_from_tags(tags), None


def champion_query(tracking: str | None, name: str) -> tuple[str | None, str | None]:
    """(champion version, the data query its stored metrics were computed on), or (None, None)."""
    client = mlflow_client(tracking_uri(None, tracking))
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None, None
    return version, client.get_model_version(name, version).tags.get("data_query")


# --------------------------------------------------------------------------- descriptions


def settings_changes(settings: "Settings", defaults: "Settings | None" = None) -> dict[str, Any]:
    """The model-defining settings (data, features, vocab, model, train, decoding) whose value
    differs from `defaults` (default: the checkout's params.yaml), by `section.key`."""
    from captioning.config import PARAMS_FILE
    from captioning.settings import flatten, load_settings

    if defaults is None:
        if not PARAMS_FILE.is_file():
            return {}
        defaults = load_settings(PARAMS_FILE)
    base, flat = flatten(defaults), flatten(settings)
    return {
        key: value
        for key, value in flat.items()
        if key.split(".", 1)[0] in DESCRIBED_SECTIONS and key not in PLUMBING and base.get(key) != value
    }


def version_description(
    settings: "Settings",
    query: str,
    metrics: dict[str, float],
    lineage: dict[str, str],
    verdict: str,
    links: dict[str, str] | None = None,
    defaults: "Settings | None" = None,
) -> str:
    """A model version's description (Markdown, as the MLflow UI shows it): what it was trained on,
    the settings that differ from params.yaml, its test scores, the gate verdict and `links`."""
    data = settings.data
    changes = settings_changes(settings, defaults)
    lines = [
        f"**{settings.model.decoder}** decoder on **{settings.features.encoder}** features, trained on "
        f"`{data.train_query}` (validated on `{data.val_query}`), data hash `{lineage.get('data_hash', 'unknown')}`, "
        f"code `{lineage.get('git_commit', 'unknown')}`.",
        "",
        "Settings that differ from params.yaml: "
        + (", ".join(f"`{key}={value}`" for key, value in sorted(changes.items())) or "none")
        + ".",
        "",
        f"Test scores on `{query}`: " + ", ".join(f"{name} {value:.2f}" for name, value in metrics.items()) + ".",
        "",
        f"Gate: {verdict}",
    ]
    lines += [f"\n{label}: {url}" for label, url in (links or {}).items()]
    return "\n".join(lines)


def _verdict(reasons: list[str], champion: str | None) -> str:
    if reasons:
        kept = f"version {champion} stays champion" if champion else "no champion yet"
        return f"failed ({'; '.join(reasons)}); {kept}."
    return f"passed; now {CHAMPION}" + (f", replacing version {champion}." if champion else " (the first one).")


def _describe(client, name: str, version: str, run_id: str | None, text) -> None:
    """Set the version's description (`text(links)`, the training run's Prefect link among them)
    and the registered model's."""
    tags = client.get_run(run_id).data.tags if run_id else {}
    links = {"Prefect flow run": tags["prefect.flow_run_url"]} if tags.get("prefect.flow_run_url") else {}
    client.update_model_version(name, version, description=text(links))
    client.update_registered_model(name, description=MODEL_DESCRIPTION)


# --------------------------------------------------------------------------- registering


def register(
    package_dir: str | Path,
    metrics: dict[str, float],
    query: str,
    settings: "Settings",
    gates: dict | None = None,
    tracking: str | None = None,
    lineage: dict[str, str] | None = None,
    name: str | None = None,
    run_id: str | None = None,
    champion_metrics: dict[str, float] | None = None,
) -> RegistrationResult:
    """Create a model version, tag it, and make it champion only if it passes the gates.

    Unless given: the gates are the settings' register.gates, the model name register.model_name,
    the tracking URI as `tracking_uri` finds it, the lineage `collect_lineage(settings)`.
    `champion_metrics` are the current champion's scores on `query` when the caller has
    re-evaluated it; otherwise the champion's stored tags are used (same query required).
    A failed gate is a normal result (promoted=False, reasons), not an exception. A tracking
    server that is down, or goes down part-way, is a RegistryError naming it.
    """
    import mlflow

    uri = tracking_uri(settings, tracking)
    check_server(uri)
    name = name or model_name(settings)
    gates = settings.register.gates.to_dict() if gates is None else gates
    lineage = collect_lineage(settings) if lineage is None else lineage
    experiment = settings.tracking.experiment
    client = mlflow_client(uri)
    tags = {
        "data_query": str(query),
        "metrics": json.dumps(metrics, sort_keys=True),
        **metric_tags(metrics),
        **{k: str(v) for k, v in lineage.items()},
    }
    # A server numbers versions atomically: only the gate and the aliases need the lock.
    with sqlite_writes(uri), _reporting_a_lost_server(uri) as made:
        model_uri, run = _log_package(Path(package_dir).resolve(), run_id, uri, experiment)
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
        made.append(version)
        with registry_lock(uri, name):  # read the champion, compare, move the aliases: one at a time
            champion, reference, mismatch = _champion_reference(client, name, query, champion_metrics)
            reasons = gate_reasons(metrics, gates, reference) + ([mismatch] if mismatch else [])
            verdict = _verdict(reasons, champion)
            _describe(
                client,
                name,
                version,
                run,
                lambda links: version_description(settings, query, metrics, lineage, verdict, links),
            )
            if reasons:
                client.set_model_version_tag(name, version, "gate", "failed")
                client.set_model_version_tag(name, version, "gate_reasons", "; ".join(reasons))
                current = alias_version(client, name, PREVIOUS)
                return RegistrationResult(version, False, reasons, champion, current, model_uri, reference)
            client.set_model_version_tag(name, version, "gate", "passed")
            # One alias write at a time, ordered so that losing the server between two of them
            # leaves a coherent pair: (old champion, no previous), (new, no previous) or (new, old);
            # never `previous` equal to `champion`, nor one that skips a version.
            if champion is not None:
                client.set_model_version_tag(name, version, "previous_champion", champion)
                client.delete_registered_model_alias(name, PREVIOUS)
            client.set_registered_model_alias(name, CHAMPION, version)
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, champion)
            client.set_model_version_tag(
                name, version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            )
            _verify(client, name, version, champion)
    return RegistrationResult(version, True, [], version, champion, model_uri, reference)


@contextlib.contextmanager
def _reporting_a_lost_server(uri: str) -> Iterator[list[str]]:
    """A failure while the tracking server has stopped answering becomes a RegistryError naming
    it (and the version created, which the caller appends to the list yielded)."""
    made: list[str] = []
    try:
        yield made
    except RegistryError:
        raise
    except Exception:
        try:
            check_server(uri)
        except RegistryError as lost:
            where = f"after creating version {made[0]}" if made else "before creating a version"
            raise RegistryError(
                f"{lost} (lost {where}: see `captioning registry list`, and register again once the server is back)"
            ) from None
        raise


def _verify(client, name: str, champion: str, previous: str | None) -> None:
    """Re-read the aliases: what we set must be what the registry now says."""
    seen = (alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS))
    if seen[0] != champion or (previous is not None and seen[1] != previous):
        raise RegistryError(
            f"aliases of {name!r} changed underneath: expected champion={champion}, "
            f"previous={previous}, found champion={seen[0]}, previous={seen[1]}"
        )


def list_versions(tracking: str | None, name: str) -> list[dict[str, Any]]:
    """Every version of the model, oldest first, with aliases, gate outcome, metrics and lineage."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(None, tracking)
    check_server(uri)  # else a server that is down would read as "no versions"
    client = mlflow_client(uri)
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = dict(mv.tags)
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "gate": tags.get("gate", ""),
                "reasons": tags.get("gate_reasons", ""),
                "metrics": metrics_from_tags(tags),
                "data_query": tags.get("data_query", ""),
                "git_commit": tags.get("git_commit", ""),
                "data_hash": tags.get("data_hash", ""),
                "params_hash": tags.get("params_hash", ""),
                "run_id": mv.run_id or "",
                "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mv.creation_timestamp / 1000)),
            }
        )
    return sorted(rows, key=lambda row: int(row["version"]))


def rollback(tracking: str | None, name: str) -> dict[str, str | None]:
    """champion := previous; previous := the champion that one had replaced (or removed).

    The demoted version is tagged `rolled_back`. Raises RegistryError when there is no previous.
    """
    uri = tracking_uri(None, tracking)
    check_server(uri)
    client = mlflow_client(uri)
    with registry_lock(uri, name):
        demoted = alias_version(client, name, CHAMPION)
        restored = alias_version(client, name, PREVIOUS)
        if restored is None:
            raise RegistryError(f"model {name!r} has no {PREVIOUS!r} version to roll back to")
        before = client.get_model_version(name, restored).tags.get("previous_champion")
        client.set_registered_model_alias(name, CHAMPION, restored)
        if before and before != demoted and before != restored:
            client.set_registered_model_alias(name, PREVIOUS, before)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
            before = None
        if demoted is not None:
            client.set_model_version_tag(
                name, demoted, "rolled_back", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            )
        _verify(client, name, restored, before)
        if before is None and alias_version(client, name, PREVIOUS) is not None:
            raise RegistryError(f"alias {PREVIOUS!r} of {name!r} was set again during the rollback")
    return {"champion": restored, "previous": before, "demoted": demoted}
