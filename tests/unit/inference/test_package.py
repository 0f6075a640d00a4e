"""Model packages and checkpoints: exact round trips, and mismatches refused loudly."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from captioning.inference.decoding import greedy
from captioning.inference.model_package import (
    CONFIG_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    PackageError,
    load_checkpoint,
    load_package,
    save_checkpoint,
    save_package,
)
from captioning.models import build_model
from captioning.vocab import Vocabulary

CAPTIONS = ["a red circle on the left", "two blue squares", "a green star at the top", "a yellow triangle"]
MODEL = {"decoder": "attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 8, "dropout": 0.0}


@pytest.fixture
def package(tmp_path):
    torch.manual_seed(0)
    vocab = Vocabulary.build(CAPTIONS, 1)
    model = build_model(MODEL, len(vocab), 32)
    config = {"model": MODEL, "encoder": "lite0", "feature_dim": 32, "decoding": {"beam_size": 2, "max_length": 6}}
    folder = save_package(tmp_path / "pkg", model, vocab, config)
    return folder, model, vocab


def test_round_trip_is_exact(package):
    folder, model, vocab = package
    loaded, loaded_vocab, config = load_package(folder)
    assert loaded_vocab == vocab
    assert config["encoder"] == "lite0" and config["decoding"]["beam_size"] == 2
    assert config["vocab_fingerprint"] == vocab.fingerprint() and config["format_version"] == 1
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    features = torch.randn(2, 5, 32)
    assert [h[0].tokens for h in greedy(model, features, 6)] == [h[0].tokens for h in greedy(loaded, features, 6)]
    assert not loaded.training


def test_saving_again_replaces_the_folder_cleanly(package):
    folder, model, vocab = package
    save_package(folder, model, vocab, {"model": MODEL, "encoder": "lite0", "feature_dim": 32, "note": "second"})
    assert json.loads((folder / CONFIG_FILE).read_text())["note"] == "second"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["pkg"]  # no .tmp or .old left


def test_other_vocabulary_is_refused(package):
    folder, _, _ = package
    other = Vocabulary.build(CAPTIONS + ["a purple hexagon"], 1)
    (folder / VOCAB_FILE).write_text(json.dumps(other.to_dict()))
    with pytest.raises(PackageError, match="fingerprint"):
        load_package(folder)


def test_other_architecture_is_refused(package):
    folder, _, _ = package
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model"]["hidden_dim"] = 48
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PackageError, match="shape mismatch"):
        load_package(folder)
    config["model"]["decoder"] = "show_tell"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PackageError, match="do not fit"):
        load_package(folder)


def test_damaged_or_replaced_weights_are_refused(package):
    folder, _, _ = package
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(PackageError, match="checksum"):
        load_package(folder)


class _Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_weights_are_loaded_without_unpickling_code(package):
    folder, _, _ = package
    (folder / WEIGHTS_FILE).write_bytes(pickle.dumps({"weight": _Payload()}, protocol=2))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.pop("weights_sha256")  # only the weights_only guard stands in the way now
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PackageError, match="Weights only load failed"):
        load_package(folder)


def test_incomplete_or_foreign_folders_are_refused(package, tmp_path):
    folder, _, _ = package
    with pytest.raises(PackageError, match="not a model package"):
        load_package(tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["format_version"] = 99
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PackageError, match="format version 99"):
        load_package(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(folder)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "epoch": 2,
        "batch": 7,
        "best": {"val_CIDEr": 12.5},
        "history": [{"epoch": 1}],
    }
    path = tmp_path / "ck" / "checkpoint.pt"
    save_checkpoint(path, state)
    assert not path.with_name("checkpoint.pt.tmp").exists()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and loaded["best"] == {"val_CIDEr": 12.5}
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    path.write_bytes(pickle.dumps({"x": _Payload()}, protocol=2))
    with pytest.raises(PackageError, match="Weights only load failed"):
        load_checkpoint(path)
