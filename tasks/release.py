"""Releasing a registered version (bento + image) and rolling it out to the running stack."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import run_logger


@task(name="build-release", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def build_release(model: str, tracking: str | None = None) -> dict[str, Any]:
    """The bento and image of `model` (models:/NAME@ALIAS or /N), built when missing."""
    from captioning.release.build import release

    result = release(model, tracking)
    how = f"built in {result.build_seconds:.0f} s" if result.built else "already built"
    run_logger().info("version %s: %s (%.0f MB), %s", result.version, result.image, result.size_bytes / 1e6, how)
    return result.to_dict()


@task(name="roll-out", cache_policy=NO_CACHE)
def roll_out(image: str, version: str) -> dict[str, Any] | None:
    """Replace the running stack's replicas one at a time; None when no stack runs."""
    from captioning.release import stack

    state = stack.read_state()
    if state is None or not stack.running(state):
        run_logger().info("no stack is running on this machine: nothing to roll out")
        return None
    state = stack.rollout(image, version=version)
    run_logger().info("version %s rolled out in %.0f s", version, state["rollout_seconds"])
    return state
