"""Where a model is: a model reference becomes a registry version and a local package folder.

A reference is a package folder, `models:/NAME@ALIAS`, `models:/NAME/N` or any other MLflow model
URI (`runs:/...`). Registered versions are downloaded once into artifacts_dir()/registry. A folder
is located without MLflow (the service's image has none); MLflow is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioning.config import artifacts_dir
from captioning.registry.store import RegistryError, alias_version, check_server, mlflow_client, tracking_uri

logger = logging.getLogger(__name__)
STORE_SUFFIX = ".tracking-uri"  # beside a download: the store it came from, to find it again with the store down

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class Located:
    """Where a model is: its registry version (None for a folder or a run's model) and its package folder."""

    version: str | None
    path: Path


def parse_models_uri(text: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/N` (one of alias and version
    is None); RegistryError for any other text."""
    match = _MODELS_URI.match(text)
    if match is None:
        raise RegistryError(f"{text!r} is not a models:/NAME@ALIAS or models:/NAME/N URI")
    return match["name"], match["alias"], match["version"]


def locate(uri: str | Path, tracking: str | None = None, download: bool = True) -> Located:
    """The version and package folder of a folder, `models:/NAME@ALIAS`, `models:/NAME/N` or `runs:/...`.

    An alias is read once, so version and folder always agree. Registered versions are downloaded
    once into artifacts_dir()/registry/<name>/<version>-<identity>, the identity naming the store,
    the version's source and its creation time: after a registry is reset or replaced, version N
    may be another model, and its download is then another folder. With download=False nothing is
    fetched (to ask which version an alias points at now), and until it is `path` is the folder it
    goes to. `tracking`: the tracking URI, else $MLFLOW_TRACKING_URI.
    """
    text = str(uri)
    if "://" not in text and not text.startswith(("models:", "runs:")):
        local = Path(text).expanduser()
        if not local.exists():
            raise RegistryError(f"{text}: no such model package folder")
        return Located(None, _package_in(local.resolve()))
    reference = parse_models_uri(text) if text.startswith("models:") else None
    store = tracking_uri(None, tracking)
    if reference is not None:
        name, alias, version = reference
        if alias is None:
            cached = _cached_offline(store, name, version)
            if cached is not None:
                return Located(version, _package_in(cached))
        version = version or alias_version(mlflow_client(store), name, alias)
        if version is None:
            raise RegistryError(f"{text}: model {name!r} has no alias {alias!r}")
        folder = f"{version}-{_identity(store, name, str(version), text)}"
        target, source = artifacts_dir() / "registry" / name / folder, f"models:/{name}/{version}"
    else:
        version = None
        target = artifacts_dir() / "registry" / "uris" / hashlib.sha1(text.encode()).hexdigest()[:16]
        source = text
    if download and not target.is_dir():
        _download(source, target, store)
        _remember_store(target, store)
    return Located(str(version) if version else None, _package_in(target) if target.is_dir() else target)


def _remember_store(target: Path, store: str) -> None:
    with contextlib.suppress(OSError):  # beside the folder: a file inside would change the package's digest
        target.with_name(target.name + STORE_SUFFIX).write_text(store, encoding="utf-8")


def _cached_offline(store: str, name: str, version: str) -> Path | None:
    """With the tracking server unreachable, the newest download of `models:/NAME/N` from this
    store (a version number names one model while the registry lives; an alias may move, so
    it is never resolved offline). None while the server answers, or with no such download."""
    if not store.startswith(("http://", "https://")):
        return None
    downloads = [
        marker.with_name(marker.name.removesuffix(STORE_SUFFIX))
        for marker in (artifacts_dir() / "registry" / name).glob(f"{version}-*{STORE_SUFFIX}")
        if marker.read_text(encoding="utf-8") == store
    ]
    downloads = [folder for folder in downloads if folder.is_dir()]
    if not downloads:
        return None
    try:
        check_server(store, timeout=2.0)
        return None
    except RegistryError as error:
        newest = max(downloads, key=lambda folder: folder.stat().st_mtime)
        logger.warning("%s; models:/%s/%s from the earlier download %s", error, name, version, newest)
        return newest


def _identity(store: str, name: str, version: str, text: str) -> str:
    """A short digest of what makes version N of `name` this model: the store, its source, its creation time."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client(store).get_model_version(name, version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"{text}: model {name!r} has no version {version}") from None
        raise
    key = f"{store}|{found.source}|{found.run_id}|{found.creation_timestamp}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def load_captioner(uri: str | Path, tracking: str | None = None, **options: Any):
    """A Captioner of the model `uri` names (see `locate`), its version set; `options` go to
    `Captioner.load` (device, with_encoder)."""
    from captioning.inference.predict import Captioner

    located = locate(uri, tracking)
    return Captioner.load(located.path, version=located.version, source=str(uri), **options)


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


def _single_child(folder: Path) -> Path:
    """download_artifacts puts the model either in folder itself or in one sub-folder."""
    if (folder / "MLmodel").is_file() or (folder / "config.json").is_file():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir()]
    if len(children) == 1:
        return children[0]
    raise RegistryError(f"unexpected download layout in {folder}")
