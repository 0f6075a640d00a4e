"""The stack's pods: each replica is a Pod made from its role's Deployment in deploy/base and
played by `podman kube play` on the host's network, listening on 127.0.0.1 at its slot's port.

A pod file holds the stack's internal token (and the API key when one is set), so it is written
readable by its owner only. Each replica is started with its model version and a nonce of its own
(CAPTIONING_REPLICA_VERSION, CAPTIONING_REPLICA_NONCE), which it reports on /readyz: the stack
believes a slot only when the replica there answers with both.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
from pathlib import Path

import yaml

from captioning.config import PROJECT_ROOT
from captioning.release.container_image import podman

DEPLOY = PROJECT_ROOT / "deploy" / "base"


def pod_name(role: str, slot: int) -> str:
    """captioning-ROLE-sSLOT ($CAPTIONING_STACK_NAME replaces the prefix: tests use their own)."""
    return f"{os.environ.get('CAPTIONING_STACK_NAME', 'captioning')}-{role}-s{slot}"


def manifest(role: str, slot: int, image: str, ports: dict, folder: Path, env: dict[str, str]) -> dict:
    """A Pod of the role's Deployment template at its slot's port; `env` adds or replaces
    variables (the replica's identity, the API's model and shadow addresses)."""
    deployment = yaml.safe_load((DEPLOY / f"{role}-deployment.yaml").read_text(encoding="utf-8"))
    config = yaml.safe_load((DEPLOY / "configmap.yaml").read_text(encoding="utf-8"))["data"]
    spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
    spec["hostNetwork"] = True
    (container,) = spec["containers"]
    container["image"] = image
    container.pop("ports", None)  # the host's network: the slot's port is in the arguments
    model_url = env.pop("model_url", f"http://127.0.0.1:{ports['model']}")
    container["args"] = _args(container["args"], ports["slots"][role][slot], model_url)
    variables = {k: str(v) for k, v in config.items()}
    variables.update(
        {e["name"]: e["value"] for e in map(lambda e: _local_env(e, folder), container.get("env", [])) if e}
    )
    if not api_key():  # on 127.0.0.1 only: open unless a key is given
        variables["CAPTIONING_ALLOW_NO_KEY"] = "1"
    variables.update(env)
    container["env"] = [{"name": k, "value": v} for k, v in variables.items()]
    container.pop("envFrom", None)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container.pop(probe, None)  # haproxy checks readiness; podman's checks need systemd
    spec["volumes"] = [_local_volume(volume, folder, pod_name(role, slot)) for volume in spec.get("volumes", [])]
    labels = {**deployment["spec"]["template"]["metadata"]["labels"], "captioning/stack": "local"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(role, slot), "labels": labels},
        "spec": spec,
    }


def _args(args: list[str], port: int, model_url: str) -> list[str]:
    """The Deployment's arguments with the slot's port, 127.0.0.1, and the model servers' address."""
    values = {"--port": str(port), "--host": "127.0.0.1", "--model-url": model_url}
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


def _local_env(entry: dict, folder: Path) -> dict | None:
    """A Deployment's env entry on this machine: the stack's own internal token and, when set in
    the environment, the API key; other secrets are left out."""
    if "value" in entry:
        return entry
    known = {
        "CAPTIONING_INTERNAL_TOKEN": internal_token(folder),
        "CAPTIONING_API_KEY": api_key(),
    }
    value = known.get(entry["name"])
    return {"name": entry["name"], "value": value} if value else None


def api_key() -> str:
    """The API key `make up` was given ($CAPTIONING_API_KEY), without the newline a file may end with."""
    return os.environ.get("CAPTIONING_API_KEY", "").strip()


def private_file(path: Path, text: str) -> None:
    """Write `text` readable and writable by the owner only, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def internal_token(folder: Path) -> str:
    """The token the stack's model servers require of the API (made once per stack, kept private)."""
    path = folder / "internal-token"
    if not path.is_file():
        private_file(path, secrets.token_hex(32))
    return path.read_text().strip()


def _local_volume(volume: dict, folder: Path, pod: str) -> dict:
    """The feedback volume (the pod's own data folder in the cluster, where feedback goes to
    PostgreSQL) and any claim become folders of the stack, where the one local API replica keeps
    its SQLite store; an emptyDir a fresh folder of this pod's own (podman would make it one named
    volume shared by every pod: their /tmp, and with it BentoML's metrics files, would be one);
    other volumes stay as they are."""
    if "persistentVolumeClaim" in volume or volume.get("name") == "feedback":
        place = folder / volume["name"]
        place.mkdir(parents=True, exist_ok=True)
    elif "emptyDir" in volume:
        place = folder / "pods" / pod / volume["name"]
        shutil.rmtree(place, ignore_errors=True)
        place.mkdir(parents=True, mode=0o700)
    else:
        return volume
    os.chown(place, 1034, 1034)  # the images' non-root user
    return {"name": volume["name"], "hostPath": {"path": str(place), "type": "Directory"}}


def start(role: str, slot: int, image: str, ports: dict, folder: Path, env: dict[str, str]) -> None:
    path = folder / "pods" / f"{pod_name(role, slot)}.yaml"
    private_file(path, yaml.safe_dump(manifest(role, slot, image, ports, folder, dict(env)), sort_keys=False))
    podman("pod", "rm", "--force", pod_name(role, slot), check=False)
    podman("kube", "play", str(path), timeout=300)


def stop(role: str, slot: int) -> None:
    podman("pod", "rm", "--force", "--time", "30", pod_name(role, slot), check=False, timeout=120)


def state(role: str, slot: int) -> str:
    return podman("pod", "inspect", "--format", "{{.State}}", pod_name(role, slot), check=False).stdout


def log(role: str, slot: int, lines: int = 30) -> str:
    result = podman("logs", "--tail", str(lines), f"{pod_name(role, slot)}-{role}", check=False)
    return (result.stdout + result.stderr).strip()
