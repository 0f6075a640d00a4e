"""The MLflow model registry: gates, aliases, where a model is, lineage and the retrain record.

This package is also the MLflow pyfunc loader that registered versions name (`_load_pyfunc`).
"""

from __future__ import annotations


def _load_pyfunc(path: str):
    """MLflow's loader hook; the package name stays stable while its modules move."""
    from captioning.registry.pyfunc import load_package

    return load_package(path)
