"""Sharded feature extraction: the feature cache of a query filled by several task runs at once.

    python -m flows.features QUERY [--shards 4] [--workers 4] [--dask-address tcp://HOST:8786]

Each shard is a `build-feature-shard` task run; they run in parallel on Dask (prefect-dask's
DaskTaskRunner): a local cluster of --workers processes by default, or the scheduler at
--dask-address, whose workers must see the same feature folder (params features.dir). Then
`merge-feature-shards` appends the shards to the stores training reads. A run that lost a shard
(its worker killed) fails; the next run re-encodes that shard alone and reuses the finished ones.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from prefect import flow
from prefect.futures import wait

from captioning.settings import FeatureSettings, Settings
from flows import parse_settings, settings_parser
from tasks.features import build_feature_shard, merge_feature_shards


@flow(name="sharded-features")
def sharded_features_flow(query: str, features: FeatureSettings, shards: int = 2) -> dict[str, Any]:
    """Encode the images of `query` missing from their stores in `shards` parallel task runs, then merge."""
    encoder, store_root = features.encoder, features.dir
    futures = [
        build_feature_shard.submit(query, encoder, shard, shards, features.batch_size, store_root)
        for shard in range(shards)
    ]
    wait(futures)  # every shard runs to its end before a failed one fails the run
    results = [future.result() for future in futures]
    merged = merge_feature_shards(query, encoder, store_root)
    return {"query": query, "shards": results, "merged": merged}


def dask_runner(workers: int, address: str | None = None):
    """The scheduler at `address`, else a local cluster of `workers` single-threaded processes
    (torch releases the GIL, but one process per shard keeps a killed shard from taking others along)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )


def run(query: str, shards: int, settings: Settings, workers: int | None = None, address: str | None = None):
    """The flow on Dask with the features settings of `settings`; returns the flow run's final state."""
    runner = dask_runner(workers or shards, address)
    return sharded_features_flow.with_options(task_runner=runner)(
        query=query, features=settings.features, shards=shards, return_state=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Fill the feature cache of a data query with several parallel shards.")
    parser.add_argument("query", help="data query, e.g. flickr8k[train+val]")
    parser.add_argument("--shards", type=int, default=2, help="parallel task runs (default 2)")
    parser.add_argument("--workers", type=int, help="local Dask worker processes (default: one per shard)")
    parser.add_argument("--dask-address", help="a running Dask scheduler, e.g. tcp://scheduler:8786")
    args, settings = parse_settings(parser, argv)
    state = run(args.query, args.shards, settings, args.workers, args.dask_address)
    if state.is_completed():
        print(json.dumps(state.result(), indent=1))
        return 0
    print(f"{state.name}: {state.message}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
