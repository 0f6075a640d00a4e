"""Registering a model version in MLflow behind the metric gates."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioning.settings import Settings
from tasks import run_logger


@task(name="champion-query", cache_policy=NO_CACHE)
def champion_query(tracking: str | None, name: str) -> dict[str, str | None]:
    """The current champion version and the data query its stored metrics come from."""
    from captioning.registry.versions import champion_query as lookup

    version, query = lookup(tracking, name)
    return {"version": version, "query": query}


@task(name="register-model", cache_policy=NO_CACHE)
def register_model(
    package_dir: str,
    metrics: dict[str, float],
    query: str,
    settings: Settings,
    tracking: str | None = None,
    champion_metrics: dict[str, float] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Record the smoke photos with the package (release.smoke), then create a version; promote it
    to champion only if it passes the settings' gates (a failed gate is a result). `run_id`: the
    MLflow run of the training, which then holds the registered model too.
    """
    from captioning.registry.versions import register
    from captioning.release.smoke import registering

    logger = run_logger()
    with registering(package_dir, settings) as logged:
        result = register(
            logged,
            metrics,
            query,
            settings,
            tracking=tracking,
            champion_metrics=champion_metrics,
            run_id=run_id,
        )
    if settings.release.smoke.enabled:
        logger.info("smoke photos recorded with version %s: %d", result.version, settings.release.smoke.photos)
    if result.promoted:
        logger.info(result.message)
    else:
        logger.warning(result.message)
    return result.to_dict()
