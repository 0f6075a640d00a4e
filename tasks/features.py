"""The feature cache: encode every image of a query once."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioning.settings import FeatureSettings
from tasks import run_logger


@task(name="build-features", cache_policy=NO_CACHE)
def build_features(query: str, features: FeatureSettings) -> dict[str, Any]:
    """Encode the images of `query` (or of a `+` union of queries) missing from their stores.

    Each dataset has the store training and evaluation read: artifacts_dir()/features/<encoder>/<dataset>,
    or <features.dir>/<encoder>/<dataset> when the settings name a folder. No work when all are cached.
    """
    import time

    from captioning.data.query import select_by_dataset
    from captioning.features.store import build_selection_features

    encoder = features.encoder
    logger = run_logger()
    started = time.perf_counter()
    groups = select_by_dataset(query)
    built = build_selection_features(
        groups, encoder, features.dir, features.batch_size, progress=False, num_workers=features.workers
    )
    for dataset, (store, added) in built.items():
        logger.info(
            "%s: %d %s images, %d newly encoded with %s (store %s holds %d)",
            query,
            len(groups[dataset]),
            dataset,
            added,
            encoder,
            store.root,
            len(store),
        )
    stores = {dataset: str(store.root) for dataset, (store, _) in built.items()}
    return {
        "query": query,
        "images": sum(map(len, groups.values())),
        "encoded": sum(added for _, added in built.values()),
        "store": next(iter(stores.values()), None),
        "stores": stores,
        "seconds": round(time.perf_counter() - started, 2),
    }


@task(name="build-feature-shard", cache_policy=NO_CACHE)
def build_feature_shard(
    query: str, encoder: str, shard: int, shards: int, batch_size: int = 32, store_root: str | None = None
) -> dict[str, Any]:
    """Encode shard `shard` of `shards` of the images of `query` missing from their stores (one part
    per dataset of the selection). A shard that finished before is reused; see merge_feature_shards."""
    from captioning.data.query import select_by_dataset
    from captioning.features.store import build_shard, store_dir

    logger = run_logger()
    parts = {}
    for dataset, records in select_by_dataset(query).items():
        part = build_shard(records, encoder, store_dir(encoder, dataset, store_root), shard, shards, batch_size)
        logger.info(
            "%s shard %d/%d of %s: %d images, %d encoded%s",
            query,
            shard + 1,
            shards,
            dataset,
            part["images"],
            part["encoded"],
            " (reused)" if part["reused"] else "",
        )
        parts[dataset] = part
    return {
        "query": query,
        "shard": shard,
        "shards": shards,
        "datasets": parts,
        "encoded": sum(part["encoded"] for part in parts.values()),
        "reused": all(part["reused"] for part in parts.values()),
    }


@task(name="merge-feature-shards", cache_policy=NO_CACHE)
def merge_feature_shards(query: str, encoder: str, store_root: str | None = None) -> dict[str, Any]:
    """Append the finished shards of every store of `query` to that store (one writer: a lock);
    returns the rows added and the images stored, per dataset."""
    from captioning.data.query import parse_selection
    from captioning.features.store import FeatureStore, merge_shards, store_dir

    logger = run_logger()
    result = {}
    for dataset in dict.fromkeys(q.dataset for q in parse_selection(query)):
        folder = store_dir(encoder, dataset, store_root)
        added = merge_shards(folder)
        result[dataset] = {"store": str(folder), "added": added, "stored": len(FeatureStore.open(folder))}
        logger.info("%s: %d rows merged into %s (%d images stored)", dataset, added, folder, result[dataset]["stored"])
    return result
