"""Acquisition, versioning, loading and validation of datasets."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from captioning.settings import SyntheticSettings
from tasks import run_logger

# Datasets that are generated or collected here rather than downloaded.
LOCAL_DATASETS = ("synthetic", "feedback")


@task(
    name="acquire-dataset",
    # Downloads can fail half-way; `acquire` resumes with HTTP Range, so a retry is cheap.
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
)
def acquire_dataset(name: str, synthetic: SyntheticSettings, force: bool = False) -> str:
    """Put dataset `name` under data_dir()/name (quick when already there); return the folder.

    `synthetic`: the settings the synthetic dataset is generated with."""
    from captioning.config import data_dir
    from captioning.data.acquire import acquire
    from captioning.data.datasets import load_dataset

    logger = run_logger()
    if name in LOCAL_DATASETS:
        # Generated (synthetic) or collected by the service (feedback): loading creates it.
        dataset = load_dataset(name, synthetic=synthetic)
        logger.info("%s ready in %s: %d records", name, data_dir() / name, len(dataset.records))
        return str(data_dir() / name)
    path = acquire(name, progress=False, force=force)
    logger.info("%s acquired in %s", name, path)
    return str(path)


@task(
    name="version-data",
    # `dvc add` waits for no lock: a `dvc repro` running at the same moment makes it fail at once.
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    cache_policy=NO_CACHE,
)
def version_data() -> str | None:
    """`dvc add data` (writes data.dvc) when the data folder is this repository's; return its hash."""
    from captioning.config import data_dir
    from captioning.data.versioning import data_hash, track_with_dvc

    logger = run_logger()
    dvc_file = track_with_dvc(data_dir())
    if dvc_file is None:
        logger.info("%s is not inside the DVC repository: not versioned", data_dir())
        return None
    digest = data_hash(Path(dvc_file).parent)
    logger.info("DVC tracks %s as %s", data_dir(), digest)
    return digest


def _validation_key(parameters: dict[str, Any]) -> str | None:
    """No fingerprint, no caching: without it the data may have changed unseen."""
    fingerprint = parameters.get("fingerprint")
    if not fingerprint:
        return None
    return f"validate-v1-{parameters['name']}-{fingerprint}-{parameters['report_dir']}"


@task(
    name="validate-dataset",
    # Unchanged data gives the same report: the data fingerprint keys the cache, so a retrain
    # triggered by feedback alone does not re-check every image of a large dataset.
    cache_key_fn=lambda context, parameters: _validation_key(parameters),
    cache_expiration=timedelta(days=7),
    persist_result=True,
)
def validate_dataset(
    name: str, report_dir: str, synthetic: SyntheticSettings, fingerprint: str | None = None
) -> dict[str, Any]:
    """Great Expectations suite over dataset `name`; the outcome as a dict (never raises on bad data).

    `synthetic`: the settings the synthetic dataset must match (its split sizes and image size)."""
    from captioning.data.datasets import load_dataset
    from captioning.data.validate import expectations_for
    from captioning.data.validate import validate_dataset as validate

    logger = run_logger()
    result = validate(load_dataset(name), report_dir, expectations_for(name, synthetic))
    outcome = {
        "dataset": name,
        "success": bool(result.success),
        "failures": list(result.failures),
        "warnings": list(result.warnings),
        "summary": dict(result.summary),
        "report": str(Path(report_dir) / "validation.html"),
    }
    for line in result.warnings[:20]:
        logger.warning("%s: %s", name, line)
    if result.success:
        logger.info("%s passed validation: %s", name, result.summary)
    else:
        for line in result.failures[:50]:
            logger.error("%s: %s", name, line)
    return outcome
