"""Release benchmark: image size, cold and warm builds, promotion to serving, requests during rollouts.

    python -m benchmarks.release [--clients 4] [--requests 500]

In a workspace of its own (registry, artifacts, stack, images under localhost/captioning-bench,
a base image and wheel cache made anew, so the first build is cold): two tiny models trained on
synthetic data are registered as versions 1 and 2. Measured: `captioning release` of version 1
(cold: base image, wheels, torch layer, model), `make up` until ready, then version 2 promoted
while clients send requests (the watcher's warm release and the rolling update) and a rollback.
Writes reports/benchmark_release.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks import write_report  # noqa: E402
from captioning.config import disable_telemetry, mirror_dir  # noqa: E402
from harness.workspace import workspace_env  # noqa: E402

disable_telemetry()

REPO = "localhost/captioning-bench"


def workspace(home: Path, port: int) -> dict[str, str]:
    return workspace_env(
        home,
        "captioning-bench",
        CAPTIONING_CONTAINER_CACHE=str(home / "cache"),
        CAPTIONING_BASE_IMAGE="localhost/captioning-base:bench",
        PORT=str(port),
        PREFECT_PORT=str(port + 20),
    )


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return round(time.perf_counter() - started, 1)


def served(port: int) -> str | None:
    import requests

    try:
        return requests.get(f"http://127.0.0.1:{port}/model", timeout=30).json().get("registry_version")
    except (requests.RequestException, ValueError):
        return None


def rolled_out(stack_dir: Path, version: str) -> bool:
    """Every replica of the stack runs `version` (the rolling update is over)."""
    state = json.loads((stack_dir / "state.json").read_text())
    return state.get("version") == version and len(state["slots"]["model"]) == 2


def during_change(port: int, stack_dir: Path, photo: bytes, clients: int, minimum: int, change) -> dict:
    """Requests from `clients` while `change()` makes a version champion, until every replica runs it."""
    from captioning.release.traffic import RequestLoop

    first = None
    with RequestLoop(f"http://127.0.0.1:{port}", photo, clients=clients) as loop:
        started = time.monotonic()
        version = change()
        while not (rolled_out(stack_dir, version) and served(port) == version):
            if first is None and served(port) == version:
                first = time.monotonic() - started
            if time.monotonic() - started > 1800:
                sys.exit(f"version {version} not rolled out after 30 minutes")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        while loop.requests < minimum:
            time.sleep(0.5)
    return {
        **loop.summary(),
        "version": version,
        "first_replica_serving_seconds": round(first or seconds, 1),
        "change_to_rolled_out_seconds": round(seconds, 1),
    }


def photo_bytes() -> bytes:
    mirror = mirror_dir()
    images = sorted((mirror / "flickr8k" / "images").glob("*.jpg"))[:1] if mirror else []
    if images:
        return images[0].read_bytes()
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (40, 120, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def run(home: Path, port: int, clients: int, minimum: int) -> dict:
    from captioning.config import PARAMS_FILE
    from captioning.registry.versions import register
    from captioning.release.container_image import image_size, podman
    from captioning.settings import load_settings
    from harness.trained import train_tiny_model

    env = workspace(home, port)
    os.environ.update({k: env[k] for k in ("CAPTIONING_IMAGE_REPO", "CAPTIONING_STACK_DIR")})
    packages = [
        train_tiny_model(home / "a", decoder="attention", epochs=2),
        train_tiny_model(home / "b", decoder="show_tell", epochs=2),
    ]
    tracking = env["MLFLOW_TRACKING_URI"]
    promote = lambda package: (
        register(
            package,
            {"CIDEr": 10.0},
            "synthetic[test]",
            load_settings(PARAMS_FILE),
            gates={},  # noqa: E731
            tracking=tracking,
            lineage={},
        ).version
    )
    promote(packages[0])
    cold = timed([sys.executable, "-m", "captioning.cli", "release"], env)
    up = timed(["bash", "scripts/up.sh"], env)
    photo = photo_bytes()
    try:
        stack_dir = Path(env["CAPTIONING_STACK_DIR"])
        promotion = during_change(port, stack_dir, photo, clients, minimum, lambda: promote(packages[1]))

        def rollback() -> str:
            result = subprocess.run(
                [sys.executable, "-m", "captioning.cli", "registry", "rollback", "--json"],
                env=env,
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            return json.loads(result.stdout)["champion"]

        rolled_back = during_change(port, stack_dir, photo, clients, minimum, rollback)
    finally:
        timed(["bash", "scripts/down.sh"], env)
        pid = Path(env["PREFECT_HOME"]) / "server.pid"
        if pid.is_file():
            subprocess.run(["kill", pid.read_text().strip()], check=False)
    warm = json.loads((home / "artifacts" / "release" / "v2" / "release.json").read_text())
    sizes = {f"v{v}": image_size(f"{REPO}:v{v}") for v in (1, 2)}
    for version in (1, 2):
        podman("rmi", "--force", f"{REPO}:v{version}", check=False)
    podman("rmi", "--force", env["CAPTIONING_BASE_IMAGE"], check=False)
    return {
        "image_bytes": sizes,
        "build_cold_seconds": cold,
        "build_warm_seconds": warm["build_seconds"],
        "up_seconds": up,
        "promotion": promotion,
        "rollback": rolled_back,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=500, help="at least this many per change")
    parser.add_argument("--port", type=int, default=3400)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="captioning-release-bench-") as home:
        report = run(Path(home), args.port, args.clients, args.requests)
    report.update(
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        how="python -m benchmarks.release, alone on the machine; tiny synthetic models; "
        "the first release builds the base image, gathers wheels and installs torch",
    )
    print(json.dumps(report, indent=2))
    print(f"written to {write_report(report, 'release')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
