"""Session-wide servers for the serving tests: one real `bentoml serve` per configuration."""

from __future__ import annotations

import pytest

from harness import serving

RELOAD_TOKEN = "test-reload-token"
API_KEY = "test-api-key"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return serving.tiny_package(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def caption_service(tiny_model, tmp_path_factory, request):
    """The service with a tiny trained model, reload enabled, API key off."""
    request.addfinalizer(serving.stop_all)
    return serving.shared_service(
        "default",
        tiny_model,
        tmp_path_factory.mktemp("service"),
        {"CAPTIONING_RELOAD_TOKEN": RELOAD_TOKEN},
    )


@pytest.fixture(scope="session")
def champion_service(tiny_model, tmp_path_factory, request):
    """A second instance as in production: the model is models:/captioner@champion from a real
    MLflow registry (sqlite), polled every second; API-key authentication on.

    Returns (server, tracking URI, the first registration).
    """
    from captioning.config import PARAMS_FILE
    from captioning.registry.versions import register
    from captioning.settings import load_settings

    request.addfinalizer(serving.stop_all)
    home = tmp_path_factory.mktemp("service-champion")
    store = f"sqlite:///{home / 'mlflow.db'}"
    first = register(
        tiny_model, {"CIDEr": 10.0}, "synthetic[test]", load_settings(PARAMS_FILE), gates={}, tracking=store, lineage={}
    )
    assert first.promoted, first.message
    server = serving.shared_service(
        "champion",
        "models:/captioner@champion",
        home,
        {"MLFLOW_TRACKING_URI": store, "CAPTIONING_POLL_SECONDS": "1", "CAPTIONING_API_KEY": API_KEY},
    )
    return server, store, first


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    return serving.synthetic_jpeg(seed=3)
