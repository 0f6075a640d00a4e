"""Releasing a registered version (bento + image) and rolling it out to the running stack, stage
by stage: each stage of captioning/release/rollout.py is a task named after it, so one release is
one run in the Prefect UI with what each stage measured."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioning.settings import Settings
from tasks import run_logger


@task(name="build-release", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def build_release(model: str, tracking: str | None = None, kube_context: str = "") -> dict[str, Any]:
    """The bento and image of `model` (models:/NAME@ALIAS or /N), built when missing; its
    Kubernetes overlay applied to `kube_context` when one is named (a failure is logged, not raised)."""
    from captioning.release.build import release

    result = release(model, tracking, kube_context=kube_context)
    if result.kubernetes.get("error"):
        run_logger().warning("kubectl apply to %s failed: %s", kube_context, result.kubernetes["error"])
    how = f"built in {result.build_seconds:.0f} s" if result.built else "already built"
    run_logger().info("version %s: %s (%.0f MB), %s", result.version, result.image, result.size_bytes / 1e6, how)
    return result.to_dict()


@task(name="candidate", cache_policy=NO_CACHE)
def start_candidate(settings: Settings, image: str, version: str) -> dict[str, Any]:
    """The candidate's model server beside the stable ones, in haproxy at weight 0."""
    from captioning.release import rollout

    plan = rollout.begin(settings, image, version)
    run_logger().info(
        "version %s ready beside version %s, with no traffic yet", version, plan["stable"]["version"] or "none"
    )
    return plan


@task(name="smoke", cache_policy=NO_CACHE)
def smoke(version: str, settings: Settings, tracking: str | None) -> dict[str, Any]:
    from captioning.release import rollout

    return rollout.smoke(version, settings, tracking, report=run_logger().info).to_dict()


@task(name="shadow", cache_policy=NO_CACHE)
def shadow(version: str, settings: Settings) -> dict[str, Any]:
    from captioning.release import rollout

    return rollout.shadow(version, settings, report=run_logger().info).to_dict()


@task(name="canary", cache_policy=NO_CACHE)
def canary(version: str, settings: Settings) -> dict[str, Any]:
    from captioning.release import rollout

    return rollout.canary(version, settings, report=run_logger().info).to_dict()


@task(name="promote", cache_policy=NO_CACHE)
def promote(version: str, settings: Settings) -> dict[str, Any]:
    from captioning.release import rollout

    return rollout.promote(version, settings, report=run_logger().info)


@task(name="rollback", cache_policy=NO_CACHE)
def rollback(version: str, verdict: dict, tracking: str | None, name: str) -> dict[str, Any]:
    """The candidate out of the stack, the champion alias back on the stable version, the reason
    tagged on the refused version."""
    from captioning.release import rollout
    from captioning.release.analysis import Verdict

    state = rollout.rollback(version, Verdict.from_dict(verdict), tracking, name)
    run_logger().error("version %s rolled back: %s", version, verdict["reason"])
    return state


@task(name="return-to-previous", cache_policy=NO_CACHE)
def return_to_previous(version: str) -> dict[str, Any]:
    """The warm previous version takes the traffic back (a rollback in the registry)."""
    from captioning.release import rollout

    state = rollout.return_to_previous(report=run_logger().info)
    run_logger().info("version %s serves again", version)
    return state
