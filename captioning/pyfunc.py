"""The MLflow loader that versions registered with captioning 0.1 name; new versions name `captioning.registry`."""

from captioning.registry import _load_pyfunc  # noqa: F401
