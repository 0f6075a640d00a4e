"""`make up`, then promotions and a rollback reach the containers by themselves, one replica at a
time, while clients keep sending requests: none of them fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from captioning.config import PROJECT_ROOT
from captioning.release.container_image import image_exists, podman
from captioning.release.traffic import RequestLoop
from harness.serving import free_port
from tests.container.conftest import IMAGE_REPO, STACK_NAME, register, run_cli

ROLLOUT_SECONDS = 900  # the bound: serving the new version within 15 minutes
MIN_REQUESTS = 500


def free_block(size: int = 10) -> int:
    """A port P with P..P+size-1 all free on 127.0.0.1, below the kernel's ephemeral range: the
    traffic of a rollout opens many client connections, whose source ports come from that range
    and could take a port of the stack before its new containers bind it."""
    import random

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    for _ in range(200):
        port = random.randrange(10000, low - size)
        if all(_free(port + n) for n in range(size)):
            return port
    raise RuntimeError("no block of free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


def url(stack) -> str:
    return f"http://127.0.0.1:{stack['PORT']}"


def served_version(stack) -> str | None:
    try:
        return requests.get(url(stack) + "/model", timeout=30).json().get("registry_version")
    except (requests.RequestException, ValueError):
        return None


def wait_for_version(stack, version: str) -> float:
    started = time.monotonic()
    state_file = Path(stack["CAPTIONING_STACK_DIR"]) / "state.json"
    while time.monotonic() - started < ROLLOUT_SECONDS:
        state = json.loads(state_file.read_text())
        rolled = state.get("version") == version and len(state["slots"]["model"]) == 2
        if rolled and served_version(stack) == version:
            return time.monotonic() - started
        time.sleep(1)
    watch_log = Path(stack["CAPTIONING_STACK_DIR"]) / "watch.log"
    pytest.fail(
        f"version {version} not served within {ROLLOUT_SECONDS} s; watcher log:\n{watch_log.read_text()[-3000:]}"
    )


def roll(stack, photo, change) -> dict:
    """Run `change` while 4 clients send requests; wait for the version it makes champion."""
    with RequestLoop(url(stack), photo, clients=4) as loop:
        version = change()
        seconds = wait_for_version(stack, version)
        while loop.requests < MIN_REQUESTS:
            time.sleep(0.5)
    return {**loop.summary(), "version": version, "promotion_to_serving_seconds": round(seconds, 1)}


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


def test_promotion_and_rollback_roll_out_with_no_failed_request(stack, workspace, packages, photo):
    promoted = roll(stack, photo, lambda: register(packages[1], workspace).version)
    assert promoted["version"] == "2" and promoted["failed"] == 0, promoted
    assert promoted["requests"] >= MIN_REQUESTS and promoted["by_version"].get("2", 0) > 0

    refused = register(packages[1], workspace, gates={"min": {"CIDEr": 1000.0}})
    assert not refused.promoted
    time.sleep(25)  # two rounds of the watcher: a refused gate releases nothing
    assert served_version(stack) == "2" and not image_exists(f"{IMAGE_REPO}:v{refused.version}")

    def rollback() -> str:
        result = run_cli("registry", "rollback", "--json", env=workspace)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["champion"]

    rolled_back = roll(stack, photo, rollback)
    assert rolled_back["version"] == "1" and rolled_back["failed"] == 0, rolled_back
    assert rolled_back["by_version"].get("1", 0) > 0
    report = PROJECT_ROOT / "reports" / "container_rollout.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"promotion": promoted, "rollback": rolled_back}, indent=2))
