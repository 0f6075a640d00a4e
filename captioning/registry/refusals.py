"""Versions a rollout refused: why, recorded on the version, and the champion alias put back.

A refused version keeps its place in the registry (its gates, metrics and lineage stay readable);
it carries the tags `rollout_refused` (the one-line reason), `rollout_stage`, `rollout_figure` and
`rollout_threshold`, `rollout_refused_at` (UTC), and the release watcher never rolls it out again
by itself. Registering it anew (a new version) or removing the tag by hand lets it be released
again. `refused_versions` lists them all, for the watcher's metrics (captioning/release/watcher_metrics.py).
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass

from captioning.registry.lock import registry_lock
from captioning.registry.store import alias_version, check_server, mlflow_client, tracking_uri
from captioning.registry.versions import CHAMPION, PREVIOUS

REFUSED_TAG = "rollout_refused"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Refusal:
    """One version a rollout refused: at which stage, why, and when (Unix seconds; None when its
    `rollout_refused_at` tag is missing or not a time, as on a tag set by hand)."""

    version: str
    stage: str
    reason: str
    refused_at: float | None


def refuse(
    tracking: str | None,
    name: str,
    version: str,
    stable: str | None,
    reason: str,
    stage: str,
    figure: float | None = None,
    threshold: float | None = None,
) -> dict[str, str | None]:
    """Tag `version` as refused and, when it is still the champion, make `stable` (the version that
    served before) the champion again. Returns the aliases afterwards."""
    uri = tracking_uri(None, tracking)
    check_server(uri)
    client = mlflow_client(uri)
    with registry_lock(uri, name):
        tags = {
            REFUSED_TAG: reason[:4000],
            "rollout_stage": stage,
            "rollout_figure": "" if figure is None else f"{figure:.6g}",
            "rollout_threshold": "" if threshold is None else f"{threshold:.6g}",
            "rollout_refused_at": time.strftime(TIME_FORMAT, time.gmtime()),
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if stable and alias_version(client, name, CHAMPION) == str(version):
            client.set_registered_model_alias(name, CHAMPION, stable)
            if alias_version(client, name, PREVIOUS) == str(stable):
                client.delete_registered_model_alias(name, PREVIOUS)
        return {"champion": alias_version(client, name, CHAMPION), "previous": alias_version(client, name, PREVIOUS)}


def refused_reason(tracking: str | None, name: str, version: str) -> str | None:
    """Why a rollout refused `version`, or None when none did."""
    client = mlflow_client(tracking_uri(None, tracking))
    return client.get_model_version(name, str(version)).tags.get(REFUSED_TAG) or None


def refused_versions(tracking: str | None, name: str) -> list[Refusal]:
    """Every version of `name` a rollout refused, oldest version first (none for a model not
    registered yet). A server that does not answer raises RegistryError at once: an empty list
    would read as "nothing refused"."""
    uri = tracking_uri(None, tracking)
    check_server(uri)
    refusals = []
    for found in mlflow_client(uri).search_model_versions(f"name='{name}'"):
        tags = dict(found.tags)
        if tags.get(REFUSED_TAG):
            refused_at = parse_time(tags.get("rollout_refused_at", ""))
            stage = tags.get("rollout_stage") or "unknown"
            refusals.append(Refusal(str(found.version), stage, tags[REFUSED_TAG], refused_at))
    return sorted(refusals, key=lambda refusal: int(refusal.version))


def parse_time(text: str) -> float | None:
    """Unix seconds of a `rollout_refused_at` tag (UTC), None when it is not one."""
    try:
        return float(calendar.timegm(time.strptime(text.strip(), TIME_FORMAT)))
    except ValueError:
        return None
