"""scripts/services.sh and scripts/down.sh act only on the servers this checkout started.

A server answering on the Prefect or MLflow port that another checkout started (seen: one whose
checkout had been deleted, answering 500 on every page) is refused with who it is, unless reuse is
asked for; a stale pid file that names some other process by now stops nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from captioning.config import PROJECT_ROOT
from harness.serving import free_port

HEALTH_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.fixture
def stranger(tmp_path):
    """A process of another folder answering /health and /api/health on a free port."""
    port = free_port()
    folder = tmp_path / "another-checkout"
    folder.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(port)], cwd=folder)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield port, process
    process.kill()
    process.wait()


def shell(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environment.update(PREFECT_HOME=str(tmp_path / "prefect"), **env)
    return subprocess.run(
        ["bash", "-c", f"source scripts/services.sh; {script}"],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("start, variable", [("start_prefect", "PREFECT_PORT"), ("start_mlflow", "MLFLOW_PORT")])
def test_a_server_of_another_checkout_is_refused_with_who_it_is(stranger, tmp_path, start, variable):
    port, process = stranger
    refused = shell(start, tmp_path, **{variable: str(port)})
    assert refused.returncode == 1
    assert "this checkout did not start it" in refused.stderr
    assert f"pid {process.pid}" in refused.stderr and "another-checkout" in refused.stderr
    assert "CAPTIONING_REUSE_SERVERS=1" in refused.stderr


def test_reuse_of_another_server_when_asked(stranger, tmp_path):
    port, process = stranger
    reused = shell("start_prefect", tmp_path, PREFECT_PORT=str(port), CAPTIONING_REUSE_SERVERS="1")
    assert reused.returncode == 0, reused.stderr
    assert "not this checkout's" in reused.stdout and f"pid {process.pid}" in reused.stdout


def test_a_server_named_by_prefect_api_url_is_used(stranger, tmp_path):
    port, _ = stranger
    used = shell("start_prefect", tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    assert used.returncode == 0, used.stderr
    assert "using the Prefect server" in used.stdout


def test_this_checkouts_server_is_reused(stranger, tmp_path):
    """The pid file names the live server process: it is this checkout's, reused without a word of refusal."""
    port = free_port()
    (tmp_path / "prefect").mkdir()
    fake = subprocess.Popen(
        [sys.executable, "-c", HEALTH_SERVER, str(port), "prefect", "server start", "--port", str(port)]
    )
    try:
        pid_file = tmp_path / "prefect" / "server.pid"
        pid_file.write_text(str(fake.pid))
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        owned = shell("start_prefect", tmp_path, PREFECT_PORT=str(port))
        assert owned.returncode == 0, owned.stderr
        assert f"this checkout's, pid {fake.pid}" in owned.stdout
    finally:
        fake.kill()
        fake.wait()


def test_a_stale_pid_file_names_no_process_of_ours(tmp_path):
    """owned_pid refuses a live pid whose command line is not the one expected."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "watch.pid"
        pid_file.write_text(str(other.pid))
        result = shell(f"owned_pid {pid_file} flows.release --watch", tmp_path)
        assert result.returncode == 1 and result.stdout == ""
        result = shell(f"owned_pid {pid_file} sleep 60", tmp_path)
        assert result.returncode == 0 and result.stdout.strip() == str(other.pid)
    finally:
        other.kill()
        other.wait()


def test_make_down_leaves_a_process_that_reused_the_watchers_pid(tmp_path):
    """A stale watch.pid naming an unrelated process: `make down` stops nothing of it."""
    stack = tmp_path / "stack"
    stack.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (stack / "watch.pid").write_text(str(other.pid))
        env = {**os.environ, "CAPTIONING_STACK_DIR": str(stack), "PREFECT_HOME": str(tmp_path / "prefect")}
        subprocess.run(["bash", "scripts/down.sh"], cwd=PROJECT_ROOT, env=env, capture_output=True, timeout=120)
        assert other.poll() is None, "down.sh killed a process it did not start"
        assert not (stack / "watch.pid").exists()
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
