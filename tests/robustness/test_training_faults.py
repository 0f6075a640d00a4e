"""Training runs whose loss turns NaN or inf, through the real command line on the tiny synthetic set.

A diverging run (`--set train.lr=1e30`) stops with exit code 1 and one line saying why, and packages
nothing; a run fed a few NaN features skips those steps, finishes, counts them, and packages finite
weights; the command's JSON output is strict JSON either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from captioning.config import PROJECT_ROOT
from harness.trained import TRAIN_QUERY, VAL_QUERY, shared_dir, synthetic_data, tiny_params
from tests.robustness.conftest import record_figures


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python writes but JSON does not allow."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _train_cli(tmp_path: Path, params: dict, *assignments: str) -> subprocess.CompletedProcess:
    """`captioning train` in a child process, on the process's shared synthetic data."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "captioning.cli",
        "train",
        "--params",
        str(params_file),
        "--no-tracking",
        "--out",
        str(tmp_path / "run"),
    ]
    for item in assignments:
        command += ["--set", item]
    env = {**os.environ, "CAPTIONING_DATA_DIR": str(shared_dir() / "data"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _package_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model" / "weights.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def features() -> Path:
    """The shared feature cache with the train and val images encoded (once per process)."""
    from captioning.data.query import parse_query, select
    from captioning.features.store import build_features

    folder = shared_dir() / "features"
    with synthetic_data():
        for query in (TRAIN_QUERY, VAL_QUERY):
            build_features(
                select(query), "lite0", folder / "lite0" / parse_query(query).dataset, 32, progress=False, num_workers=0
            )
    return folder


@pytest.mark.parametrize(
    "batch_size, reason",
    [
        (32, "NaN or inf in 20 steps in a row"),  # 25 steps an epoch: the run of skipped steps stops it
        (64, "validation loss is nan"),  # 13 steps: the epoch ends, huge finite weights give NaN outputs
    ],
)
def test_a_diverging_run_stops_with_one_line_and_packages_nothing(features, tmp_path, batch_size, reason):
    params = tiny_params(epochs=1, batch_size=batch_size)
    done = _train_cli(tmp_path, params, "train.lr=1e30", "train.epochs=1")

    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], done.stderr
    assert "lower train.lr" in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""  # no JSON with NaN in it, no JSON at all
    assert not (tmp_path / "run" / "model").exists()  # nothing packaged
    record_figures(
        f"training: lr 1e30, batch {batch_size}",
        {"exit_code": done.returncode, "message": lines[0], "packages_written": 0},
    )


def test_a_rate_float32_cannot_hold_is_refused_before_training(features, tmp_path):
    done = _train_cli(tmp_path, tiny_params(epochs=1), "train.lr=1e40")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: train.lr must be a positive number a float32 can hold, not 1e+40"
    ]
    assert not (tmp_path / "run" / "model").exists()


def test_nan_features_skip_their_steps_and_the_run_finishes_with_finite_weights(features, tmp_path):
    """A real fault: the cached features of one training image are NaN. Every batch holding one of
    its five captions has a NaN loss and is skipped; the other steps train; the package is finite."""
    from captioning.data.query import select
    from captioning.features.store import FeatureStore

    with synthetic_data():
        poisoned = select(TRAIN_QUERY)[3].image_id
    source = FeatureStore.open(features / "lite0" / "synthetic")
    rows = source.get(source.ids).astype(np.float32)
    rows[source.ids.index(poisoned)] = np.nan
    copy = FeatureStore.open_or_create(
        tmp_path / "features" / "lite0" / "synthetic", source.encoder, source.positions, source.dim
    )
    copy.append(source.ids, rows)
    copy.flush()
    params = tiny_params(epochs=1)
    params["features"]["dir"] = str(tmp_path / "features")

    done = _train_cli(tmp_path, params)

    assert done.returncode == 0, done.stderr
    best = _strict_json(done.stdout)["best"]
    assert 1 <= best["skipped_steps"] <= 5  # the batches that drew one of the image's 5 captions
    assert all(np.isfinite(value) for value in best.values() if isinstance(value, float))
    weights = _package_weights(tmp_path / "run")
    assert weights and all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["skipped_steps"] == best["skipped_steps"]
    record_figures(
        "training: NaN features of one image",
        {
            "steps": best["step"],
            "skipped_steps": best["skipped_steps"],
            "exit_code": 0,
            "nonfinite_weight_tensors": 0,
            "val_CIDEr": round(best["val_CIDEr"], 2),
        },
    )
