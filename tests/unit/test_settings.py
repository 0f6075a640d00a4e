"""captioning.settings: params.yaml as one checked model; each wrong key or value is one line."""

from __future__ import annotations

import pytest
import yaml

from captioning.config import PARAMS_FILE, PROJECT_ROOT
from captioning.settings import (
    DecodingSettings,
    Settings,
    SettingsError,
    apply_overrides,
    deep_merge,
    flatten,
    load_settings,
    parse_overrides,
    profile_overrides,
)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(PARAMS_FILE)


def test_params_yaml_and_the_synthetic_overlay_are_complete_and_valid(settings):
    raw = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
    assert set(raw) == set(Settings.model_fields)
    for name, section in raw.items():
        if name != "profiles":
            assert set(section) == set(getattr(settings, name).to_dict()), name
    synthetic = load_settings(PARAMS_FILE, PROJECT_ROOT / "params-synthetic.yaml")
    assert synthetic.data.dataset == "synthetic" and synthetic.train.lr == 4e-3
    assert synthetic.train.seed == settings.train.seed  # not in the overlay: params.yaml's


@pytest.mark.parametrize(
    "item, reason",
    [
        ("data.dataset=[a]", "data.dataset=['a']: Input should be a valid string"),
        ("synthetic.train=0", "synthetic.train=0: Input should be greater than or equal to 1"),
        ("synthetic.image_size=8", "synthetic.image_size=8: Input should be greater than or equal to 16"),
        (
            "features.encoder=resnet",
            "features.encoder='resnet': Input should be 'lite0', 'lite2', 'lite2_260' or 'lite2_320'",
        ),
        ("features.workers=-1", "features.workers=-1: Input should be greater than or equal to 0"),
        ("vocab.min_freq=0", "vocab.min_freq=0: Input should be greater than or equal to 1"),
        (
            "model.decoder=lstm",
            "model.decoder='lstm': Input should be 'show_tell', 'attention', 'transformer' or 'updown'",
        ),
        ("model.dropout=1", "model.dropout=1: Input should be less than 1"),
        (
            "model.ensemble=[lstm]",
            "model.ensemble.0='lstm': Input should be 'show_tell', 'attention', 'transformer' or 'updown'",
        ),
        ("train.epochs=-1", "train.epochs=-1: Input should be greater than or equal to 0"),
        ("train.epochs=2.5", "train.epochs=2.5: Input should be a valid integer"),
        ("train.lr=0", "train.lr=0: Input should be greater than 0"),
        ("train.lr=abc", "train.lr='abc': Input should be a valid number"),
        ("train.lr=.inf", "train.lr=inf: Input should be a finite number"),
        ("train.progress=maybe", "train.progress='maybe': Input should be a valid boolean"),
        ("train.schedule=step", "train.schedule='step': Input should be 'cosine', 'linear' or 'constant'"),
        ("train.precision=int8", "train.precision='int8': Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ("train.scst_samples=1", "train.scst_samples=1: Input should be greater than or equal to 2"),
        ("decoding.beam_size=0", "decoding.beam_size=0: Input should be greater than or equal to 1"),
        ("decoding.rerank=best", "decoding.rerank='best': Input should be 'none' or 'consensus'"),
        (
            "decoding.rerank_neighbour_weight=2",
            "decoding.rerank_neighbour_weight=2: Input should be less than or equal to 1",
        ),
        ("decoding.flip=1", "decoding.flip=1: Input should be a valid boolean"),
        ("evaluate.beam_sizes=[]", "evaluate.beam_sizes=[]: List should have at least 1 item after validation, not 0"),
        ("register.model_name=''", "register.model_name='': String should have at least 1 character"),
        ("register.gates.min.CIDEr=high", "register.gates.min.CIDEr='high': Input should be a valid number"),
        ("tracking.uri=''", "tracking.uri='': String should have at least 1 character"),
        ("retrain.include_feedback=sometimes", "retrain.include_feedback='sometimes': Input should be a valid boolean"),
        (
            "retrain.drift_source=prometheus:9090",
            "retrain.drift_source='prometheus:9090': a drift source is an http(s) URL (Prometheus, or a model "
            "server's /metrics) or ''",
        ),
        (
            "retrain.drift_source=http://",
            "retrain.drift_source='http://': a drift source is an http(s) URL (Prometheus, or a model "
            "server's /metrics) or ''",
        ),
        ("release.poll_seconds=0", "release.poll_seconds=0: Input should be greater than 0"),
        ("train.epoch=2", "train.epoch is not a setting; did you mean train.epochs?"),
        ("trian.epochs=2", "trian is not a setting; did you mean train?"),
        ("train.epochs", "'train.epochs' is not of the form section.key=value"),
        ("train..epochs=2", "'train..epochs=2': 'train..epochs' is not a setting name"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(item, reason):
    with pytest.raises(SettingsError) as refused:
        load_settings(PARAMS_FILE, overrides=[item])
    assert str(refused.value) == reason
    assert "\n" not in str(refused.value)


def test_override_values_are_read_as_yaml():
    assert parse_overrides(["train.lr=3e-4", "train.epochs=2", "decoding.flip=true", "features.dir=null"]) == {
        "train": {"lr": 3e-4, "epochs": 2},
        "decoding": {"flip": True},
        "features": {"dir": None},
    }
    assert load_settings(PARAMS_FILE, overrides=["train.lr=3e-4"]).train.lr == 3e-4


def test_a_drift_source_is_empty_a_prometheus_url_or_a_metrics_page(settings):
    assert settings.retrain.drift_source == ""
    for source in ("http://prometheus:9090", "https://monitor.example.org/prom/", "http://10.0.0.7:3001/metrics"):
        assert load_settings(PARAMS_FILE, overrides=[f"retrain.drift_source={source}"]).retrain.drift_source == source


def test_a_missing_setting_is_named(tmp_path):
    raw = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
    del raw["train"]["lr"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SettingsError, match=r"^train.lr is missing \(params.yaml declares every setting\)$"):
        load_settings(path)


def test_settings_are_frozen_and_replace_checks(settings):
    with pytest.raises(Exception):
        settings.train.epochs = 3
    assert settings.decoding.replace(beam_size=5).beam_size == 5
    assert isinstance(settings.decoding.replace(beam_size=5), DecodingSettings)
    with pytest.raises(SettingsError, match=r"^decoding.beam_size=0: Input should be greater than or equal to 1$"):
        settings.decoding.replace(beam_size=0)
    with pytest.raises(SettingsError, match=r"^decoding.beam is not a setting; did you mean decoding.beam_size\?$"):
        settings.decoding.replace(beam=5)
    changed = apply_overrides(settings, [f"train.epochs={settings.train.epochs + 1}"])
    assert changed.train.epochs == settings.train.epochs + 1 and changed.model == settings.model


def test_members_take_their_own_decoder_settings_and_seed(settings):
    ensemble = apply_overrides(
        settings, ["model.ensemble=[transformer, {decoder: updown, model: {dropout: 0.2}, train: {scst_epochs: 0}}]"]
    )
    first, second, third = ensemble.members()
    assert first.model.decoder == settings.model.decoder and first.model.ensemble == []
    assert second.model.decoder == "transformer" and second.train.seed == settings.train.seed + 1
    assert third.model.decoder == "updown" and third.model.dropout == 0.2 and third.train.scst_epochs == 0
    assert third.train.seed == settings.train.seed + 2 and third.train.lr == settings.train.lr
    assert settings.members() == [settings.member(0)]


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("{decoder: updown, train: {epoch: 1}}", "train.epoch is not a setting a member can take"),
        ("{decoder: updown, model: {ensemble: []}}", "model.ensemble is not a setting a member can take"),
        ("{decoder: updown, model: {dropout: 2}}", "model.ensemble[0]: model.dropout=2: Input should be less than 1"),
    ],
)
def test_member_settings_are_checked(settings, entry, reason):
    with pytest.raises(SettingsError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(settings, [f"model.ensemble=[{entry}]"])


def test_profile_overrides_are_checked_like_set_items(settings):
    full = profile_overrides(settings, "full")
    assert f"train.epochs={settings.profiles['full']['train.epochs']}" in full
    assert apply_overrides(settings, full).decoding.rerank == "consensus"
    with pytest.raises(SettingsError, match=r"^no profile 'fast' in params \(profiles: full\)$"):
        profile_overrides(settings, "fast")
    odd = apply_overrides(settings, ["profiles.odd={decoding.beam_size: 0}"])
    with pytest.raises(SettingsError, match=r"^profile 'odd': decoding.beam_size=0: "):
        profile_overrides(odd, "odd")


def test_flatten_names_every_setting_once(settings):
    flat = flatten(settings)
    assert flat["train.lr"] == settings.train.lr and flat["register.gates.min.CIDEr"] == 45.0
    assert flat["model.ensemble"] == [] and flat["features.dir"] is None
    assert not any(key.startswith("profiles") for key in flat)
    assert flatten({"a": {"b": 1, "c": {}}}) == {"a.b": 1, "a.c": {}}


def test_deep_merge_lays_sections_over_each_other():
    base = {"train": {"lr": 1, "epochs": 2}, "model": {"decoder": "attention"}}
    assert deep_merge(base, {"train": {"lr": 3}}) == {
        "train": {"lr": 3, "epochs": 2},
        "model": {"decoder": "attention"},
    }
    assert base["train"]["lr"] == 1


def test_a_set_mapping_replaces_the_mapping_but_an_overlay_merges(tmp_path):
    # --set register.gates.min={CIDEr: 0}: no other minimum is left (as with `dvc exp run -S`).
    assert load_settings(PARAMS_FILE, overrides=["register.gates.min={CIDEr: 0}"]).register.gates.min == {"CIDEr": 0.0}
    overlay = tmp_path / "gates.yaml"
    overlay.write_text("register:\n  gates:\n    min:\n      CIDEr: 0\n")
    merged = load_settings(PARAMS_FILE, overlay).register.gates.min
    assert merged["CIDEr"] == 0.0 and merged["BLEU-4"] == load_settings(PARAMS_FILE).register.gates.min["BLEU-4"]
    with pytest.raises(SettingsError, match=r"^'train.lr.x=1': 'lr' is a value, not a section$"):
        load_settings(PARAMS_FILE, overrides=["train.lr.x=1"])
