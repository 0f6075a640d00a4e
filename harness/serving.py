"""Start the real captioning service (`bentoml serve service:CaptionAPI`) for tests.

One server per configuration and pytest session, shared by the integration and
browser tests (both conftests call `shared_service`).
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from captioning.config import PROJECT_ROOT

STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServiceProcess:
    url: str
    process: subprocess.Popen
    home: Path
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            # The server runs in its own process group (started below): stop that group only.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_service(model: str | Path, home: Path, extra_env: dict[str, str] | None = None) -> ServiceProcess:
    """Run `bentoml serve` on a free 127.0.0.1 port and wait until /readyz answers 200."""
    bentoml = Path(sys.executable).parent / "bentoml"
    return _launch([str(bentoml), "serve", "service:CaptionAPI"], model, home, extra_env)


def start_model_server(model: str | Path, home: Path, extra_env: dict[str, str] | None = None) -> ServiceProcess:
    """Run the model service alone (`python -m bento serve model`, as its own pod does) on a free
    127.0.0.1 port and wait until /readyz answers 200; its URL is what the API's
    CAPTIONING_MODEL_URL or CAPTIONING_SHADOW_URL takes."""
    return _launch([sys.executable, "-m", "bento", "serve", "model"], model, home, extra_env)


def _launch(command: list[str], model: str | Path, home: Path, extra_env: dict[str, str] | None) -> ServiceProcess:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "CAPTIONING_MODEL": str(model),
        "BENTOML_HOME": str(home / "bentoml"),
        "CAPTIONING_DATA_DIR": str(home / "data"),
        "CAPTIONING_ARTIFACTS_DIR": str(home / "artifacts"),
        "CAPTIONING_REPORTS_DIR": str(home / "reports"),
        "BENTOML_DO_NOT_TRACK": "true",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "2",
        **(extra_env or {}),
    }
    if "CAPTIONING_API_KEY" not in (extra_env or {}):
        env.pop("CAPTIONING_API_KEY", None)  # API-key auth only where a test asks for it
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServiceProcess(f"http://127.0.0.1:{port}", process, home, home / "data", log_path, env)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(command[-3:])} exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"service not ready after {STARTUP_SECONDS}s:\n{server.log_tail()}")


_SERVICES: dict[str, ServiceProcess] = {}
_PACKAGES: dict[str, Path] = {}


def tiny_package(root: Path) -> Path:
    """A small trained model package, built once per session."""
    if "tiny" not in _PACKAGES:
        from harness.trained import train_tiny_model

        _PACKAGES["tiny"] = Path(train_tiny_model(root))
    return _PACKAGES["tiny"]


def shared_service(name: str, model: Path, home: Path, extra_env: dict[str, str] | None = None) -> ServiceProcess:
    if name not in _SERVICES:
        _SERVICES[name] = start_service(model, home, extra_env)
    return _SERVICES[name]


def stop_all() -> None:
    while _SERVICES:
        _, server = _SERVICES.popitem()
        server.stop()


def model_socket(server: ServiceProcess) -> str:
    """The Unix socket the model service of a `bentoml serve` listens on: the address BentoML
    hands its workers in $BENTOML_RUNNER_MAP."""
    import json
    from urllib.parse import unquote, urlparse

    import psutil

    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            mapping = child.environ().get("BENTOML_RUNNER_MAP")
        except psutil.Error:  # a worker that just exited
            continue
        address = json.loads(mapping).get("caption_model", "") if mapping else ""
        if address.startswith("file://"):
            return unquote(urlparse(address).path)
    raise RuntimeError(f"no model service socket among the workers of {server.process.pid}")


def synthetic_jpeg(seed: int = 0, size: int = 224, quality: int = 90) -> bytes:
    """A rendered synthetic scene (shapes, colours) as JPEG bytes."""
    from captioning.data.synthetic import make_scene, render

    image = render(make_scene(random.Random(seed), size), size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
