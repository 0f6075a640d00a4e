"""The real service for the abuse and fault tests, and where their figures go.

One `bentoml serve` per session, configured as a hardened deployment: production mode run open
on purpose (CAPTIONING_ALLOW_NO_KEY=1), the model service closed by an internal token, a
per-client feedback and caption limits, the client address taken from X-Forwarded-For (so one test can
act as several clients).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from captioning.config import PROJECT_ROOT
from harness import serving
from tests.fixtures.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures for this folder)

INTERNAL_TOKEN = "robustness-internal-token"
FEEDBACK_PER_MINUTE = 20
CAPTIONS_PER_MINUTE = 600  # well above what the other tests send from 127.0.0.1
REPORT = PROJECT_ROOT / "reports" / "robustness_service.json"

HARDENED_ENV = {
    "CAPTIONING_ENV": "production",
    "CAPTIONING_ALLOW_NO_KEY": "1",
    "CAPTIONING_INTERNAL_TOKEN": INTERNAL_TOKEN,
    "CAPTIONING_FEEDBACK_PER_MINUTE": str(FEEDBACK_PER_MINUTE),
    "CAPTIONING_TRUST_PROXY": "1",
    "CAPTIONING_CAPTIONS_PER_MINUTE": str(CAPTIONS_PER_MINUTE),
    # Large model batches, as on a GPU: one merged batch then holds the model's worker thread
    # for seconds (the readiness test needs that).
    "CAPTIONING_MAX_BATCH_SIZE": "128",
    "OMP_NUM_THREADS": "1",
    "CAPTIONING_TORCH_THREADS": "1",
}


@pytest.fixture(scope="session")
def robust_model(tmp_path_factory) -> Path:
    return serving.tiny_package(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def hardened_service(robust_model, tmp_path_factory, request) -> serving.ServiceProcess:
    request.addfinalizer(serving.stop_all)
    return serving.shared_service("hardened", robust_model, tmp_path_factory.mktemp("hardened"), HARDENED_ENV)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the API and model workers)."""
    total = 0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total


class MemorySampler:
    """Samples the resident memory of a process tree every `period` seconds on a thread."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period = pid, period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(tree_rss(self.pid))
            self._stop.wait(self.period)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(tree_rss(self.pid))


def record_figures(section: str, figures: dict) -> None:
    """Merge one test's figures into reports/robustness_service.json (one section per test)."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = json.loads(REPORT.read_text())
    except (OSError, ValueError):
        report = {}
    report[section] = {**figures, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    REPORT.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
