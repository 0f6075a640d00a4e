"""Named configurations in params.yaml (`profiles`) and the `captioning profile` command."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from captioning.cli import app
from captioning.config import PARAMS_FILE
from captioning.settings import (
    Settings,
    SettingsError,
    apply_overrides,
    deep_merge,
    load_settings,
    profile_overrides,
)


def test_full_profile_overrides_existing_params():
    settings = load_settings(PARAMS_FILE)
    assignments = profile_overrides(settings, "full")
    assert assignments and all("=" in item for item in assignments)
    full = apply_overrides(settings, assignments)
    # Every value, the ensemble's mappings included, survives the round trip through `section.key=value` text.
    profile = settings.profiles["full"]
    nested: dict = {}
    for key, value in profile.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    assert full == Settings.model_validate(deep_merge(settings.to_dict(), nested))
    assert full.members()[1].model.decoder == "transformer" and full.members()[1].train.scst_epochs == 0
    assert full.model.decoder == settings.model.decoder  # what the profile does not name stays


def test_profile_command_prints_dvc_flags_and_refuses_unknown_names(tmp_path):
    runner = CliRunner()
    flags = runner.invoke(app, ["profile", "full", "--dvc"])
    epochs = load_settings(PARAMS_FILE).profiles["full"]["train.epochs"]
    assert flags.exit_code == 0 and f"-S train.epochs={epochs}" in flags.stdout.splitlines()
    unknown = runner.invoke(app, ["profile", "fast"])
    assert unknown.exit_code == 2 and "no profile 'fast'" in unknown.stderr and "full" in unknown.stderr

    # --params is an overlay: this file adds one profile to params.yaml's.
    overlay = tmp_path / "odd.yaml"
    overlay.write_text(yaml.safe_dump({"profiles": {"odd": {"train.epoch": 3, "train.epochs": 2}}}))
    typo = runner.invoke(app, ["profile", "odd", "--params", str(overlay)])
    assert typo.exit_code == 2
    assert typo.stderr.strip() == "error: profile 'odd': train.epoch is not a setting; did you mean train.epochs?"
    settings = load_settings(PARAMS_FILE, overlay)
    with pytest.raises(SettingsError, match="not a setting"):
        profile_overrides(settings, "odd")
    fixed = load_settings(PARAMS_FILE, overrides=["profiles.odd={train.epochs: 2, model.ensemble: [updown]}"])
    assert profile_overrides(fixed, "odd") == ["train.epochs=2", "model.ensemble=[updown]"]
    wrong = load_settings(PARAMS_FILE, overrides=["profiles.odd={train.epochs: [1, 2]}"])
    with pytest.raises(SettingsError, match=r"profile 'odd': train.epochs=\[1, 2\]: Input should be a valid integer"):
        profile_overrides(wrong, "odd")
