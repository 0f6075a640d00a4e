"""Releases side by side: one at a time through the release lock, each image build in a context
folder of its own."""

from __future__ import annotations

import subprocess
import sys

from captioning.release.container_image import context_folder

HOLD = """
import time
from captioning.release.build import release_lock
with release_lock():
    start = time.time()
    time.sleep(0.5)
    print(start, time.time())
"""


def test_releases_in_separate_processes_hold_the_lock_one_after_the_other(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_ARTIFACTS_DIR", str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    spans = sorted(tuple(map(float, run.communicate(timeout=60)[0].split())) for run in runs)
    assert all(run.returncode == 0 for run in runs)
    for (_, first_end), (second_start, _) in zip(spans, spans[1:]):
        assert second_start >= first_end, spans  # no two inside at once


def test_each_build_gets_an_empty_context_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_CONTAINER_CACHE", str(tmp_path))
    first, second = context_folder("7"), context_folder("7")  # two builds of one version
    assert first != second and first.parent == second.parent == tmp_path / "context"
    assert first.name.startswith("v7-") and not any(first.iterdir()) and not any(second.iterdir())
