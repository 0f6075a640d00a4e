"""The local stack's Prometheus: Debian's server scraping every replica slot that runs a pod.

    start(folder, port, scrape_seconds, watcher)   config in `folder`, server on 127.0.0.1:port, pid file
    set_target(folder, role, slot, address, version) / drop_target(folder, role, slot)
    stop(folder)

Prometheus finds the replicas in a file_sd JSON file (`targets.json`), rewritten whenever a pod
starts or stops; each target carries the labels the analysis selects on: `component` and `role`
(api or model), `slot`, and `version` (the model version the pod serves), so the replicas' own
metrics need no version label. Given the release watcher's address, a second job (`release`)
scrapes its metrics, labelled `component="release"`: the refused versions the alert
`CaptioningRolloutRefused` fires on. The alert rules of deploy/prometheus are loaded too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml

from captioning.config import PROJECT_ROOT
from captioning.release import pods

ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
TARGETS = "targets.json"
READY_SECONDS = 60


class PrometheusStartError(RuntimeError):
    """The stack's Prometheus did not start; the message has the end of its log."""


def config(scrape_seconds: float, credentials_file: Path | None = None, watcher: str | None = None) -> dict:
    """The server's configuration: the replicas through file_sd and, with `watcher` (host:port), the
    release watcher as a static target (a watcher not started yet is a target down, no error)."""
    interval = f"{max(1, round(scrape_seconds * 1000))}ms"
    job = {
        "job_name": "captioning",
        "file_sd_configs": [{"files": [TARGETS], "refresh_interval": "5s"}],  # inotify sees changes at once
    }
    if credentials_file is not None:  # the API's /metrics asks for the API key when one is set
        job["authorization"] = {"credentials_file": str(credentials_file)}
    jobs = [job]
    if watcher:
        release = {"targets": [watcher], "labels": {"component": "release"}}
        jobs.append({"job_name": "release", "static_configs": [release]})
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": ["alerts.yml"],
        "scrape_configs": jobs,
    }


def read_targets(folder: Path) -> list[dict]:
    path = folder / TARGETS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def write_targets(folder: Path, targets: list[dict]) -> None:
    """Replace the file in one step: Prometheus never reads half of it."""
    folder.mkdir(parents=True, exist_ok=True)
    ordered = sorted(targets, key=lambda t: (t["labels"]["role"], int(t["labels"]["slot"])))
    tmp = folder / f".{TARGETS}.tmp"
    tmp.write_text(json.dumps(ordered, indent=2), encoding="utf-8")
    os.replace(tmp, folder / TARGETS)


def set_target(folder: Path, role: str, slot: int, address: str, version: str) -> None:
    """Scrape `address` as the role's slot, labelled with the version it serves."""
    labels = {"component": role, "role": role, "slot": str(slot), "version": version or "unknown"}
    targets = [t for t in read_targets(folder) if not _is(t, role, slot)]
    write_targets(folder, targets + [{"targets": [address], "labels": labels}])


def drop_target(folder: Path, role: str, slot: int) -> None:
    write_targets(folder, [t for t in read_targets(folder) if not _is(t, role, slot)])


def _is(target: dict, role: str, slot: int) -> bool:
    return target["labels"]["role"] == role and target["labels"]["slot"] == str(slot)


def start(folder: Path, port: int, scrape_seconds: float = 1.0, watcher: str | None = None) -> str:
    """Start Prometheus on 127.0.0.1:port with its config and data in `folder`, scraping the release
    watcher at `watcher` (host:port) too when given; its URL once ready."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.path.exists(binary):
        raise PrometheusStartError("prometheus is missing: run `make system-deps`")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ALERTS, folder / "alerts.yml")
    if not (folder / TARGETS).is_file():
        write_targets(folder, [])
    credentials = _credentials(folder)
    settings = config(scrape_seconds, credentials, watcher)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    command = [
        binary,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        "--storage.tsdb.retention.time=2d",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(folder / "prometheus.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "prometheus.pid").write_text(str(process.pid), encoding="utf-8")
    url = f"http://127.0.0.1:{port}"
    _wait_ready(folder, process, url)
    return url


def _credentials(folder: Path) -> Path | None:
    key = pods.api_key()
    if not key:
        return None
    path = folder / "api-key"
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key)
    return path


def _wait_ready(folder: Path, process: subprocess.Popen, url: str) -> None:
    import urllib.request

    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.3)
    stop(folder)
    log = (folder / "prometheus.log").read_text(encoding="utf-8", errors="replace")[-800:]
    raise PrometheusStartError(f"Prometheus did not become ready on {url}; its log ends with:\n{log}")


def pid(folder: Path) -> int | None:
    """The pid of this folder's Prometheus, if it still runs (a stale pid file names another process)."""
    path = folder / "prometheus.pid"
    try:
        number = int(path.read_text().strip())
        command = Path(f"/proc/{number}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    ours = (
        command
        and command[0].endswith(b"prometheus")
        and f"--config.file={folder / 'prometheus.yml'}".encode() in command
    )
    return number if ours else None


def stop(folder: Path, seconds: float = 20) -> None:
    """Stop this folder's Prometheus by its pid and wait for it to exit."""
    number = pid(folder)
    if number is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(number, signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and pid(folder) is not None and not _zombie(number):
            time.sleep(0.1)
        if pid(folder) is not None and not _zombie(number):
            with contextlib.suppress(ProcessLookupError):
                os.kill(number, signal.SIGKILL)
        _reap(number)
    (folder / "prometheus.pid").unlink(missing_ok=True)


def _zombie(number: int) -> bool:
    try:
        return Path(f"/proc/{number}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _reap(number: int) -> None:
    """Collect the exit status when this process started it (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(number, os.WNOHANG)
