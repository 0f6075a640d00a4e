"""Release flow: a registered version becomes a bento and an image, rolled out to the running stack.

    python -m flows.release [--model models:/captioner@champion]   # once
    python -m flows.release --watch [--port 3000]                  # what `make up` keeps running

`--watch` reconciles the stack with the registry: every `release.poll_seconds` it reads which
version the champion alias names and, when the stack serves another one, runs this flow for it.
So a promotion by the retrain flow, by `captioning register` or in the MLflow UI, and a rollback
(`captioning registry rollback`) all reach the containers the same way, with no other command.
A refused gate moves no alias and so releases nothing.

A new version earns its traffic (captioning/release/rollout.py): its model server starts beside
the stable ones with no traffic, then each stage enabled in `release.*` is a task of this run:
smoke (its own container captions the photos recorded at registration), shadow (the API copies
live requests to it), canary (a growing share of the traffic, analysed through Prometheus),
promote (every replica on it, the previous version kept warm). A stage that fails rolls it back:
the candidate leaves the stack, the champion alias returns to the version that served, the
refused version is tagged with the reason, and the run fails with it. The watcher never releases
a refused version again by itself. A rollback to the version kept warm takes seconds.

The watcher serves its metrics on 127.0.0.1 at the stack's port + 10 (captioning/release/watcher_metrics.py):
every refused version of the model with its stage and time, read from the registry at each poll,
which the stack's Prometheus scrapes and the alert `CaptioningRolloutRefused` fires on.
"""

from __future__ import annotations

import sys
import time

from prefect import flow
from prefect.states import Completed, Failed

from captioning.settings import Settings
from flows import load_settings, parse_settings, settings_parser, tracking_uri
from tasks import release as tasks
from tasks.artifacts import publish_release

RETRY_FAILED_SECONDS = 300


def run_name() -> str:
    """release-vN (or release-ALIAS): what the run in the Prefect UI releases."""
    from prefect.runtime import flow_run

    model = str(flow_run.parameters.get("model", ""))
    tail = model.rstrip("/").rsplit("/", 1)[-1]
    return f"release-v{tail}" if tail.isdigit() else f"release-{tail.split('@')[-1] or 'model'}"


@flow(name="release", flow_run_name=run_name)
def release_flow(model: str, tracking: str | None = None, settings: Settings | None = None):
    """Bento and image of `model`, then a progressive rollout to the stack `make up` started (if
    any): candidate, smoke, shadow, canary, promote; any failed stage rolls it back and fails the run."""
    from captioning.release import stack

    settings = settings or load_settings()
    built = tasks.build_release(model, tracking, settings.release.kube_context)
    version, image = built["version"], built["image"]
    state = stack.read_state()
    if state is None or not stack.running(state):
        return shown(Completed, f"version {version}: {image}, no stack running: not rolled out", built)
    if (state.get("previous") or {}).get("version") == version:
        tasks.return_to_previous(version)
        return shown(Completed, f"version {version} (kept warm) serves again", built)
    tasks.start_candidate(settings, image, version)
    verdicts = []
    for stage in stages(settings):
        verdict = run_stage(stage, version, settings, tracking)
        verdicts.append(verdict)
        if verdict["outcome"] == "failed":
            tasks.rollback(version, verdict, tracking, settings.register.model_name)
            return shown(Failed, f"version {version} rolled back: {verdict['reason']}", built, verdicts)
    tasks.promote(version, settings)
    message = f"version {version}: {image}, rolled out through {', '.join(stages(settings)) or 'no stage'}"
    return shown(Completed, message, built, verdicts)


def shown(state, message: str, built: dict, verdicts: list[dict] | None = None):
    """The run's final state, after publishing what was built and each stage's verdict as artifacts."""
    publish_release(message, built, verdicts or [])
    return state(message=message, data={"release": built, "verdicts": verdicts or []})


def stages(settings: Settings) -> list[str]:
    release = settings.release
    return [name for name in ("smoke", "shadow", "canary") if getattr(release, name).enabled]


def run_stage(stage: str, version: str, settings: Settings, tracking: str | None) -> dict:
    """One stage's verdict; a stage that breaks (a pod that does not start, a lost stack) fails."""
    try:
        if stage == "smoke":
            return tasks.smoke(version, settings, tracking)
        return getattr(tasks, stage)(version, settings)
    except Exception as error:
        reason = f"{stage}: {type(error).__name__}: {error}"
        return {"outcome": "failed", "stage": stage, "reason": reason[:2000], "check": "error"}


def champion_version(tracking: str | None, name: str) -> str | None:
    from captioning.registry.locate import locate
    from captioning.registry.store import RegistryError

    try:
        return locate(f"models:/{name}@champion", tracking, download=False).version
    except RegistryError:
        return None


def due(version: str | None, state: dict | None, tracking: str | None, name: str, failed: dict) -> bool:
    """Whether the champion needs a release: the stack serves another version, no rollout of it
    is under way, it failed no release in the last 5 minutes, and no rollout refused it."""
    from captioning.registry.refusals import refused_reason

    if not version or not state or state.get("version") == version or state.get("rollout"):
        return False
    if time.time() - failed.get(version, 0) < RETRY_FAILED_SECONDS:
        return False
    reason = refused_reason(tracking, name, version)
    if reason:
        if version not in failed:
            print(f"champion is version {version}, refused by a rollout: {reason}; not released again", flush=True)
            failed[version] = float("inf")
        return False
    return True


def watch(tracking: str | None, settings: Settings, port: int | None = None) -> None:
    """Release every champion the running stack does not serve yet (a failed one again after
    5 min, a refused one never); stop the warm previous version when its time is up. Metrics on
    127.0.0.1 at `port` + 10 (`port`: the stack's, default the running stack's or 3000)."""
    from captioning.release import stack
    from captioning.release.watcher_metrics import WatcherMetrics

    name, failed, metrics = settings.register.model_name, {}, WatcherMetrics()
    metrics_port = stack.watcher_port(port)
    try:
        metrics.serve(metrics_port)
        print(f"metrics on http://127.0.0.1:{metrics_port}/metrics", flush=True)
    except OSError as error:  # releasing matters more than being scraped: go on without them
        print(f"watch: metrics not served, 127.0.0.1:{metrics_port}: {error}", flush=True)
    print(f"watching models:/{name}@champion every {settings.release.poll_seconds:g} s; Ctrl+C stops", flush=True)
    try:
        while True:
            poll(tracking, settings, failed, metrics)
            time.sleep(settings.release.poll_seconds)
    finally:
        metrics.stop()


def poll(tracking: str | None, settings: Settings, failed: dict, metrics) -> None:
    """One round of the watcher: the refusals for its metrics, then a release if one is due."""
    from captioning.release import rollout, stack

    name = settings.register.model_name
    try:
        state = stack.read_state()
        if state and stack.running(state):
            with stack.locked():
                rollout.drop_previous(force=False)
        metrics.read_refusals(tracking, name)
        version = champion_version(tracking, name)
        if due(version, state, tracking, name, failed) and stack.running(state):
            print(f"champion is version {version}, the stack serves {state.get('version')}: releasing", flush=True)
            if not release(f"models:/{name}/{version}", tracking, settings, metrics):
                failed[version] = time.time()
                metrics.read_refusals(tracking, name)  # a refusal shows now, not a poll later
    except Exception as error:  # the registry or podman hiccupped: try again next round
        print(f"watch: {type(error).__name__}: {error}", flush=True)


def release(model: str, tracking: str | None, settings: Settings, metrics) -> bool:
    """Run the release flow for `model`, counted in the watcher's metrics; whether it completed."""
    metrics.release_started()
    completed = False
    try:
        run = release_flow(model, tracking, settings, return_state=True)
        print(f"{run.name}: {run.message}", flush=True)
        completed = run.is_completed()
    finally:
        metrics.release_finished(completed)
    return completed


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Release a registered version and roll it out to the running stack.")
    parser.add_argument("--model", default=None, help="models:/NAME@ALIAS or models:/NAME/N (default: the champion)")
    parser.add_argument("--watch", action="store_true", help="release each new champion as it is set")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="with --watch: the stack's port P (default the running stack's, else 3000); metrics on P+10",
    )
    args, settings = parse_settings(parser, argv)
    tracking = tracking_uri(settings)
    name = settings.register.model_name
    if args.watch:
        watch(tracking, settings, args.port)
        return 0
    state = release_flow(args.model or f"models:/{name}@champion", tracking, settings, return_state=True)
    print(f"{state.name}: {state.message}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
