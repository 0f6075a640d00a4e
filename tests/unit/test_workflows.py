"""The GitHub workflows: CD releases only after CI passed, and dispatch payloads never reach a
shell except through `env:`, checked as a version number."""

from __future__ import annotations

import re

import yaml

from captioning.config import PROJECT_ROOT

WORKFLOWS = PROJECT_ROOT / ".github" / "workflows"


def load(name: str) -> dict:
    spec = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    spec["on"] = spec.pop(True, spec.get("on"))  # YAML 1.1 reads the key `on` as true
    return spec


def test_cd_runs_only_after_ci_passed():
    cd, ci = load("cd.yml"), load("ci.yml")
    assert "workflow_call" in ci["on"]
    assert cd["jobs"]["ci"]["uses"] == "./.github/workflows/ci.yml"
    assert cd["jobs"]["release"]["needs"] == "ci"
    assert set(cd["on"]) == {"workflow_dispatch", "repository_dispatch"}


def test_dispatch_values_reach_shells_only_through_env_and_are_checked():
    release = load("cd.yml")["jobs"]["release"]
    for step in release["steps"]:
        assert "github.event" not in step.get("run", ""), step.get("name")
        assert "${{" not in step.get("run", ""), step.get("name")
    assert "github.event.client_payload.model_version" in release["env"]["MODEL_VERSION"]
    check = release["steps"][0]
    assert re.search(r"=~ \^\[0-9\]\+\$", check["run"]) and "exit 1" in check["run"]
