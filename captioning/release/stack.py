"""The service as separate containers on this machine, and rolling updates of it.

    up(image, port)   the API and 2 model servers, each a pod played by `podman kube play` from
                      the Deployments in deploy/base, behind haproxy on 127.0.0.1:port
    rollout(image)    replace them one at a time: a new pod starts in a free slot, haproxy sees it
                      ready, the old one is drained (no new requests, the running ones finish)
                      and only then stopped; requests sent all along see no failure
    down()            stop everything

Ports from `port` (P): P the API (through haproxy), P+1 the model servers (through haproxy),
P+2..P+3 the API slots, P+4..P+7 the model slots, P+8 haproxy's admin socket, P+9 Prometheus.
Each pod uses the host's network and listens on 127.0.0.1 only. Prometheus scrapes every slot
that runs a pod, labelled with its role, slot and model version (captioning/release/prometheus.py):
the rollout's analysis reads the replicas' figures there. The state lives in `stack_dir()`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import yaml

from captioning.config import PROJECT_ROOT, artifacts_dir
from captioning.release import prometheus
from captioning.release.container_image import ContainerError, podman

DEPLOY = PROJECT_ROOT / "deploy" / "base"
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
        "admin": port + 8,
        "prometheus": port + 9,
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


def haproxy_config(port: int) -> str:
    """Two frontends (API, model servers), each over its slots; health checks on /readyz."""
    p = ports(port)
    lines = [
        "global",
        "    maxconn 2048",
        f"    stats socket ipv4@127.0.0.1:{p['admin']} level admin",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 150s",
        "    timeout server 150s",
        "    timeout queue 150s",
        "    retries 3",
        "    option redispatch",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        "    option forwardfor",
        "    default-server inter 1s fall 2 rise 2",
        "",
        f"frontend api\n    bind 127.0.0.1:{p['api']}\n    default_backend api\n",
        f"frontend model\n    bind 127.0.0.1:{p['model']}\n    default_backend model\n",
    ]
    for role, slots in p["slots"].items():
        lines += [f"backend {role}", "    balance leastconn"]
        lines += [f"    server s{n} 127.0.0.1:{slot} check disabled" for n, slot in enumerate(slots)]
        lines.append("")
    return "\n".join(lines) + "\n"


def start_haproxy(port: int) -> None:
    folder = stack_dir()
    (folder / "haproxy.cfg").write_text(haproxy_config(port), encoding="utf-8")
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    command = [binary, "-f", str(folder / "haproxy.cfg"), "-D", "-p", str(folder / "haproxy.pid")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise StackError(f"haproxy did not start: {result.stderr.strip()[-800:]}")


def haproxy(port: int, command: str) -> str:
    """One command on haproxy's admin socket."""
    with socket.create_connection(("127.0.0.1", ports(port)["admin"]), timeout=10) as connection:
        connection.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_stats(port: int) -> dict[tuple[str, str], dict[str, str]]:
    """(backend, server) -> haproxy's statistics of it (status, scur, qcur, ...)."""
    lines = haproxy(port, "show stat").strip().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    return {(row["pxname"], row["svname"]): row for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")}


def stop_haproxy() -> None:
    pid_file = stack_dir() / "haproxy.pid"
    if pid_file.is_file():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        pid_file.unlink()


# --------------------------------------------------------------------------- pods


def pod_name(role: str, slot: int) -> str:
    """captioning-ROLE-sSLOT ($CAPTIONING_STACK_NAME replaces the prefix: tests use their own)."""
    return f"{os.environ.get('CAPTIONING_STACK_NAME', 'captioning')}-{role}-s{slot}"


def pod_manifest(role: str, slot: int, image: str, port: int) -> dict:
    """A Pod of the role's Deployment template in deploy/base, on the host network at its slot's port."""
    deployment = yaml.safe_load((DEPLOY / f"{role}-deployment.yaml").read_text(encoding="utf-8"))
    config = yaml.safe_load((DEPLOY / "configmap.yaml").read_text(encoding="utf-8"))["data"]
    spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
    spec["hostNetwork"] = True
    (container,) = spec["containers"]
    container["image"] = image
    container.pop("ports", None)  # the host's network: the slot's port is in the arguments
    container["args"] = _args(container["args"], ports(port), slot, role)
    env = [{"name": k, "value": str(v)} for k, v in config.items()]
    container["env"] = env + [_local_env(e) for e in container.get("env", []) if _local_env(e)]
    if not os.environ.get("CAPTIONING_API_KEY"):  # on 127.0.0.1 only: open unless a key is given
        container["env"].append({"name": "CAPTIONING_ALLOW_NO_KEY", "value": "1"})
    container.pop("envFrom", None)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container.pop(probe, None)  # haproxy checks readiness; podman's checks need systemd
    spec["volumes"] = [_local_volume(volume) for volume in spec.get("volumes", [])]
    labels = {**deployment["spec"]["template"]["metadata"]["labels"], "captioning/stack": "local"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(role, slot), "labels": labels},
        "spec": spec,
    }


def _args(args: list[str], p: dict, slot: int, role: str) -> list[str]:
    """The Deployment's arguments with this slot's port, 127.0.0.1, and the model servers' address."""
    values = {
        "--port": str(p["slots"][role][slot]),
        "--host": "127.0.0.1",
        "--model-url": f"http://127.0.0.1:{p['model']}",
    }
    result, skip = [], False
    for n, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in values and n + 1 < len(args):
            result += [arg, values.pop(arg)]
            skip = True
        else:
            result.append(arg)
    if "--host" in values:
        result += ["--host", values.pop("--host")]
    return result


def _local_env(entry: dict) -> dict | None:
    """A Deployment's env entry on this machine: the stack's own internal token and, when set in
    the environment, the API key; other secrets are left out."""
    if "value" in entry:
        return entry
    secrets = {
        "CAPTIONING_INTERNAL_TOKEN": internal_token(),
        "CAPTIONING_API_KEY": os.environ.get("CAPTIONING_API_KEY", ""),
    }
    value = secrets.get(entry["name"])
    return {"name": entry["name"], "value": value} if value else None


def internal_token() -> str:
    """The token the stack's model servers require of the API (made once per stack, kept private)."""
    path = stack_dir() / "internal-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


def _local_volume(volume: dict) -> dict:
    """The feedback claim becomes a folder of the stack; other volumes stay as they are."""
    if "persistentVolumeClaim" not in volume:
        return volume
    folder = stack_dir() / volume["name"]
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, 1034, 1034)  # the images' non-root user
    return {"name": volume["name"], "hostPath": {"path": str(folder), "type": "Directory"}}


def start_pod(role: str, slot: int, image: str, port: int) -> None:
    path = stack_dir() / "pods" / f"{pod_name(role, slot)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(pod_manifest(role, slot, image, port), sort_keys=False), encoding="utf-8")
    podman("pod", "rm", "--force", pod_name(role, slot), check=False)
    podman("kube", "play", str(path), timeout=300)


def stop_pod(role: str, slot: int) -> None:
    podman("pod", "rm", "--force", "--time", "30", pod_name(role, slot), check=False, timeout=120)


def pod_log(role: str, slot: int, lines: int = 30) -> str:
    name = pod_name(role, slot)
    result = podman("logs", "--tail", str(lines), f"{name}-{role}", check=False)
    return (result.stdout + result.stderr).strip()


# --------------------------------------------------------------------------- replicas


def wait_ready(port: int, role: str, slot: int, seconds: float = READY_SECONDS) -> None:
    """Until haproxy's health checks see the slot's server UP; StackError with its log otherwise."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server_stats(port)[(role, f"s{slot}")]["status"] == "UP":
            return
        state = podman("pod", "inspect", "--format", "{{.State}}", pod_name(role, slot), check=False).stdout
        if "Exited" in state or "Error" in state:
            break
        time.sleep(1)
    raise StackError(f"{pod_name(role, slot)} did not become ready; its log ends with:\n{pod_log(role, slot)}")


def drain(port: int, role: str, slot: int, seconds: float = DRAIN_SECONDS) -> None:
    """No new requests to the slot; wait until those it has finished (then it is put in maintenance)."""
    server = f"{role}/s{slot}"
    haproxy(port, f"set server {server} state drain")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        row = server_stats(port)[(role, f"s{slot}")]
        if int(row["scur"] or 0) == 0 and int(row["qcur"] or 0) == 0:
            break
        time.sleep(0.2)
    haproxy(port, f"set server {server} state maint")


def prometheus_dir() -> Path:
    return stack_dir() / "prometheus"


def prometheus_url(port: int) -> str:
    return f"http://127.0.0.1:{ports(port)['prometheus']}"


def start_prometheus(port: int, scrape_seconds: float) -> None:
    try:
        prometheus.start(prometheus_dir(), ports(port)["prometheus"], scrape_seconds)
    except prometheus.PrometheusStartError as error:
        raise StackError(str(error)) from None


def add_replica(port: int, role: str, image: str, taken: set[int], version: str = "") -> int:
    """Start `image` in a free slot of the role and wait until haproxy sends it requests.
    Prometheus scrapes the slot from the pod's start, labelled with `version`."""
    free = [slot for slot in range(ROLES[role]) if slot not in taken]
    if not free:
        raise StackError(f"no free {role} slot: every one of {ROLES[role]} is in use")
    slot = free[0]
    start_pod(role, slot, image, port)
    prometheus.set_target(prometheus_dir(), role, slot, f"127.0.0.1:{ports(port)['slots'][role][slot]}", version)
    haproxy(port, f"set server {role}/s{slot} state ready")
    try:
        wait_ready(port, role, slot)
    except StackError:
        haproxy(port, f"set server {role}/s{slot} state maint")
        stop_pod(role, slot)
        prometheus.drop_target(prometheus_dir(), role, slot)
        raise
    return slot


def remove_replica(port: int, role: str, slot: int) -> None:
    drain(port, role, slot)
    stop_pod(role, slot)
    prometheus.drop_target(prometheus_dir(), role, slot)


# --------------------------------------------------------------------------- the stack


def up(image: str, port: int = 3000, replicas: int = 2, version: str = "", scrape_seconds: float = 1.0) -> dict:
    """Start the stack with `image` (or roll it out to a stack already running); Prometheus
    scrapes its replicas every `scrape_seconds` (`release.scrape_seconds`)."""
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
            remove_replica(port, role, old)
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
            stop_pod(role, slot)
    stop_haproxy()
    prometheus.stop(prometheus_dir())
    prometheus.write_targets(prometheus_dir(), [])
    with contextlib.suppress(FileNotFoundError):
        (stack_dir() / "state.json").unlink()


def running(state: dict) -> bool:
    try:
        server_stats(state["port"])
    except OSError:
        return False
    return True


def status() -> dict:
    """The state, with haproxy's view of each replica, the version the API reports, each slot's
    version and the stack's Prometheus (its URL; its pid, None when it is not running)."""
    state = read_state()
    if state is None or not running(state):
        return {"running": False}
    stats = server_stats(state["port"])
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
