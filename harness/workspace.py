"""A workspace of its own for a release or a stack: registry, artifacts, bentos, stack, Prefect home
and image names, so that a test or a benchmark never touches a developer's real ones."""

from __future__ import annotations

import os
from pathlib import Path


def workspace_env(home: Path, name: str, **extra: str) -> dict[str, str]:
    """The environment that points every step at folders under `home`; images are named
    localhost/NAME:vN and pods NAME-ROLE-sN. `extra` adds or replaces variables."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "CAPTIONING_ARTIFACTS_DIR": str(home / "artifacts"),
        "CAPTIONING_STACK_DIR": str(home / "stack"),
        "BENTOML_HOME": str(home / "bentoml"),
        "PREFECT_HOME": str(home / "prefect"),
        "CAPTIONING_IMAGE_REPO": f"localhost/{name}",
        "CAPTIONING_STACK_NAME": name,
        **extra,
    }
    env.pop("PREFECT_API_URL", None)  # each workspace starts its own Prefect server when it needs one
    return env
