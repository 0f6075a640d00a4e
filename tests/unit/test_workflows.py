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


def _jobs():
    for name in ("ci.yml", "cd.yml"):
        for job_name, job in load(name)["jobs"].items():
            yield name, job_name, job


def test_no_permission_unless_a_job_asks_and_only_the_release_may_push():
    for name in ("ci.yml", "cd.yml"):
        assert load(name)["permissions"] == {}, name
    granted = {(name, job_name): job.get("permissions") for name, job_name, job in _jobs()}
    assert granted == {
        ("ci.yml", "test"): {"contents": "read"},
        ("cd.yml", "ci"): {"contents": "read"},  # a called workflow gets at most what its caller job has
        ("cd.yml", "release"): {"contents": "read", "packages": "write"},
    }


def test_each_secret_is_given_to_the_one_step_that_uses_it():
    for name, job_name, job in _jobs():
        assert "secrets." not in str(job.get("env", {})), f"{name} {job_name}: a secret in the job's env"
        for step in job.get("steps", []):
            assert "secrets." not in str(step.get("with", {})) + step.get("run", ""), f"{name} {step.get('name')}"
    assert "secrets" not in (WORKFLOWS / "ci.yml").read_text(encoding="utf-8")  # CI needs none
    release = load("cd.yml")["jobs"]["release"]
    holders = {
        step["name"]: sorted(re.findall(r"secrets\.([A-Z_]+)", str(step.get("env", {}))))
        for step in release["steps"]
        if "secrets." in str(step.get("env", {}))
    }
    assert holders == {
        "Release (bento and image, the model inside)": ["MLFLOW_TRACKING_URI"],
        "Push the image": ["GITHUB_TOKEN"],
        "Cluster credentials": ["KUBECONFIG"],
    }


def test_actions_are_pinned_by_commit_and_checkout_keeps_no_token():
    for name in ("ci.yml", "cd.yml"):
        text = (WORKFLOWS / name).read_text(encoding="utf-8")
        remote = re.findall(r"uses: ([^\s.][^\s@]*)@(\S+)(.*)", text)
        assert remote, name
        for action, ref, comment in remote:
            assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{name}: {action}@{ref} is not pinned by commit"
            assert re.fullmatch(r" # v\d+(\.\d+)*", comment), f"{name}: {action} has no version comment"
    for name, job_name, job in _jobs():
        for step in job.get("steps", []):
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, f"{name} {job_name}"
