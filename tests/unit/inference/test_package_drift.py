"""A package's drift reference (drift.npz): written with its checksum, checked on loading and by
the package's file check, and optional (a package without one loads with drift monitoring off)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioning.features.drift import DRIFT_FILE, DriftReference
from captioning.inference.model_package import (
    CONFIG_FILE,
    PackageError,
    check_package_files,
    load_drift,
    load_package,
    package_digest,
    read_config,
    save_package,
)
from captioning.models import build_model
from captioning.serving.drift import LiveDrift
from captioning.vocab import Vocabulary

CAPTIONS = ["a red circle on the left", "two blue squares", "a green star at the top"]
MODEL = {"decoder": "attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 8, "dropout": 0.0}
CHANNELS = 32


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    pooled = np.random.default_rng(0).normal(size=(120, CHANNELS))
    return DriftReference.fit(pooled, window=20, seed=0, permutations=100, encoder="lite0")


def write(folder, drift=None, encoder="lite0"):
    torch.manual_seed(0)
    vocab = Vocabulary.build(CAPTIONS, 1)
    model = build_model(MODEL, len(vocab), CHANNELS)
    return save_package(
        folder, model, vocab, {"model": MODEL, "encoder": encoder, "feature_dim": CHANNELS}, drift=drift
    )


def test_the_reference_is_written_with_its_checksum_and_loads_the_same(tmp_path, reference):
    folder = write(tmp_path / "pkg", reference)
    config = read_config(folder)
    assert (folder / DRIFT_FILE).is_file() and len(config["drift_sha256"]) == 64
    assert DRIFT_FILE in check_package_files(folder)
    loaded = load_drift(folder, config)
    assert loaded.threshold == reference.threshold and loaded.window == 20 and loaded.encoder == "lite0"
    window = np.random.default_rng(1).normal(size=(20, CHANNELS))
    assert loaded.score(window) == reference.score(window)
    load_package(folder)  # the rest of the package is unaffected
    # Saved again with the same reference: the same bytes, so the same package digest.
    digest = package_digest(folder)
    write(folder, reference)
    assert package_digest(folder) == digest


def test_a_damaged_or_missing_drift_file_is_refused(tmp_path, reference):
    folder = write(tmp_path / "pkg", reference)
    config = read_config(folder)
    data = (folder / DRIFT_FILE).read_bytes()
    (folder / DRIFT_FILE).write_bytes(data[:-10])
    with pytest.raises(PackageError, match="drift.npz is missing or does not match the checksum"):
        load_drift(folder, config)
    with pytest.raises(PackageError, match="drift.npz is missing or does not match"):
        check_package_files(folder)
    with pytest.raises(PackageError, match="drift.npz is missing or does not match"):
        LiveDrift.for_package(folder, config)
    (folder / DRIFT_FILE).unlink()
    with pytest.raises(PackageError, match="drift.npz is missing"):
        load_drift(folder, config)


def test_a_package_without_a_reference_loads_with_drift_monitoring_off(tmp_path, reference):
    folder = write(tmp_path / "pkg")
    config = read_config(folder)
    assert "drift_sha256" not in config and not (folder / DRIFT_FILE).exists()
    assert load_drift(folder, config) is None
    assert DRIFT_FILE not in check_package_files(folder)
    assert LiveDrift.for_package(folder, config).figures() == {"enabled": False}
    # A stray drift.npz that the config does not record is not used.
    reference.save(folder)
    assert load_drift(folder, config) is None
    # Rewriting a package without a reference drops the old checksum.
    with_drift = write(tmp_path / "other", reference)
    assert "drift_sha256" in read_config(with_drift)
    write(with_drift)
    assert "drift_sha256" not in json.loads((with_drift / CONFIG_FILE).read_text())


def test_a_reference_of_other_features_than_the_encoders_is_not_used(tmp_path, reference):
    folder = write(tmp_path / "pkg", reference, encoder="lite2")
    live = LiveDrift.for_package(folder, read_config(folder))
    assert live.monitor is None and live.figures() == {"enabled": False}
    matching = write(tmp_path / "lite0", reference)
    assert LiveDrift.for_package(matching, read_config(matching)).figures()["enabled"] is True
