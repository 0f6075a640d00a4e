"""The MLflow store that holds the registry: its URI, a client, whether its server answers, and
which version an alias names. MLflow is imported inside functions only."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from captioning.config import PROJECT_ROOT

if TYPE_CHECKING:
    from captioning.settings import Settings


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (no champion, no previous, inconsistent aliases)."""


def tracking_uri(settings: "Settings | None", uri: str | None = None) -> str:
    """The tracking (and registry) URI: `uri`, else $MLFLOW_TRACKING_URI, else the settings'
    tracking.uri; RegistryError when none is given.

    A relative sqlite path is taken relative to the project root, so commands run from
    any folder share one store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or (settings.tracking.uri if settings is not None else None)
    if not uri:
        raise RegistryError("no MLflow tracking URI: pass one (--tracking-uri) or set MLFLOW_TRACKING_URI")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(PROJECT_ROOT / uri[len("sqlite:///") :])
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite store; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow retries a failed request 7 times with growing pauses (about four minutes) by default, so a
# command run against a server that is down looks hung. Commands use these unless the user set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


@contextlib.contextmanager
def bounded_http_retries() -> Iterator[None]:
    """Within: give up on an unreachable tracking server within seconds (HTTP_DEFAULTS, for each
    setting the user left unset; MLflow reads them at every request)."""
    unset = [key for key in HTTP_DEFAULTS if key not in os.environ]
    os.environ.update({key: HTTP_DEFAULTS[key] for key in unset})
    try:
        yield
    finally:
        for key in unset:
            os.environ.pop(key, None)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """RegistryError naming the server when an MLflow tracking server does not answer its /health
    (a refused connection, a time-out, a 5xx); nothing to check for a database URI."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as error:
        found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
        reason = found.group(1).strip() if found else type(error).__name__
        raise RegistryError(f"cannot reach the MLflow tracking server at {uri}: {reason}") from None
    if answer.status_code >= 500:
        raise RegistryError(f"cannot reach the MLflow tracking server at {uri}: /health answered {answer.status_code}")


def alias_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points at; None when the model or the alias does not exist (any other
    failure, such as a server that stopped answering, is raised: it says nothing about the alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
