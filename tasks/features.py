"""The feature cache: encode every image of a query once."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import run_logger


@task(name="build-features", cache_policy=NO_CACHE)
def build_features(query: str, encoder: str, batch_size: int = 32, store_root: str | None = None) -> dict[str, Any]:
    """Encode the images of `query` (or of a `+` union of queries) missing from their stores.

    Each dataset has the store training and evaluation read: artifacts_dir()/features/<encoder>/<dataset>,
    or `store_root`/<encoder>/<dataset> when params set features.dir. No work when all are cached.
    """
    from pathlib import Path

    from captioning.data.query import select_by_dataset
    from captioning.features import build_features as build
    from captioning.features import default_store_dir

    logger = run_logger()
    stores: dict[str, str] = {}
    images = encoded = 0
    for dataset, records in select_by_dataset(query).items():
        store_dir = Path(store_root) / encoder / dataset if store_root else default_store_dir(encoder, dataset)
        before = _stored(store_dir)
        store = build(records, encoder, store_dir, batch_size, progress=False)
        added = len(store) - before
        logger.info("%s: %d %s images, %d newly encoded with %s (store %s holds %d)",
                    query, len(records), dataset, added, encoder, store_dir, len(store))
        stores[dataset] = str(store_dir)
        images += len(records)
        encoded += added
    return {"query": query, "images": images, "encoded": encoded, "store": next(iter(stores.values()), None),
            "stores": stores}


def _stored(store_dir) -> int:
    from captioning.features import FeatureStore

    try:
        return len(FeatureStore.open(store_dir))
    except (FileNotFoundError, ValueError):
        return 0
