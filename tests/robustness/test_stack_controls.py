"""The local stack's controls, tried as another user of the host would: haproxy's admin socket, the
files that hold the stack's secrets, and a process squatting on a replica's port.

Real haproxy (Debian's) on a free block of ports, and a real process on a slot port answering every
request with 200, as a squatter that hopes to be taken for the new replica would. The figures go to
reports/robustness_service.json (section `stack_controls`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from captioning.release import haproxy, pods, stack
from tests.fixtures.processes import free_block, start, stop, wait_for_http
from tests.robustness.conftest import record_figures

FIGURES: dict = {}

SQUATTER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Yes(BaseHTTPRequestHandler):
        def _answer(self):
            body = b'{"version": "2", "nonce": "guessed", "status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    HTTPServer(("127.0.0.1", int(sys.argv[1])), Yes).serve_forever()
    """
)


@pytest.fixture
def stack_folder(tmp_path, monkeypatch):
    folder = tmp_path / "stack"
    folder.mkdir()
    monkeypatch.setenv("CAPTIONING_STACK_DIR", str(folder))
    monkeypatch.delenv("CAPTIONING_API_KEY", raising=False)
    return folder


def _tcp_listeners(pid: int) -> set[int]:
    """The TCP ports a process listens on (from `ss`, which every Debian host has)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={pid}," in line}


def test_haproxy_admin_socket_is_private_and_on_no_tcp_port(stack_folder):
    port = free_block()
    ports = stack.ports(port)
    haproxy.start(ports, stack_folder)
    try:
        pid = haproxy.pid(stack_folder)
        socket_path = stack_folder / haproxy.SOCKET
        mode = stat.S_IMODE(socket_path.stat().st_mode)
        assert stat.S_ISSOCK(socket_path.stat().st_mode) and mode == 0o600, oct(mode)
        assert "Name: HAProxy" in haproxy.command(stack_folder, "show info")  # the owner still controls it
        listening = _tcp_listeners(pid)
        public = {ports["api"], ports["model"], ports["shadow"]}
        assert listening == public, (listening, public)  # the frontends only: no admin listener on TCP
    finally:
        haproxy.stop(stack_folder)
    FIGURES.update(admin_socket_mode=oct(mode), haproxy_tcp_listeners=len(listening), admin_on_tcp=False)


def test_the_stacks_secret_files_are_its_owners_only(stack_folder):
    old = os.umask(0o022)  # the usual umask: what the files were written with before
    try:
        pods.internal_token(stack_folder)
        manifest = pods.manifest("model", 0, "localhost/captioning:v1", stack.ports(3000), stack_folder, {})
        pods.private_file(stack_folder / "pods" / "model-s0.yaml", str(manifest))
    finally:
        os.umask(old)
    modes = {
        path.name: oct(stat.S_IMODE(path.stat().st_mode))
        for path in (stack_folder / "internal-token", stack_folder / "pods" / "model-s0.yaml")
    }
    assert set(modes.values()) == {"0o600"}, modes
    FIGURES.update(secret_file_modes=modes)


def test_a_process_squatting_on_a_slot_port_is_not_taken_for_the_replica(stack_folder, tmp_path):
    port = free_block()
    slot_port = stack.ports(port)["slots"]["model"][1]
    log = tmp_path / "squatter.log"
    squatter = start([sys.executable, "-c", SQUATTER, str(slot_port)], log, dict(os.environ))
    try:
        wait_for_http(f"http://127.0.0.1:{slot_port}/readyz", squatter, log, timeout=30)  # "ready", as it claims
        env = {"CAPTIONING_REPLICA_VERSION": "2", "CAPTIONING_REPLICA_NONCE": "a1b2c3d4e5f6"}
        with pytest.raises(stack.StackError, match="not as the replica started there") as refused:
            stack.check_identity(port, "model", 1, env)
    finally:
        stop(squatter)
    assert squatter.poll() is not None
    FIGURES.update(squatter_refused=True, squatter_refusal=str(refused.value))
    record_figures("stack_controls", FIGURES)
