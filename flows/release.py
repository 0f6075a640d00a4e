"""Release flow: a registered version becomes a bento and an image, rolled out to the running stack.

    python -m flows.release [--model models:/captioner@champion]   # once
    python -m flows.release --watch                                # what `make up` keeps running

`--watch` reconciles the stack with the registry: every `release.poll_seconds` it reads which
version the champion alias names and, when the stack serves another one, runs this flow for it.
So a promotion by the retrain flow, by `captioning register` or in the MLflow UI, and a rollback
(`captioning registry rollback`) all reach the containers the same way, with no other command.
A refused gate moves no alias and so releases nothing.
"""

from __future__ import annotations

import sys
import time

from prefect import flow
from prefect.states import Completed

from flows import parse_settings, settings_parser, tracking_uri
from tasks.release import build_release, roll_out

RETRY_FAILED_SECONDS = 300


@flow(name="release")
def release_flow(model: str, tracking: str | None = None):
    """Bento and image of `model`, then a rolling update of the stack `make up` started (if any)."""
    built = build_release(model, tracking)
    state = roll_out(built["image"], built["version"])
    where = "rolled out to the running stack" if state else "no stack running"
    message = f"version {built['version']}: {built['image']}, {where}"
    return Completed(message=message, data={"release": built, "stack": state})


def champion_version(tracking: str | None, name: str) -> str | None:
    from captioning.registry.locate import locate
    from captioning.registry.store import RegistryError

    try:
        return locate(f"models:/{name}@champion", tracking, download=False).version
    except RegistryError:
        return None


def watch(tracking: str | None, name: str, interval: float) -> None:
    """Release every champion the running stack does not serve yet (a failed one again after 5 min)."""
    from captioning.release import stack

    failed: dict[str, float] = {}
    print(f"watching models:/{name}@champion every {interval:g} s; Ctrl+C stops", flush=True)
    while True:
        try:
            version = champion_version(tracking, name)
            state = stack.read_state()
            due = time.time() - failed.get(version, 0) > RETRY_FAILED_SECONDS
            if version and state and state.get("version") != version and due and stack.running(state):
                print(f"champion is version {version}, the stack serves {state.get('version')}: releasing", flush=True)
                run = release_flow(f"models:/{name}/{version}", tracking, return_state=True)
                print(f"{run.name}: {run.message}", flush=True)
                if not run.is_completed():
                    failed[version] = time.time()
        except Exception as error:  # the registry or podman hiccupped: try again next round
            print(f"watch: {type(error).__name__}: {error}", flush=True)
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Release a registered version and roll it out to the running stack.")
    parser.add_argument("--model", default=None, help="models:/NAME@ALIAS or models:/NAME/N (default: the champion)")
    parser.add_argument("--watch", action="store_true", help="release each new champion as it is set")
    args, settings = parse_settings(parser, argv)
    tracking = tracking_uri(settings)
    name = settings.register.model_name
    if args.watch:
        watch(tracking, name, settings.release.poll_seconds)
        return 0
    state = release_flow(args.model or f"models:/{name}@champion", tracking, return_state=True)
    print(f"{state.name}: {state.message}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
