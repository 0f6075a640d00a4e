"""`make up`, then every promotion reaches the containers by itself through the rollout's stages
(smoke, shadow, canary, promote) while 4 clients keep sending requests: a healthy version earns all
the traffic, a broken, nonsensical or slow one, one whose container dies, or one whose analysis
loses Prometheus is rolled back, and no client request fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from captioning.config import PROJECT_ROOT
from captioning.release.container_image import podman
from captioning.release.traffic import RequestLoop
from harness.serving import free_port
from tests.container.conftest import IMAGE_REPO, STACK_NAME, register, run_cli
from tests.fixtures.processes import free_block

ROLLOUT_SECONDS = 900  # a rollout's bound here: its stages take a minute or two with the tests' settings
MIN_REQUESTS = 200
RESULTS: dict[str, dict] = {}  # figures of each rollout, written to reports/container_rollout.json


@pytest.fixture(scope="module")
def photo() -> bytes:
    """The clients' photo: a synthetic scene, the kind of photo the tiny versions were trained on.
    Their captions of it agree when both versions are good, as a real model's do on the photos it
    serves; two tiny models caption a photo of another kind each its own way, which the shadow
    stage would rightly read as disagreement."""
    from harness.serving import synthetic_jpeg

    return synthetic_jpeg(seed=5)


@pytest.fixture(scope="module")
def stack(first_release, workspace):
    """`make up` (scripts/up.sh) on free ports; `make down` afterwards."""
    env = {**workspace, "PORT": str(free_block()), "PREFECT_PORT": str(free_port())}
    up = subprocess.run(
        ["bash", "scripts/up.sh"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900
    )
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
    yield env
    subprocess.run(["bash", "scripts/down.sh"], env=env, cwd=PROJECT_ROOT, capture_output=True, timeout=300)
    pid_file = Path(env["PREFECT_HOME"]) / "server.pid"
    if pid_file.is_file():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def url(stack) -> str:
    return f"http://127.0.0.1:{stack['PORT']}"


def served_version(stack) -> str | None:
    try:
        return requests.get(url(stack) + "/model", timeout=30).json().get("registry_version")
    except (requests.RequestException, ValueError):
        return None


def state_of(stack) -> dict:
    return json.loads((Path(stack["CAPTIONING_STACK_DIR"]) / "state.json").read_text())


def wait_for_outcome(stack, version: str) -> dict:
    """The rollout of `version` once it ended (promoted or rolled back)."""
    started = time.monotonic()
    while time.monotonic() - started < ROLLOUT_SECONDS:
        last = state_of(stack).get("last_rollout") or {}
        if last.get("version") == version:
            return last
        time.sleep(1)
    watch_log = Path(stack["CAPTIONING_STACK_DIR"]) / "watch.log"
    pytest.fail(
        f"the rollout of version {version} did not end within {ROLLOUT_SECONDS} s:\n{watch_log.read_text()[-4000:]}"
    )


def wait_for_stage(stack, version: str, prefix: str) -> None:
    started = time.monotonic()
    while time.monotonic() - started < ROLLOUT_SECONDS:
        rollout = state_of(stack).get("rollout") or {}
        if rollout.get("version") == version and str(rollout.get("stage", "")).startswith(prefix):
            return
        time.sleep(0.5)
    pytest.fail(f"the rollout of version {version} never reached stage {prefix}")


def roll(stack, photo, change, during=None) -> dict:
    """Run `change` (it makes a version champion and returns it) while 4 clients send requests;
    `during(version)` runs once the rollout is under way; returns the rollout and the traffic."""
    with RequestLoop(url(stack), photo, clients=4) as loop:
        promoted_at = time.time()
        version = change()
        if during is not None:
            during(version)
        outcome = wait_for_outcome(stack, version)
        while loop.requests < MIN_REQUESTS:
            time.sleep(0.5)
    traffic = loop.summary()
    figures = {
        "version": version,
        "outcome": outcome["outcome"],
        "seconds": outcome["seconds"],
        "promotion_to_end_seconds": round(outcome["finished_at"] - promoted_at, 1),
        "stages": [(v["stage"], v["outcome"], v["at_seconds"], v["reason"]) for v in outcome["verdicts"]],
        "client_requests": traffic["requests"],
        "failed": traffic["failed"],
        "answered_by_candidate": traffic["by_version"].get(version, 0),
        "traffic": traffic,
    }
    return {**figures, "refusal": outcome.get("refusal")}


def champion(workspace) -> str:
    result = run_cli("registry", "list", "--json", env=workspace)
    assert result.returncode == 0, result.stderr
    return next(row["version"] for row in json.loads(result.stdout) if "champion" in row["aliases"])


def refused_tag(workspace, version: str) -> str:
    from captioning.registry.refusals import refused_reason

    return refused_reason(workspace["MLFLOW_TRACKING_URI"], "captioner", version) or ""


def drill(workspace, *args: str) -> None:
    result = run_cli("stack", "drill", *args, env=workspace)
    assert result.returncode == 0, result.stderr


def report(name: str, figures: dict) -> None:
    RESULTS[name] = {k: v for k, v in figures.items() if k != "traffic"}
    path = PROJECT_ROOT / "reports" / "container_rollout.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(RESULTS, indent=2))


def test_stack_runs_api_and_two_model_servers_apart(stack, photo):
    pods = podman("pod", "ps", "--format", "{{.Name}}").stdout.split()
    assert sorted(p for p in pods if p.startswith(STACK_NAME)) == [
        f"{STACK_NAME}-api-s0",
        f"{STACK_NAME}-model-s0",
        f"{STACK_NAME}-model-s1",
    ]
    images = {
        podman("inspect", "--format", "{{.ImageName}}", f"{pod}-{pod.split('-')[-2]}").stdout.strip()
        for pod in pods
        if pod.startswith(STACK_NAME)
    }
    assert images == {f"{IMAGE_REPO}:v1"}
    answer = requests.post(url(stack) + "/caption", files={"image": ("photo.jpg", photo)}, timeout=120)
    assert answer.status_code == 200 and answer.json()["caption"], answer.text
    assert served_version(stack) == "1"


def test_a_healthy_version_goes_through_every_stage(stack, workspace, packages, photo):
    promoted = roll(stack, photo, lambda: register(packages[1], workspace).version)
    report("healthy", promoted)
    assert promoted["version"] == "2" and promoted["outcome"] == "promoted", promoted
    assert [stage for stage, *_ in promoted["stages"]] == ["smoke", "shadow", "canary 50%", "canary 100%"]
    assert all(outcome != "failed" for _, outcome, *_ in promoted["stages"]), promoted["stages"]
    assert promoted["failed"] == 0 and promoted["answered_by_candidate"] > 0, promoted["traffic"]
    assert served_version(stack) == "2"
    state = state_of(stack)
    assert state["version"] == "2" and state["previous"]["version"] == "1"  # kept warm

    refused = register(packages[1], workspace, gates={"min": {"CIDEr": 1000.0}})
    assert not refused.promoted
    time.sleep(10)  # rounds of the watcher: a refused gate releases nothing
    released = Path(workspace["CAPTIONING_ARTIFACTS_DIR"]) / "release" / f"v{refused.version}"
    assert served_version(stack) == "2" and not released.exists()  # no release was even begun


def test_a_rollback_returns_to_the_warm_previous_version_in_seconds(stack, workspace, photo):
    def rollback() -> str:
        result = run_cli("registry", "rollback", "--json", env=workspace)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["champion"]

    with RequestLoop(url(stack), photo, clients=4) as loop:
        started = time.monotonic()
        version = rollback()
        while state_of(stack).get("version") != version and time.monotonic() - started < ROLLOUT_SECONDS:
            time.sleep(0.2)
        seconds = round(time.monotonic() - started, 1)
        while loop.requests < MIN_REQUESTS:
            time.sleep(0.5)
    traffic = loop.summary()
    report(
        "rollback_to_warm", {"version": version, "seconds": seconds, "failed": traffic["failed"], "traffic": traffic}
    )
    assert version == "1" and served_version(stack) == "1"
    assert traffic["failed"] == 0 and traffic["by_version"].get("1", 0) > 0, traffic
    assert state_of(stack).get("previous") is None


def refused_rollout(stack, workspace, photo, name: str, package, during=None, stage: str = "") -> dict:
    """Register `package` as champion; its rollout must be rolled back with no failed request."""
    stable = state_of(stack)["version"]
    figures = roll(stack, photo, lambda: register(package, workspace).version, during)
    report(name, figures)
    version = figures["version"]
    assert figures["outcome"] == "rolled back", figures
    assert figures["failed"] == 0, figures["traffic"]
    failed_stage = figures["stages"][-1]
    assert failed_stage[1] == "failed" and failed_stage[0].startswith(stage), figures["stages"]
    assert champion(workspace) == stable and served_version(stack) == stable
    assert refused_tag(workspace, version) == failed_stage[3]
    time.sleep(8)  # rounds of the watcher: a refused version is never released again by itself
    assert state_of(stack)["version"] == stable and (state_of(stack).get("rollout") is None)
    assert (state_of(stack)["last_rollout"] or {}).get("version") == version
    return figures


def test_a_candidate_failing_every_caption_is_stopped_at_smoke(stack, workspace, packages, photo):
    drill(workspace, "--fail-captions")
    figures = refused_rollout(stack, workspace, photo, "fails_every_caption", packages[1], stage="smoke")
    assert figures["answered_by_candidate"] == 0
    assert "answers were errors" in figures["stages"][-1][3]


def test_a_nonsense_model_is_stopped_before_it_answers_a_client(stack, workspace, photo, tmp_path_factory):
    from harness.trained import train_tiny_model

    untrained = train_tiny_model(tmp_path_factory.mktemp("untrained"), decoder="attention", epochs=1, lr=1e-9)
    figures = refused_rollout(stack, workspace, photo, "nonsense", untrained)
    assert figures["stages"][-1][0] in ("smoke", "shadow"), figures["stages"]
    assert figures["answered_by_candidate"] == 0


def test_a_much_slower_candidate_is_stopped_at_canary(stack, workspace, packages, photo):
    drill(workspace, "--delay-ms", "6000")  # p95 far above release.canary.max_p95_seconds (5 s)
    figures = refused_rollout(stack, workspace, photo, "slow", packages[1], stage="canary")
    assert "latency" in figures["stages"][-1][3]


def test_a_candidate_whose_container_dies_during_canary_is_rolled_back(stack, workspace, packages, photo):
    def kill(version: str) -> None:
        wait_for_stage(stack, version, "shadow")  # the shadow stage passed: the canary begins
        slot = state_of(stack)["rollout"]["candidate"]["model"][0]
        podman("pod", "kill", f"{STACK_NAME}-model-s{slot}", check=False)

    figures = refused_rollout(stack, workspace, photo, "killed_in_canary", packages[1], kill, stage="canary")
    assert "the candidate's model server" in figures["stages"][-1][3], figures["stages"]


def test_prometheus_lost_during_an_analysis_pauses_then_rolls_back(stack, workspace, packages, photo):
    from captioning.release import prometheus

    folder = Path(stack["CAPTIONING_STACK_DIR"]) / "prometheus"

    def stop_prometheus(version: str) -> None:
        wait_for_stage(stack, version, "smoke")
        prometheus.stop(folder)

    figures = refused_rollout(stack, workspace, photo, "prometheus_lost", packages[1], stop_prometheus)
    assert "Prometheus unreachable" in figures["stages"][-1][3]
    assert figures["answered_by_candidate"] == 0  # nothing promoted: no client ever reached it
