"""Every command that loads a model reads a registry reference the same way: --tracking-uri, else
$MLFLOW_TRACKING_URI, else params tracking.uri. Here the store (a real sqlite MLflow database) is
named only by a --params overlay, with no MLFLOW_TRACKING_URI in the environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.trained import TEST_QUERY, held_out_features, shared_dir, tiny_params
from tests.fixtures.processes import child_env

REFERENCE = "models:/captioner@champion"


@pytest.fixture(scope="module")
def registry(tiny_model, tmp_path_factory) -> dict:
    """A sqlite store holding the tiny model as champion, an overlay naming it, and an
    environment with no MLFLOW_TRACKING_URI (the overlay is the only way to the store)."""
    from captioning.config import PARAMS_FILE
    from captioning.registry.versions import register
    from captioning.settings import load_settings

    root = tmp_path_factory.mktemp("uris")
    store = f"sqlite:///{root / 'mlflow.db'}"
    first = register(tiny_model, {"CIDEr": 10.0}, TEST_QUERY, load_settings(PARAMS_FILE), gates={}, tracking=store)
    assert first.promoted, first.message
    held_out_features()  # the test images' feature cache, which evaluate and compare read
    overlay = {key: tiny_params()[key] for key in ("data", "features")}
    overlay["tracking"] = {"uri": store}
    params = root / "overlay.yaml"
    params.write_text(yaml.safe_dump(overlay), encoding="utf-8")
    env = child_env(
        CAPTIONING_DATA_DIR=str(shared_dir() / "data"),
        CAPTIONING_ARTIFACTS_DIR=str(root / "artifacts"),
        CAPTIONING_REPORTS_DIR=str(root / "reports"),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("CAPTIONING_PARAMS_OVERLAY", None)
    return {"root": root, "params": str(params), "env": env}


def run(registry: dict, *args: str) -> subprocess.CompletedProcess:
    from captioning.config import PROJECT_ROOT

    done = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=registry["env"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def captioning(registry: dict, *args: str) -> subprocess.CompletedProcess:
    return run(registry, "-m", "captioning.cli", *args, "--params", registry["params"])


def test_caption_reads_the_store_the_params_name(registry):
    from harness.serving import synthetic_jpeg

    photo = registry["root"] / "photo.jpg"
    photo.write_bytes(synthetic_jpeg(seed=5))
    rows = json.loads(captioning(registry, "caption", str(photo), "--model", REFERENCE, "--json").stdout)
    assert rows[0]["image"] == str(photo) and rows[0]["caption"].strip()


def test_evaluate_and_compare_read_the_store_the_params_name(registry):
    scored = json.loads(captioning(registry, "evaluate", "--model", REFERENCE, "--beam", "1", "--json").stdout)
    assert scored["images"] == 24 and scored["metrics"]["CIDEr"] >= 0

    out = registry["root"] / "comparison"
    table = captioning(
        registry, "compare", "--model", f"champion={REFERENCE}", "--beam", "1", "--out-dir", str(out), "--json"
    )
    assert [key.split()[0] for key in json.loads(table.stdout)] == ["champion"]
    assert (out / "comparison.md").is_file()


def test_inference_benchmark_reads_the_store_the_params_name(registry):
    report = registry["root"] / "inference.json"
    run(
        registry,
        "-m",
        "benchmarks.inference",
        "--model",
        REFERENCE,
        "--data",
        f"{TEST_QUERY.split('-')[0]}-4s0",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--output",
        str(report),
        "--params",
        registry["params"],
    )
    setup = json.loads(Path(report).read_text())["setup"]
    assert setup["model"] == REFERENCE and setup["model_version"] == "1"


def test_a_tracking_uri_option_wins_over_the_params(registry, tmp_path):
    """--tracking-uri names another (empty) store: the alias is looked up there, and is missing."""
    from harness.serving import synthetic_jpeg

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(synthetic_jpeg(seed=6))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "captioning.cli", "caption", str(photo), "--model", REFERENCE, "--tracking-uri", other]
        + ["--params", registry["params"]],
        env=registry["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "champion" in done.stderr
