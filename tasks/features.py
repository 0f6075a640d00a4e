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
    from captioning.data.query import select_by_dataset
    from captioning.features import build_selection_features

    logger = run_logger()
    groups = select_by_dataset(query)
    built = build_selection_features(groups, encoder, store_root, batch_size, progress=False)
    for dataset, (store, added) in built.items():
        logger.info("%s: %d %s images, %d newly encoded with %s (store %s holds %d)",
                    query, len(groups[dataset]), dataset, added, encoder, store.root, len(store))
    stores = {dataset: str(store.root) for dataset, (store, _) in built.items()}
    return {"query": query, "images": sum(map(len, groups.values())),
            "encoded": sum(added for _, added in built.values()),
            "store": next(iter(stores.values()), None), "stores": stores}
