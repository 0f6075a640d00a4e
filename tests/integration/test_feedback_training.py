"""Training on `synthetic[train]-40+feedback`: corrections stored by the service become training pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioning.config import data_dir
from captioning.training import caption_data, load_split, train
from harness.settings import test_settings
from harness.trained import synthetic_data, tiny_params

pytestmark = pytest.mark.slow

TRAIN_QUERY = "synthetic[train]-40+feedback"
# Corrections for three held-out synthetic images; "teapot" and "kettle" are words no synthetic caption uses.
CORRECTIONS = ["a teapot drawn beside the shapes", "a kettle and a teapot on a plain background", "a small teapot"]


class Started:
    def on_train_start(self, info):
        self.info = info


@pytest.fixture
def feedback_data() -> list:
    """The per-test data folder with the process's synthetic data linked in and three corrections
    stored (and approved) through captioning.data.feedback in a real SQLite file (data_dir()/feedback/feedback.db)."""
    from captioning.data.feedback import FeedbackStore
    from captioning.data.query import select

    with synthetic_data() as shared:
        images = [record.path for record in select("synthetic[test]-3s5")]
    data_dir().mkdir(parents=True, exist_ok=True)
    (data_dir() / "synthetic").symlink_to(shared / "synthetic", target_is_directory=True)
    store = FeedbackStore()
    stored = [
        store.add(Path(path).read_bytes(), caption, model_version="1") for path, caption in zip(images, CORRECTIONS)
    ]
    store.approve([item.id for item in stored])  # admitted into training by an operator
    assert (data_dir() / "feedback" / "feedback.db").is_file()
    return stored


def test_training_on_synthetic_plus_feedback(feedback_data, tmp_path):
    from captioning.inference.model_package import read_config
    from captioning.vocab import Vocabulary

    params = tiny_params(epochs=1)
    params["data"]["train_query"] = TRAIN_QUERY
    settings = test_settings(**params)
    started = Started()
    result = train(settings, [started], out_dir=tmp_path / "train", resume=False)

    info = started.info
    assert info["train_images"] == 40 + 3
    assert info["train_pairs"] == 40 * 5 + 3  # five captions per synthetic image, one per correction
    vocab: Vocabulary = info["vocab"]
    assert "teapot" in vocab and "kettle" in vocab
    package_vocab = Vocabulary.from_dict(json.loads((result.package_dir / "vocab.json").read_text()))
    assert package_vocab == vocab
    assert read_config(result.package_dir)["data"]["train_query"] == TRAIN_QUERY
    assert result.best["val_CIDEr"] >= 0

    # The training pairs hold every correction, with the features of the image it corrects,
    # read from the feedback dataset's own store.
    records, stores = load_split(TRAIN_QUERY, settings.features, progress=False, rank=0)
    assert list(stores) == ["synthetic", "feedback"]
    data = caption_data(records, stores, vocab, 16)
    pairs = {vocab.decode(tokens.tolist()): int(row) for tokens, row in zip(data.tokens, data.rows)}
    for item in feedback_data:
        image = data.image_ids.index(f"feedback/{item.image_sha256}")
        assert pairs[item.caption] == image
        expected = stores["feedback"].get([item.image_sha256])[0]
        assert (data.image_features([image], "cpu")[0].numpy() == expected.astype("float32")).all()

    # `captioning features` fills (here: finds filled) one store per dataset of the union.
    from typer.testing import CliRunner

    from captioning.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(params))  # JSON is YAML
    listed = CliRunner().invoke(app, ["features", TRAIN_QUERY, "--params", str(params_file)])
    assert listed.exit_code == 0, listed.output
    summary = json.loads(listed.stdout)
    assert summary["images"] == 43 and summary["encoded"] == 0
    assert {name: store["images"] for name, store in summary["stores"].items()} == {"synthetic": 40, "feedback": 3}
