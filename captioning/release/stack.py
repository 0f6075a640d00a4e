"""The service as separate containers on this machine, and rolling updates of it.

    up(image, port)   the API and 2 model servers, each a pod played by `podman kube play` from
                      the Deployments in deploy/base (captioning/release/pods.py), behind haproxy
                      on 127.0.0.1:port (captioning/release/haproxy.py)
    rollout(image)    replace them one at a time: a new pod starts in a free slot, haproxy sees it
                      ready, the old one is drained (no new requests, the running ones finish)
                      and only then stopped; requests sent all along see no failure
    down()            stop everything

A release flow rolls a new champion out progressively instead (captioning/release/rollout.py):
smoke, shadow, canary and promote stages built from the replicas below.

Ports from `port` (P): P the API (through haproxy), P+1 the model servers (through haproxy),
P+2..P+3 the API slots, P+4..P+7 the model slots, P+8 the shadow frontend (a rollout candidate's
model server during the shadow stage), P+9 Prometheus, P+10 the release watcher's metrics
(`python -m flows.release --watch`, captioning/release/watcher_metrics.py), which Prometheus
scrapes as `component="release"` whether the watcher runs yet or not. haproxy's admin socket is a
unix socket in the stack's folder.
Each pod uses the host's network and listens on 127.0.0.1 only. Prometheus scrapes every slot
that runs a pod, labelled with its role, slot and model version (captioning/release/prometheus.py):
the rollout's analysis reads the replicas' figures there. The state lives in `stack_dir()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from captioning.config import artifacts_dir
from captioning.release import haproxy, pods, prometheus
from captioning.release.container_image import ContainerError

DEFAULT_PORT = 3000  # `captioning stack up` and `make up` without --port / PORT
ROLES = {"api": 2, "model": 4}  # slots per role: the running replicas plus room for their successors
READY_SECONDS = 300
DRAIN_SECONDS = 180


class StackError(RuntimeError):
    """The stack could not be started, changed or stopped; the message says what to do."""


def stack_dir() -> Path:
    return Path(os.environ.get("CAPTIONING_STACK_DIR", artifacts_dir() / "stack")).resolve()


def ports(port: int) -> dict:
    return {
        "api": port,
        "model": port + 1,
        "shadow": port + 8,
        "prometheus": port + 9,
        "watcher": port + 10,
        "slots": {"api": [port + 2, port + 3], "model": [port + 4, port + 5, port + 6, port + 7]},
    }


# --------------------------------------------------------------------------- state


def read_state() -> dict | None:
    path = stack_dir() / "state.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_state(state: dict) -> None:
    path = stack_dir() / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One change of the stack at a time (an up, a rollout, a down)."""
    stack_dir().mkdir(parents=True, exist_ok=True)
    with open(stack_dir() / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- haproxy


def balancer(command: str) -> str:
    """One command on haproxy's admin socket."""
    return haproxy.command(stack_dir(), command)


def server_stats() -> dict[tuple[str, str], dict[str, str]]:
    return haproxy.server_stats(stack_dir())


def start_haproxy(port: int) -> None:
    try:
        haproxy.start(ports(port), stack_dir())
    except haproxy.HaproxyError as error:
        raise StackError(str(error)) from None


# --------------------------------------------------------------------------- replicas


def wait_ready(role: str, slot: int, seconds: float = READY_SECONDS) -> None:
    """Until haproxy's health checks see the slot's server UP; StackError with its log otherwise."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server_stats()[(role, f"s{slot}")]["status"] == "UP":
            return
        state = pods.state(role, slot)
        if "Exited" in state or "Error" in state:
            break
        time.sleep(1)
    raise StackError(f"{pods.pod_name(role, slot)} did not become ready; its log ends with:\n{pods.log(role, slot)}")


def drain(role: str, slot: int, seconds: float = DRAIN_SECONDS, backend: str | None = None) -> None:
    """No new requests to the slot; wait until those it has finished (then it is put in maintenance)."""
    backend = backend or role
    haproxy.set_state(stack_dir(), backend, slot, "drain")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        row = server_stats()[(backend, f"s{slot}")]
        if int(row["scur"] or 0) == 0 and int(row["qcur"] or 0) == 0:
            break
        time.sleep(0.2)
    haproxy.set_state(stack_dir(), backend, slot, "maint")


def watcher_port(port: int | None = None) -> int:
    """Where the release watcher serves its metrics: PORT+10 of the stack on `port`, else of the
    stack that runs (its state file), else of the default port."""
    if port is None:
        port = (read_state() or {}).get("port") or DEFAULT_PORT
    return ports(port)["watcher"]


def prometheus_dir() -> Path:
    return stack_dir() / "prometheus"


def prometheus_url(port: int) -> str:
    return f"http://127.0.0.1:{ports(port)['prometheus']}"


def start_prometheus(port: int, scrape_seconds: float) -> None:
    try:
        watcher = f"127.0.0.1:{ports(port)['watcher']}"
        prometheus.start(prometheus_dir(), ports(port)["prometheus"], scrape_seconds, watcher=watcher)
    except prometheus.PrometheusStartError as error:
        raise StackError(str(error)) from None


def free_slot(role: str, taken: set[int]) -> int:
    free = [slot for slot in range(ROLES[role]) if slot not in taken]
    if not free:
        raise StackError(f"no free {role} slot: every one of {ROLES[role]} is in use")
    return free[0]


def replica_env(port: int, role: str, version: str) -> dict[str, str]:
    """What a replica is started with: its identity, and for the API where shadow copies go."""
    env = {"CAPTIONING_REPLICA_VERSION": version, "CAPTIONING_REPLICA_NONCE": secrets.token_hex(8)}
    state = read_state() or {}
    if role == "api" and state.get("shadow_share"):
        env.update(
            CAPTIONING_SHADOW_URL=f"http://127.0.0.1:{ports(port)['shadow']}",
            CAPTIONING_SHADOW_SHARE=str(state["shadow_share"]),
        )
    return env


def add_replica(
    port: int,
    role: str,
    image: str,
    taken: set[int],
    version: str = "",
    weight: int = haproxy.FULL_WEIGHT,
    extra_env: dict[str, str] | None = None,
) -> int:
    """Start `image` in a free slot of the role and wait until haproxy sees it ready; with
    `weight` 0 it then gets no requests until its weight is raised (a rollout's candidate).
    Prometheus scrapes the slot from the pod's start, labelled with `version`."""
    slot = free_slot(role, taken)
    env = {**replica_env(port, role, version), **(extra_env or {})}
    pods.start(role, slot, image, ports(port), stack_dir(), env)
    prometheus.set_target(prometheus_dir(), role, slot, f"127.0.0.1:{ports(port)['slots'][role][slot]}", version)
    haproxy.set_weight(stack_dir(), role, slot, weight)
    haproxy.set_state(stack_dir(), role, slot, "ready")
    try:
        wait_ready(role, slot)
        check_identity(port, role, slot, env)
    except StackError:
        haproxy.set_state(stack_dir(), role, slot, "maint")
        pods.stop(role, slot)
        prometheus.drop_target(prometheus_dir(), role, slot)
        raise
    return slot


def client_headers() -> dict[str, str]:
    """What a client of the stack's API sends besides its request: the API key when one is set."""
    key = pods.api_key()
    return {"X-API-Key": key} if key else {}


def check_identity(port: int, role: str, slot: int, env: dict[str, str]) -> None:
    """The process answering on the slot must be the replica just started: it reports the
    version and nonce it was started with (a process squatting on the port does not)."""
    address = f"http://127.0.0.1:{ports(port)['slots'][role][slot]}"
    headers = {"Content-Type": "application/json", "X-Captioning-Internal-Token": pods.internal_token(stack_dir())}
    if pods.api_key():
        headers["X-API-Key"] = pods.api_key()
    request = urllib.request.Request(address + "/replica", data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            replica = json.loads(answer.read())
    except (OSError, ValueError) as error:
        raise StackError(f"{address} did not say which replica it is ({error}): not the one started there") from None
    expected = {"version": env["CAPTIONING_REPLICA_VERSION"], "nonce": env["CAPTIONING_REPLICA_NONCE"]}
    if {key: replica.get(key) for key in expected} != expected:
        raise StackError(f"{address} answers as {replica}, not as the replica started there ({expected['version']})")


def remove_replica(role: str, slot: int) -> None:
    drain(role, slot)
    pods.stop(role, slot)
    prometheus.drop_target(prometheus_dir(), role, slot)


# --------------------------------------------------------------------------- the stack


def up(
    image: str,
    port: int = 3000,
    replicas: int = 2,
    version: str = "",
    scrape_seconds: float = 1.0,
    shadow_share: float = 0.0,
) -> dict:
    """Start the stack with `image` (or roll it out to a stack already running); Prometheus
    scrapes its replicas every `scrape_seconds` (`release.scrape_seconds`); the API copies
    `shadow_share` percent of its requests to a rollout's candidate during its shadow stage."""
    with locked():
        state = read_state()
        if state is not None and running(state):
            if state["image"] != image:
                return _rollout(state, image, version)
            return state
        _down(None)  # pods and haproxy of a stack that was not stopped (a reboot, a killed `make up`)
        stack_dir().mkdir(parents=True, exist_ok=True)
        start_haproxy(port)
        state = {
            "port": port,
            "image": image,
            "version": version,
            "replicas": replicas,
            "slots": {"api": [], "model": []},
            "shadow_share": shadow_share,
            "started_at": time.time(),
        }
        write_state(state)
        try:
            start_prometheus(port, scrape_seconds)
            for role, count in (("model", replicas), ("api", 1)):
                for _ in range(count):
                    slot = add_replica(port, role, image, set(state["slots"][role]), version)
                    state["slots"][role].append(slot)
                    write_state(state)
        except Exception:
            _down(state)
            raise
        return state


def rollout(image: str, version: str = "") -> dict:
    """Replace every replica of the running stack by one of `image`, one at a time."""
    with locked():
        state = read_state()
        if state is None or not running(state):
            raise StackError("no stack is running: start one with `make up`")
        return _rollout(state, image, version)


def _rollout(state: dict, image: str, version: str) -> dict:
    port = state["port"]
    started = time.monotonic()
    for role in ("model", "api"):
        for old in list(state["slots"][role]):
            new = add_replica(port, role, image, set(state["slots"][role]), version)
            state["slots"][role].append(new)
            write_state(state)
            remove_replica(role, old)
            state["slots"][role].remove(old)
            write_state(state)
    state.update(
        image=image, version=version, rolled_out_at=time.time(), rollout_seconds=round(time.monotonic() - started, 1)
    )
    write_state(state)
    return state


def down() -> None:
    with locked():
        _down(read_state())


def _down(state: dict | None) -> None:
    for role in ROLES:
        for slot in range(ROLES[role]):
            pods.stop(role, slot)
    haproxy.stop(stack_dir())
    prometheus.stop(prometheus_dir())
    prometheus.write_targets(prometheus_dir(), [])
    with contextlib.suppress(FileNotFoundError):
        (stack_dir() / "state.json").unlink()


def running(state: dict) -> bool:
    try:
        server_stats()
    except OSError:
        return False
    return True


def status() -> dict:
    """The state, with haproxy's view of each replica, the version the API reports, each slot's
    version and the stack's Prometheus (its URL; its pid, None when it is not running)."""
    state = read_state()
    if state is None or not running(state):
        return {"running": False}
    stats = server_stats()
    replicas = {
        role: {f"s{slot}": stats[(role, f"s{slot}")]["status"] for slot in state["slots"][role]} for role in ROLES
    }
    versions: dict[str, dict[str, str]] = {role: {} for role in ROLES}  # what each slot serves, as Prometheus labels it
    for target in prometheus.read_targets(prometheus_dir()):
        labels = target["labels"]
        versions[labels["role"]][f"s{labels['slot']}"] = labels["version"]
    return {
        "running": True,
        **state,
        "replicas": replicas,
        "versions": versions,
        "served": served_version(state["port"]),
        "prometheus": {"url": prometheus_url(state["port"]), "pid": prometheus.pid(prometheus_dir())},
    }


def served_version(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=10) as answer:
            return json.loads(answer.read()).get("registry_version")
    except (OSError, ValueError):
        return None


__all__ = ["ContainerError", "StackError", "down", "rollout", "status", "up"]
