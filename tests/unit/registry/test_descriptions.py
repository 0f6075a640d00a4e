"""What a model version's description says: data, settings that differ from params.yaml, scores, verdict."""

from __future__ import annotations

from captioning.config import PARAMS_FILE
from captioning.registry.versions import _verdict, settings_changes, version_description
from captioning.settings import load_settings

DEFAULTS = load_settings(PARAMS_FILE)
CHANGED = load_settings(
    PARAMS_FILE,
    None,
    ["train.epochs=2", "model.decoder=transformer", "features.dir=/tmp/elsewhere", "tracking.uri=sqlite:///x.db"],
)
METRICS = {"BLEU-4": 21.5, "CIDEr": 52.25}
LINEAGE = {"data_hash": "0123abcd.dir", "git_commit": "f00d"}


def test_only_model_defining_settings_that_differ_are_named():
    assert settings_changes(DEFAULTS, DEFAULTS) == {}
    # where features live and which registry is used do not make another model
    assert settings_changes(CHANGED, DEFAULTS) == {"train.epochs": 2, "model.decoder": "transformer"}
    assert settings_changes(CHANGED) == settings_changes(CHANGED, DEFAULTS)  # default: params.yaml


def test_description_names_data_changes_scores_verdict_and_links():
    text = version_description(
        CHANGED,
        "synthetic[test]-16",
        METRICS,
        LINEAGE,
        _verdict([], "3"),
        {"Prefect flow run": "http://127.0.0.1:4200/runs/flow-run/abc"},
        defaults=DEFAULTS,
    )
    assert f"trained on `{CHANGED.data.train_query}`" in text and "data hash `0123abcd.dir`" in text
    assert "`model.decoder=transformer`, `train.epochs=2`" in text
    assert "Test scores on `synthetic[test]-16`: BLEU-4 21.50, CIDEr 52.25." in text
    assert "Gate: passed; now champion, replacing version 3." in text
    assert text.endswith("Prefect flow run: http://127.0.0.1:4200/runs/flow-run/abc")
    plain = version_description(DEFAULTS, "q", METRICS, LINEAGE, "x", defaults=DEFAULTS)
    assert "Settings that differ from params.yaml: none." in plain


def test_verdicts_in_words():
    assert _verdict([], None) == "passed; now champion (the first one)."
    assert _verdict(["CIDEr 40.00 < minimum 45.00"], "2") == (
        "failed (CIDEr 40.00 < minimum 45.00); version 2 stays champion."
    )
    assert _verdict(["x"], None).endswith("no champion yet.")
