"""Prefect tasks: thin wrappers over the library functions of `captioning`.

Each module wraps one step (data, features, training, evaluation, registry) and
adds only what orchestration needs: retries on network steps, caching where a
step is expensive and its inputs say everything, and logging to the run.
`state` keeps the small JSON that tells the retraining flow whether anything is new.
"""

from __future__ import annotations

import logging


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run; a plain logger when a task's `.fn` is called directly."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tasks")
