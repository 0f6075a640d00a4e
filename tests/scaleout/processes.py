"""Real processes on 127.0.0.1 for the scale-out tests: free ports, start, wait, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's console scripts: torchrun, mlflow, prefect, captioning


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: one thread per process (two cores are shared),
    the project importable, and `extra` on top."""
    from captioning.config import PROJECT_ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """A child in its own process group (so stop() reaches everything it starts), output to `log`."""
    handle = open(log, "ab")
    try:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    finally:
        handle.close()  # the child holds its own copy


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Signal the child, its process group and every descendant (torchrun's ranks and Prefect's
    flow-run processes live in sessions of their own), then SIGKILL what is left after `grace` s."""
    import psutil

    family = _descendants(proc.pid)
    if proc.poll() is None:
        with _gone():
            os.killpg(proc.pid, sig)
    _signal_all(family, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with _gone():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=grace)
    _signal_all(alive, signal.SIGKILL)


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_all(processes: list, sig: int) -> None:
    import psutil

    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


class _gone:
    """Ignore ProcessLookupError: the group may have exited on its own."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, trace):
        return kind is ProcessLookupError


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Poll `url` until it answers 200; fail with the log's tail when the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}: {tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s: {tail(log)}")
        time.sleep(0.3)


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    """Call `check` until it returns something truthy (returned); AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(interval)
