"""Where the model service's model comes from: a package folder, a registry URI, or a model in
BentoML's store (`bento:NAME:VERSION`, as a release's image carries it)."""

from __future__ import annotations

from pathlib import Path

BENTO_PREFIX = "bento:"


def bento_model(source: str):
    """The BentoML model a `bento:NAME:VERSION` source names (a served bento's own store first)."""
    import bentoml

    return bentoml.models.get(source[len(BENTO_PREFIX) :])


def registry_tracking(source: str, tracking_uri: str | None = None) -> str | None:
    """The tracking URI for a registry source: `tracking_uri` ($MLFLOW_TRACKING_URI), else the
    project's params.yaml tracking.uri, as `make serve` from the source tree has it; None for
    other sources."""
    if tracking_uri or not source.startswith(("models:", "runs:")):
        return tracking_uri
    from captioning.config import PARAMS_FILE
    from captioning.registry.store import tracking_uri as settings_tracking_uri
    from captioning.settings import load_settings

    return settings_tracking_uri(load_settings(PARAMS_FILE))


def locate(source: str, tracking: str | None, download: bool = True):
    """The registry version and package folder of the model source (`captioning.registry.locate.Located`):
    a bento model's from its metadata, any other's from the registry at `tracking`; with
    download=False only the version is sure (what an alias points at now)."""
    from captioning.registry.locate import Located
    from captioning.registry.locate import locate as locate_in_registry

    if source.startswith(BENTO_PREFIX):
        model = bento_model(source)
        version = model.info.metadata.get("registry_version")
        return Located(str(version) if version is not None else None, Path(model.path))
    return locate_in_registry(source, tracking, download=download)


def version_of(captioner) -> str:
    """The registry version; for a package folder ("local") the weights checksum makes it specific."""
    version = str(captioner.version)
    sha = (getattr(captioner, "config", None) or {}).get("weights_sha256")
    return f"local-{sha[:12]}" if version == "local" and sha else version
