"""The local stack's haproxy configuration, traffic shares, pod files and replica identities."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from captioning.release import haproxy, pods, stack
from captioning.release import prometheus as stack_prometheus


def test_the_admin_socket_is_a_private_unix_socket_and_the_shadow_frontend_starts_empty(tmp_path):
    config = haproxy.config(stack.ports(3000), tmp_path)
    assert f"stats socket {tmp_path / haproxy.SOCKET} mode 600 level admin" in config
    assert "ipv4@" not in config and ":3008 level" not in config  # no admin socket on TCP
    assert "frontend shadow\n    bind 127.0.0.1:3008" in config
    shadow = config.split("\nbackend shadow\n")[1]
    assert all(line.endswith("check disabled") for line in shadow.strip().splitlines()[1:])
    assert "127.0.0.1:3004" in shadow and "127.0.0.1:3007" in shadow  # the model slots


@pytest.mark.parametrize(
    "percent, stable_slots, candidate_slots, expected",
    [
        (10, 2, 1, (20, 90)),
        (50, 2, 1, (100, 50)),
        (50, 2, 2, (50, 50)),
        (100, 2, 2, (100, 1)),
        (10, 1, 1, (20, 180)),
        (25, 2, 1, (50, 75)),
        (50, 3, 3, (33, 33)),
    ],
)
def test_weights_give_the_candidate_its_share(percent, stable_slots, candidate_slots, expected):
    candidate, stable = haproxy.shares(percent, stable_slots, candidate_slots)
    assert (candidate, stable) == expected
    if percent < 100:
        total = candidate_slots * candidate
        assert total / (total + stable_slots * stable) == pytest.approx(percent / 100, abs=0.01)


def test_a_stale_haproxy_pid_file_names_no_process_to_stop(tmp_path):
    (tmp_path / "haproxy.pid").write_text(str(os.getpid()))  # alive, but not haproxy
    assert haproxy.pid(tmp_path) is None
    haproxy.stop(tmp_path)  # stops nothing, forgets the file
    assert not (tmp_path / "haproxy.pid").exists()


def test_pod_files_and_the_internal_token_are_readable_by_their_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        token = pods.internal_token(tmp_path)
        path = tmp_path / "pods" / "one.yaml"
        pods.private_file(path, "secret: x\n")
        path.chmod(0o644)
        pods.private_file(path, "secret: y\n")  # rewriting a file that was readable makes it private again
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "internal-token").stat().st_mode) == 0o600 and len(token) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "secret: y\n"


def test_a_replica_is_started_with_its_identity_and_the_token(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPTIONING_API_KEY", raising=False)
    env = {"CAPTIONING_REPLICA_VERSION": "7", "CAPTIONING_REPLICA_NONCE": "abc", "model_url": "http://127.0.0.1:9"}
    manifest = pods.manifest("api", 1, "localhost/captioning:v7", stack.ports(3000), tmp_path, env)
    (container,) = manifest["spec"]["containers"]
    variables = {entry["name"]: entry["value"] for entry in container["env"]}
    assert variables["CAPTIONING_REPLICA_VERSION"] == "7" and variables["CAPTIONING_REPLICA_NONCE"] == "abc"
    assert variables["CAPTIONING_INTERNAL_TOKEN"] == pods.internal_token(tmp_path)
    assert "model_url" not in variables
    args = container["args"]
    assert args[args.index("--port") + 1] == "3003" and args[args.index("--model-url") + 1] == "http://127.0.0.1:9"
    assert yaml.safe_load(yaml.safe_dump(manifest))["metadata"]["name"].endswith("-api-s1")


def test_each_pod_gets_a_tmp_of_its_own(tmp_path):
    """podman turns an emptyDir into one named volume shared by every pod; the stack gives each pod
    a folder instead, so replicas never share /tmp (nor the metrics files BentoML keeps there)."""
    volumes = []
    for role, slot in (("model", 0), ("model", 1), ("api", 0)):
        manifest = pods.manifest(role, slot, "localhost/captioning:v1", stack.ports(3000), tmp_path, {})
        (tmp,) = [v for v in manifest["spec"]["volumes"] if v["name"] == "tmp"]
        volumes.append(tmp["hostPath"]["path"])
    assert len(set(volumes)) == 3 and all(pods.pod_name("x", 0).split("-")[0] in path for path in volumes)
    assert all(stat.S_IMODE(os.stat(path).st_mode) == 0o700 for path in volumes)


def test_an_api_key_read_from_a_file_loses_its_newline_everywhere_the_stack_uses_it(tmp_path, monkeypatch):
    """A key taken from a file may end with a newline (one written with `echo`): the service strips
    it, so the pods, the stack's own requests and Prometheus' credentials must too, or every
    request answers 401."""
    monkeypatch.setenv("CAPTIONING_API_KEY", "k3y\n")
    manifest = pods.manifest("api", 0, "localhost/captioning:v1", stack.ports(3000), tmp_path, {})
    (container,) = manifest["spec"]["containers"]
    variables = {entry["name"]: entry["value"] for entry in container["env"]}
    assert variables["CAPTIONING_API_KEY"] == "k3y" and "CAPTIONING_ALLOW_NO_KEY" not in variables
    assert stack.client_headers() == {"X-API-Key": "k3y"}
    assert stack_prometheus._credentials(tmp_path).read_text() == "k3y"
    monkeypatch.setenv("CAPTIONING_API_KEY", "\n")  # an empty file: no key, the local stack runs open
    manifest = pods.manifest("api", 0, "localhost/captioning:v1", stack.ports(3000), tmp_path, {})
    variables = {entry["name"]: entry["value"] for entry in manifest["spec"]["containers"][0]["env"]}
    assert variables["CAPTIONING_ALLOW_NO_KEY"] == "1" and "CAPTIONING_API_KEY" not in variables
    assert stack.client_headers() == {} and stack_prometheus._credentials(tmp_path) is None
