"""The MLflow model registry: metric gates, champion/previous aliases, and where a model is.

`locate()` is the one place a model reference becomes a registry version and a local package
folder: a folder, `models:/NAME@ALIAS`, `models:/NAME/N` or `runs:/...` (registered versions are
downloaded once). `register()` logs a package as an MLflow model (`captioning.registry.pyfunc`), creates a
version, tags its lineage and metrics, and moves the `champion` alias only when the gates pass.
Alias changes happen under a lock (`registry_lock`: a file lock for a sqlite store, a lock kept in
MLflow itself for a server shared by several machines) and are re-read afterwards, so two
registrations racing cannot leave `champion` and `previous` inconsistent. A tracking server that
is down is reported at once (`check_server`), and one that goes down part-way leaves the aliases
coherent (`register`). Functions that need settings take a `Settings`; the others take the
tracking URI and the model name. MLflow is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from captioning.config import PROJECT_ROOT, artifacts_dir
from captioning.registry.lineage import collect_lineage
from captioning.registry.pyfunc import log_model

if TYPE_CHECKING:
    from captioning.settings import Settings

logger = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"
METRIC_TAG = "metric."
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (no champion, no previous, inconsistent aliases)."""


@dataclass
class RegistrationResult:
    version: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    champion: str | None = None
    previous: str | None = None
    model_uri: str = ""

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
            "message": self.message,
        }


# --------------------------------------------------------------------------- settings


def model_name(settings: "Settings") -> str:
    return settings.register.model_name


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


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _client(uri: str):
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


def _lock_file(uri: str) -> Path:
    """The lock file of a sqlite store: beside the database."""
    db = _sqlite_path(uri)
    return db.with_name(db.name + ".lock")


_HELD = threading.local()  # lock files this thread holds: re-entering one does not wait on itself


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on `path`, re-entrant within a thread. flock locks belong to the open
    file, so threads of one process exclude each other too."""
    held = _HELD.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_writes(uri: str):
    """One writer at a time on a sqlite store (concurrent writers fail with "database is locked");
    nothing for a server, which takes concurrent requests."""
    return _file_lock(_lock_file(uri)) if _sqlite_path(uri) is not None else contextlib.nullcontext()


@contextlib.contextmanager
def registry_lock(uri: str, name: str) -> Iterator[None]:
    """Exclusive lock for the read-compare-set of the aliases of model `name`.

    A sqlite store is one file on one machine: a file lock beside it. Any other store (an
    `mlflow server` over HTTP, a database) is shared by machines that share no folder, so the lock
    lives in MLflow itself: see `_lease_lock`.
    """
    if _sqlite_path(uri) is not None:
        with _file_lock(_lock_file(uri)):
            yield
        return
    with _lease_lock(_client(uri), name):
        yield


LOCK_SUFFIX = ".registry-lock"
LOCK_LEASE_SECONDS = 300.0  # far beyond the few requests of a critical section
LOCK_WAIT_SECONDS = 600.0
_JITTER = random.Random()  # not the global generator, which training seeds
_LET_GO: set[str] = set()  # owners in this process that left their critical section, released or not


@contextlib.contextmanager
def _lease_lock(client, name: str) -> Iterator[None]:
    """A mutex made of a registered model, `<name>.registry-lock`, held for the duration.

    Why a registered model: creating one is atomic in every MLflow store (its name is the primary
    key, so of two concurrent creations one fails with RESOURCE_ALREADY_EXISTS, whatever the
    database behind the server), it is deleted for good (the name is free again), and it needs
    nothing but the tracking URI every client already has. MLflow offers no compare-and-set on
    tags or aliases, and a PostgreSQL advisory lock would need every client to reach the database.

    The lock's tags name its owner (host, process, a random token), its machine and when its lease
    ends. A holder that died leaves the lock behind (so does one that lost the server part-way); once
    the lease is over, or at once when the holder was a process of this machine that no longer
    exists or has left its critical section, a waiter breaks it: first it
    creates `<lock>.break.<hash of the owner>` (atomic again: one waiter alone breaks a holder), then
    deletes the lock if that owner still holds it. Release deletes the lock only while its owner
    tag is still ours. The lease must outlast any critical section (a few requests): if one took
    longer than LOCK_LEASE_SECONDS, a waiter could break the lock while it is still in use.
    """
    lock = f"{name}{LOCK_SUFFIX}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    tags = {"owner": owner, "expires": f"{time.time() + LOCK_LEASE_SECONDS:.3f}", "machine": _machine()}
    while not _try_create(client, lock, tags):
        _break_if_expired(client, lock)
        if time.monotonic() > deadline:
            raise RegistryError(f"the registry lock {lock!r} stayed held for {LOCK_WAIT_SECONDS:.0f} s")
        time.sleep(_JITTER.uniform(0.1, 0.4))  # waiters do not retry in lockstep
    try:
        yield
    finally:
        _LET_GO.add(owner)  # done with it, even if the release below cannot reach the server
        if _lock_owner(client, lock) == owner:
            client.delete_registered_model(lock)
            _LET_GO.discard(owner)


def _try_create(client, lock: str, tags: dict[str, str]) -> bool:
    """Create the registered model `lock`; False when it exists already."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            lock,
            tags=tags,
            description=f"held while the aliases of {lock.removesuffix(LOCK_SUFFIX)!r} change; deleted afterwards",
        )
        return True
    except MlflowException as error:
        if error.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise


def _lock_owner(client, lock: str, expired_only: bool = False) -> str | None:
    """The owner tag of the lock (None when it is not held, or, with expired_only, while its lease
    runs and its holder may be alive)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException:
        return None
    if expired_only and time.time() < float(tags.get("expires", "0")) and not _holder_gone(tags):
        return None
    return tags.get("owner", "")


def _machine() -> str:
    """This boot of this host and this process namespace (where a holder's pid means something);
    empty where /proc does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{socket.gethostname()}:{boot}:{namespace}"


def _holder_gone(tags: dict[str, str]) -> bool:
    """True when the lock's holder was a process of this machine that no longer exists, or an
    earlier critical section of this process that could not release it."""
    if tags.get("owner") in _LET_GO:
        return True
    machine = _machine()
    if not machine or tags.get("machine") != machine:
        return False
    try:
        pid = int(tags.get("owner", "").split(":")[1])
        os.kill(pid, 0)
    except (IndexError, ValueError, PermissionError):
        return False
    except ProcessLookupError:
        return True
    return False


def _break_if_expired(client, lock: str) -> None:
    """Delete the lock of a holder whose lease is over (see `_lease_lock`)."""
    from mlflow.exceptions import MlflowException

    stale = _lock_owner(client, lock, expired_only=True)
    if stale is None:
        return
    breaker = f"{lock}.break.{hashlib.sha1(stale.encode()).hexdigest()[:16]}"
    if not _try_create(client, breaker, {"owner": stale, "expires": f"{time.time() + 60:.3f}"}):
        # Another waiter is breaking it; if that one died on the way, its breaker expires too.
        if _lock_owner(client, breaker, expired_only=True) is not None:
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(breaker)
        return
    try:
        if _lock_owner(client, lock) == stale:
            logger.warning("breaking the registry lock %r: its holder %s is gone or let its lease expire", lock, stale)
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
    finally:
        client.delete_registered_model(breaker)


def _experiment_id(uri: str, name: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite database) when missing."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    db = _sqlite_path(uri)
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
    with _sqlite_writes(uri):
        return _log_package(Path(package_dir).resolve(), run_id, uri, settings.tracking.experiment)[0]


# --------------------------------------------------------------------------- resolving


def _package_in(model_dir: Path) -> Path:
    """The package folder inside a downloaded MLflow model (as its MLmodel file records)."""
    import yaml

    if (model_dir / "config.json").is_file():
        return model_dir
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        path = spec.get("flavors", {}).get("python_function", {}).get("data")
        if path and (model_dir / path / "config.json").is_file():
            return model_dir / path
    raise RegistryError(f"{model_dir} holds no captioning package (not a model package: no config.json)")


@dataclass(frozen=True)
class Located:
    """Where a model is: its registry version (None for a folder or a run's model) and its package folder."""

    version: str | None
    path: Path


def locate(uri: str | Path, tracking: str | None = None, download: bool = True) -> Located:
    """The version and package folder of a folder, `models:/NAME@ALIAS`, `models:/NAME/N` or `runs:/...`.

    An alias is read once, so version and folder always agree. Registered versions are downloaded
    once into artifacts_dir()/registry/<name>/<version>; with download=False nothing is fetched (to
    ask which version an alias points at now), and until it is `path` is the folder it goes to.
    `tracking`: the tracking URI, else $MLFLOW_TRACKING_URI.
    """
    text = str(uri)
    if "://" not in text and not text.startswith(("models:", "runs:")):
        local = Path(text).expanduser()
        if not local.exists():
            raise RegistryError(f"{text}: no such model package folder")
        return Located(None, _package_in(local.resolve()))
    store = tracking_uri(None, tracking)
    match = _MODELS_URI.match(text)
    if match:
        name = match["name"]
        version = match["version"] or _alias_version(_client(store), name, match["alias"])
        if version is None:
            raise RegistryError(f"{text}: model {name!r} has no alias {match['alias']!r}")
        target, source = artifacts_dir() / "registry" / name / str(version), f"models:/{name}/{version}"
    elif text.startswith("models:"):
        raise RegistryError(f"{text!r} is not a models:/NAME@ALIAS or models:/NAME/N URI")
    else:
        version = None
        target = artifacts_dir() / "registry" / "uris" / hashlib.sha1(text.encode()).hexdigest()[:16]
        source = text
    if download and not target.is_dir():
        _download(source, target, store)
    return Located(str(version) if version else None, _package_in(target) if target.is_dir() else target)


def _download(source: str, target: Path, store: str) -> None:
    """Download the model at `source` to `target` through a staging folder beside it."""
    from mlflow.artifacts import download_artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=store, registry_uri=store)
        _package_in(_single_child(staging))
        with contextlib.suppress(OSError):  # another process may have finished first
            os.rename(_single_child(staging), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_captioner(uri: str | Path, tracking: str | None = None, **options: Any):
    """A Captioner of the model `uri` names (see `locate`), its version set; `options` go to
    `Captioner.load` (device, with_encoder)."""
    from captioning.inference.predict import Captioner

    located = locate(uri, tracking)
    return Captioner.load(located.path, version=located.version, source=str(uri), **options)


def _single_child(folder: Path) -> Path:
    """download_artifacts puts the model either in folder itself or in one sub-folder."""
    if (folder / "MLmodel").is_file() or (folder / "config.json").is_file():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir()]
    if len(children) == 1:
        return children[0]
    raise RegistryError(f"unexpected download layout in {folder}")


# --------------------------------------------------------------------------- gates


def _alias_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points at; None when the model or the alias does not exist (any other
    failure, such as a server that stopped answering, is raised: it says nothing about the alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
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


def _champion_reference(client, name: str, query: str, given: dict[str, float] | None):
    """(champion version, its metrics on `query`, reason if they are not comparable)."""
    version = _alias_version(client, name, CHAMPION)
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
    client = _client(tracking_uri(None, tracking))
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None, None
    return version, client.get_model_version(name, version).tags.get("data_query")


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
    client = _client(uri)
    tags = {
        "data_query": str(query),
        "metrics": json.dumps(metrics, sort_keys=True),
        **{f"{METRIC_TAG}{k}": f"{float(v):.4f}" for k, v in metrics.items()},
        **{k: str(v) for k, v in lineage.items()},
    }
    # A server numbers versions atomically: only the gate and the aliases need the lock.
    with _sqlite_writes(uri), _reporting_a_lost_server(uri) as made:
        model_uri, run = _log_package(Path(package_dir).resolve(), run_id, uri, experiment)
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
        made.append(version)
        with registry_lock(uri, name):  # read the champion, compare, move the aliases: one at a time
            champion, reference, mismatch = _champion_reference(client, name, query, champion_metrics)
            reasons = gate_reasons(metrics, gates, reference) + ([mismatch] if mismatch else [])
            if reasons:
                client.set_model_version_tag(name, version, "gate", "failed")
                client.set_model_version_tag(name, version, "gate_reasons", "; ".join(reasons))
                current = _alias_version(client, name, PREVIOUS)
                return RegistrationResult(version, False, reasons, champion, current, model_uri)
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
    return RegistrationResult(version, True, [], version, champion, model_uri)


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
    seen = (_alias_version(client, name, CHAMPION), _alias_version(client, name, PREVIOUS))
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
    client = _client(uri)
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
    client = _client(uri)
    with registry_lock(uri, name):
        demoted = _alias_version(client, name, CHAMPION)
        restored = _alias_version(client, name, PREVIOUS)
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
        if before is None and _alias_version(client, name, PREVIOUS) is not None:
            raise RegistryError(f"alias {PREVIOUS!r} of {name!r} was set again during the rollback")
    return {"champion": restored, "previous": before, "demoted": demoted}
