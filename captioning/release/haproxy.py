"""haproxy in front of the local stack: its configuration, its admin socket, its view of the servers.

Frontends on 127.0.0.1: `api` over the API slots, `model` over the model slots, and `shadow` over
the model slots again, where every server stays disabled but a rollout candidate's during the
shadow stage: the API copies a share of its requests there (CAPTIONING_SHADOW_URL) and discards
the answers. Server weights (0-256) set each model slot's share of the requests during a canary
(weighted round robin).

The admin socket is a unix socket in the stack's folder, mode 0600: only the stack's owner can move
traffic or put servers in maintenance (a TCP socket would let any local user do it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

SOCKET = "haproxy.sock"
FULL_WEIGHT = 100


class HaproxyError(RuntimeError):
    """haproxy did not start, or its admin socket refused a command."""


def config(ports: dict, folder: Path) -> str:
    """Health checks on /readyz every second; `ports` as stack.ports() gives them."""
    lines = [
        "global",
        "    maxconn 2048",
        f"    stats socket {folder / SOCKET} mode 600 level admin",
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
    ]
    for frontend in ("api", "model", "shadow"):
        lines.append(f"frontend {frontend}\n    bind 127.0.0.1:{ports[frontend]}\n    default_backend {frontend}\n")
    backends = {"api": ports["slots"]["api"], "model": ports["slots"]["model"], "shadow": ports["slots"]["model"]}
    for backend, slots in backends.items():
        # Weighted round robin on the model slots: a canary's share is then its share of the
        # requests. leastconn weighs only busy servers, so at low concurrency every idle slot is
        # taken in turn and a 10 % candidate got a third of the traffic.
        balance = "leastconn" if backend == "api" else "roundrobin"
        lines += [f"backend {backend}", f"    balance {balance}"]
        lines += [f"    server s{n} 127.0.0.1:{slot} check disabled" for n, slot in enumerate(slots)]
        lines.append("")
    return "\n".join(lines) + "\n"


def start(ports: dict, folder: Path) -> None:
    (folder / "haproxy.cfg").write_text(config(ports, folder), encoding="utf-8")
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    command = [binary, "-f", str(folder / "haproxy.cfg"), "-D", "-p", str(folder / "haproxy.pid")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise HaproxyError(f"haproxy did not start: {result.stderr.strip()[-800:]}")


def command(folder: Path, line: str) -> str:
    """One command on the admin socket; OSError when haproxy does not run."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(str(folder / SOCKET))
        connection.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_stats(folder: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(backend, server) -> haproxy's statistics of it (status, weight, scur, qcur, ...)."""
    lines = command(folder, "show stat").strip().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    return {(row["pxname"], row["svname"]): row for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")}


def set_state(folder: Path, backend: str, slot: int, state: str) -> None:
    """ready | drain | maint"""
    command(folder, f"set server {backend}/s{slot} state {state}")


def set_weight(folder: Path, backend: str, slot: int, weight: int) -> None:
    command(folder, f"set server {backend}/s{slot} weight {int(weight)}")


def shares(candidate_percent: float, stable_slots: int, candidate_slots: int = 1) -> tuple[int, int]:
    """(weight of each candidate slot, weight of each stable slot) that give the candidate's
    `candidate_slots` together `candidate_percent` of the requests beside `stable_slots` stable
    ones. A stable slot keeps a weight of at least 1 (under 1 % of the requests at "100 %"), so
    that haproxy still has a server to send requests to the moment a candidate dies."""
    candidate = round(2 * candidate_percent / max(candidate_slots, 1))
    stable = max(1, round(2 * (100 - candidate_percent) / max(stable_slots, 1)))
    return candidate, stable


def pid(folder: Path) -> int | None:
    """The pid in haproxy.pid when that process is the haproxy of this folder's configuration
    (a stale pid file may name another process by now)."""
    path = folder / "haproxy.pid"
    try:
        number = int(path.read_text().split()[0])
        cmdline = Path(f"/proc/{number}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    ours = any(part.endswith(b"haproxy") for part in cmdline) and str(folder / "haproxy.cfg").encode() in cmdline
    return number if ours else None


def stop(folder: Path) -> None:
    number = pid(folder)
    if number is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(number, signal.SIGTERM)
    with contextlib.suppress(FileNotFoundError):
        (folder / "haproxy.pid").unlink()
