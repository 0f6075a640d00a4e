"""Sharded feature extraction: `python -m flows.features QUERY --shards 3` on prefect-dask's
DaskTaskRunner (three worker processes), against a real Prefect server.

Proves: three `build-feature-shard` task runs encode in parallel, in three processes, into one
store; the merged store equals the single-process cache to 1e-3 (absolute plus relative: see the
end of the test); a shard whose worker is killed fails the run, and the next run encodes
that shard alone while the finished shards are reused.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from captioning.features.store import SHARD_DONE, SHARD_LOCK, SHARDS_DIR, FeatureStore
from harness.trained import shared_dir, synthetic_data
from tests.fixtures.processes import child_env, start, stop, tail, wait_until

QUERY = "synthetic[train]-48"
SHARDS = 3
BATCH = 8
SETTINGS = ["--set", f"features.batch_size={BATCH}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> FeatureStore:
    """The same images encoded by one process, as `captioning features` does."""
    from captioning.data.query import select
    from captioning.features.store import build_features

    with synthetic_data():
        records = select(QUERY)
    folder = tmp_path_factory.mktemp("single") / "lite0" / "synthetic"
    return build_features(records, "lite0", folder, BATCH, progress=False, num_workers=0)


def shard_folder(store: Path, shard: int) -> Path | None:
    found = glob.glob(str(store / SHARDS_DIR / f"{shard}-of-{SHARDS}-*"))
    return Path(found[0]) if found else None


def kill_when_running(store: Path, shard: int) -> int:
    """SIGKILL the worker process encoding `shard` (the pid in its lock file) before it finishes."""

    def running() -> int | None:
        folder = shard_folder(store, shard)
        if folder is None or (folder / SHARD_DONE).exists() or not (folder / SHARD_LOCK).exists():
            return None
        text = (folder / SHARD_LOCK).read_text().strip()
        return int(text) if text else None

    pid = wait_until(running, 180, f"shard {shard} at work", interval=0.05)
    os.kill(pid, signal.SIGKILL)
    return pid


def flow_runs(name: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[name])), sort=FlowRunSort.START_TIME_ASC
        )


def shard_task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run for run in runs if run.name.startswith("build-feature-shard")]


def test_shards_build_one_cache_in_parallel_and_a_killed_shard_reruns_alone(prefect_api, reference, tmp_path):
    from captioning.config import PROJECT_ROOT
    from flows import load_settings
    from flows.features import run

    root = tmp_path / "features"
    store = root / "lite0" / "synthetic"
    env = child_env(
        CAPTIONING_DATA_DIR=str(shared_dir() / "data"),
        # A worker that dies fails its task at once, as a lost machine would.
        DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0",
    )
    command = [
        sys.executable,
        "-m",
        "flows.features",
        QUERY,
        "--shards",
        str(SHARDS),
        *SETTINGS,
        "--set",
        f"features.dir={root}",
    ]
    first = start(command, tmp_path / "first.log", env, cwd=PROJECT_ROOT)
    try:
        killed = kill_when_running(store, 1)
        first.wait(timeout=240)
    finally:
        stop(first)
    assert first.returncode == 1, tail(tmp_path / "first.log")
    done = {shard: json.loads((shard_folder(store, shard) / SHARD_DONE).read_text()) for shard in (0, 2)}
    assert not (shard_folder(store, 1) / SHARD_DONE).exists() and not (store / "index.json").exists()
    assert len({done[0]["pid"], done[2]["pid"], killed}) == 3  # three worker processes

    # The server saw the run fail on the lost worker, and its two finished shard task runs
    # overlap in time (parallel, not one after another). The killed one never reported an end.
    failed = flow_runs("sharded-features")[0]
    assert failed.state.is_failed() and "KilledWorker" in failed.state.message
    finished = [task for task in shard_task_runs(failed.id) if task.state.is_completed()]
    assert len(finished) == 2
    assert finished[0].start_time < finished[1].end_time and finished[1].start_time < finished[0].end_time

    settings = load_settings(overrides=[f"features.batch_size={BATCH}", f"features.dir={root}"])
    with synthetic_data():
        state = run(QUERY, SHARDS, settings)
    assert state.is_completed(), state.message
    result = state.result()
    parts = {part["shard"]: part["datasets"]["synthetic"] for part in result["shards"]}
    assert [parts[shard]["reused"] for shard in range(SHARDS)] == [True, False, True]
    assert parts[1]["encoded"] == parts[1]["images"] == 16 and parts[0]["encoded"] == parts[2]["encoded"] == 0
    assert result["merged"]["synthetic"] == {"store": str(store), "added": 48, "stored": 48}
    assert not (store / SHARDS_DIR).exists()

    merged = FeatureStore.open(store)
    ids = sorted(reference.ids)
    assert sorted(merged.ids) == ids and len(set(merged.ids)) == 48
    expected = reference.get(ids).astype(np.float32)
    difference = np.abs(merged.get(ids).astype(np.float32) - expected)
    # To 1e-3, absolute and relative: float16 keeps 11 significant bits, and the encoder's float32
    # outputs, computed in other batches and threads, differ by ~1e-6, which can round a value to the
    # neighbouring float16 (2^-11 to 2^-10 of its magnitude, e.g. 0.0039 for values between 4 and 8).
    assert bool(np.all(difference <= 1e-3 + 1e-3 * np.abs(expected)))
    assert float(difference.mean()) < 1e-4  # nearly every value is the very same float16
