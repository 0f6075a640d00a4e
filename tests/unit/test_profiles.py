"""Named configurations in params.yaml (`profiles`) and the `captioning profile` command."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from captioning.cli import app
from captioning.config import load_params, override, profile_overrides


def test_full_profile_overrides_existing_params():
    params = load_params()
    assignments = profile_overrides(params, "full")
    assert assignments and all("=" in item for item in assignments)
    full = override(params, assignments)
    # Every value, the ensemble's mappings included, survives the round trip through `section.key=value` text.
    profile = params["profiles"]["full"]
    for key, value in profile.items():
        section, name = key.split(".")
        assert full[section][name] == value, key
    assert any(isinstance(entry, dict) for entry in profile["model.ensemble"])
    assert full["model"]["decoder"] == params["model"]["decoder"]  # what the profile does not name stays


def test_profile_command_prints_dvc_flags_and_refuses_unknown_names(tmp_path):
    runner = CliRunner()
    flags = runner.invoke(app, ["profile", "full", "--dvc"])
    epochs = load_params()["profiles"]["full"]["train.epochs"]
    assert flags.exit_code == 0 and f"-S train.epochs={epochs}" in flags.stdout.splitlines()
    unknown = runner.invoke(app, ["profile", "fast"])
    assert unknown.exit_code == 2 and "no profile 'fast'" in unknown.stderr and "full" in unknown.stderr

    params = {"train": {"epochs": 4}, "profiles": {"odd": {"train.epoch": 3, "train.epochs": [1, 2]}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    typo = runner.invoke(app, ["profile", "odd", "--params", str(path)])
    assert typo.exit_code == 2 and "'train.epoch', which is not a param" in typo.stderr
    with pytest.raises(ValueError, match="not a param"):
        profile_overrides(params, "odd")
    params["profiles"]["odd"].pop("train.epoch")
    assert profile_overrides(params, "odd") == ["train.epochs=[1, 2]"]
