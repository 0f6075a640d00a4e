"""The CLI and the flows read settings the same way: params.yaml, the `--params` overlay (default
$CAPTIONING_PARAMS_OVERLAY), `--set` items; a wrong key or value stops either at once, before any
work, with exit 2 and the same line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from captioning.cli import app
from captioning.config import PROJECT_ROOT

TYPO = ("train.epoch=2", "error: train.epoch is not a setting; did you mean train.epochs?")
NOT_A_NUMBER = ("train.lr=abc", "error: train.lr='abc': Input should be a valid number")
SYNTHETIC = str(PROJECT_ROOT / "params-synthetic.yaml")


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture
def no_flow_runs(monkeypatch):
    """The flows' entry points with every flow replaced by one that fails the test when called."""
    import flows.evaluation
    import flows.retrain
    import flows.training

    def must_not_run(*args, **kwargs):
        raise AssertionError("a flow run started")

    monkeypatch.setattr(flows.training, "training_flow", must_not_run)
    monkeypatch.setattr(flows.retrain, "retrain_flow", must_not_run)
    monkeypatch.setattr(flows.evaluation, "evaluation_flow", must_not_run)
    return {"training": flows.training, "retrain": flows.retrain, "evaluation": flows.evaluation}


@pytest.mark.parametrize("item, message", [TYPO, NOT_A_NUMBER])
def test_cli_and_flows_refuse_a_bad_setting_alike(item, message, no_flow_runs, capsys, tmp_path):
    result = cli("train", "--set", item, "--no-tracking")
    assert result.exit_code == 2 and result.stderr.strip() == message
    assert not (tmp_path / "artifacts").exists()  # nothing was started
    for name, module in no_flow_runs.items():
        extra = ["--model", "x"] if name == "evaluation" else []
        with pytest.raises(SystemExit) as stopped:
            module.main([*extra, "--set", item])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.strip() == message, name


@pytest.mark.parametrize(
    "args",
    [
        ["features", "synthetic[train]"],
        ["evaluate", "--model", "nowhere"],
        ["evaluate-predictions", "nowhere.json"],
        ["compare", "--model", "a=nowhere"],
        ["register", "--model", ".", "--metrics", "nowhere.json"],
        ["registry", "list"],
        ["release"],
        ["profile", "full"],
        ["settings"],
        ["data", "acquire", "synthetic"],
        ["data", "validate", "synthetic"],
    ],
)
def test_every_command_that_reads_settings_takes_params_and_set(args, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(app, [*args, "--set", TYPO[0]], catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr.strip() == TYPO[1], result.output
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("train: {epochs: many}\n")
    result = cli(*args, "--params", str(overlay))
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: train.epochs='many': Input should be a valid integer (with bad.yaml laid over params.yaml)"
    )


@pytest.mark.parametrize(
    "content, reason",
    [
        ("train: [epochs\n", "settings file {path} line 2 is not valid YAML"),
        ("- train\n- model\n", "settings file {path} must hold a mapping of sections"),
        ("train:\n  epoch: 2\n", "train.epoch is not a setting; did you mean train.epochs?"),
        ("trian:\n  epochs: 2\n", "trian is not a setting; did you mean train?"),
    ],
)
def test_an_overlay_that_is_not_a_mapping_of_settings_is_refused(content, reason, tmp_path, no_flow_runs, capsys):
    path = tmp_path / "overlay.yaml"
    path.write_text(content)
    message = f"error: {reason.format(path=path)} (with overlay.yaml laid over params.yaml)"
    result = cli("train", "--params", str(path), "--no-tracking")
    assert result.exit_code == 2 and result.stderr.strip() == message
    with pytest.raises(SystemExit) as stopped:
        no_flow_runs["training"].main(["--params", str(path)])
    assert stopped.value.code == 2 and capsys.readouterr().err.strip() == message


def test_params_is_an_overlay_in_the_cli_and_the_flows(tmp_path, monkeypatch):
    from flows import load_settings, parse_settings, settings_parser

    overlay = tmp_path / "small.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"epochs": 1}, "vocab": {"min_freq": 2}}))
    args = ["--params", str(overlay), "--set", "train.grad_clip=0"]
    shown = json.loads(cli("settings", *args, "--json").stdout)
    expected = load_settings(str(overlay), ["train.grad_clip=0"])
    assert shown == json.loads(json.dumps(expected.to_dict()))
    assert expected.train.epochs == 1 and expected.train.grad_clip == 0.0
    assert expected.train.lr == load_settings().train.lr  # what the overlay does not name: params.yaml's
    assert parse_settings(settings_parser("test"), args)[1] == expected

    # $CAPTIONING_PARAMS_OVERLAY is the default overlay of both.
    monkeypatch.setenv("CAPTIONING_PARAMS_OVERLAY", str(overlay))
    assert json.loads(cli("settings", "--json").stdout)["train"]["epochs"] == 1
    assert parse_settings(settings_parser("test"), [])[1].train.epochs == 1


def test_train_reads_the_synthetic_overlay(monkeypatch, tmp_path):
    import captioning.training

    seen = []

    class Result:
        package_dir, best, history = tmp_path, {"epoch": 1}, [{}]

    def fake_train(settings, callbacks=(), out_dir=None, resume=True):
        seen.append(settings)
        return Result()

    monkeypatch.setattr(captioning.training, "train", fake_train)
    result = cli("train", "--params", SYNTHETIC, "--set", "train.grad_clip=0", "--no-tracking")
    assert result.exit_code == 0, result.output
    assert seen[0].data.dataset == "synthetic" and seen[0].train.grad_clip == 0.0


@pytest.mark.parametrize("module", ["flows.retrain", "captioning.cli"])
def test_commands_stop_before_any_run(module):
    # The real entry points in a process of their own: the Prefect API named here does not exist,
    # so reaching any flow run would fail differently.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", module] + (["train"] if module == "captioning.cli" else [])
    done = subprocess.run(
        [*command, "--set", TYPO[0]], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == TYPO[1]
