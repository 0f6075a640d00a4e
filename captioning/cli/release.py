"""`captioning release` and `captioning stack up|down|status|rollout`.

`release` turns a registered version into a bento and an image and prints the image's tag as its
last line. `stack` runs that image as separate containers on this machine (see captioning.release.stack).
Bad usage exits 2; a failed build or start exits 1 with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from captioning.cli.common import fail, params_option, print_json, set_option, settings

if TYPE_CHECKING:
    from captioning.settings import Settings

stack_app = typer.Typer(
    help="The service as containers on this machine (API, 2 model servers, haproxy).", no_args_is_help=True
)


def _release(model: Optional[str], tracking: Optional[str], config: "Settings", rebuild: bool = False):
    """Release `model` (default: the champion of params register.model_name) from the registry at
    `tracking` (default: $MLFLOW_TRACKING_URI, else params tracking.uri)."""
    from captioning.registry.store import RegistryError, tracking_uri
    from captioning.release.build import ReleaseError, release
    from captioning.release.container_image import ContainerError

    try:
        model = model or f"models:/{config.register.model_name}@champion"
        return release(model, tracking_uri(config, tracking), rebuild=rebuild, kube_context=config.release.kube_context)
    except (ReleaseError, ContainerError, RegistryError) as error:
        fail(str(error), code=1)


def release_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="models:/NAME@ALIAS or models:/NAME/N (default: the champion)."
    ),
    tracking: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: params tracking.uri."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build again even if the image exists."),
    as_json: bool = typer.Option(False, "--json"),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Build the bento and the image of a registered version; the last line is the image's tag."""
    result = _release(model, tracking, settings(params_file, assignments), rebuild)
    if as_json:
        print_json(result.to_dict())
        return
    how = f"built in {result.build_seconds:.0f} s" if result.built else "already built"
    typer.echo(f"version {result.version}: bento {result.bento}, {result.size_bytes / 1e6:.0f} MB image, {how}")
    if result.kubernetes.get("rendered"):
        kube = result.kubernetes
        applied = f"applied to {kube['context']}" if kube["applied"] else "not applied (release.kube_context is empty)"
        if kube.get("error"):
            applied = f"apply to {kube['context']} failed: {kube['error'].splitlines()[-1]}"
        typer.echo(f"Kubernetes: {kube['rendered']} ({applied})")
    if result.dispatch:
        typer.echo(result.dispatch)
    typer.echo(result.image)


@stack_app.command("up")
def up_command(
    port: int = typer.Option(3000, "--port", help="The API on 127.0.0.1:PORT; PORT+1..PORT+10 internal."),
    model: Optional[str] = typer.Option(
        None, "--model", help="The registered version to serve (default: the champion)."
    ),
    tracking: Optional[str] = typer.Option(None, "--tracking-uri"),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Start the API and 2 model servers from the version's image (built when missing)."""
    from captioning.release import stack as stacks

    config = settings(params_file, assignments)
    if not 1024 <= port <= 65000:
        fail(f"--port must be between 1024 and 65000, not {port}")
    result = _release(model, tracking, config)
    try:
        shadow = config.release.shadow
        state = stacks.up(
            result.image,
            port,
            version=result.version,
            scrape_seconds=config.release.scrape_seconds,
            shadow_share=shadow.share if shadow.enabled else 0.0,
        )
    except (stacks.StackError, stacks.ContainerError) as error:
        fail(str(error), code=1)
    typer.echo(f"serving version {state['version']} ({state['image']}) on http://127.0.0.1:{state['port']}/")


@stack_app.command("rollout")
def rollout_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="The registered version to roll out (default: the champion)."
    ),
    tracking: Optional[str] = typer.Option(None, "--tracking-uri"),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Release a version and replace the running replicas with it, one at a time, with no stage
    (`python -m flows.release`, which `make up`'s watcher runs, rolls out progressively)."""
    from captioning.release import stack as stacks

    result = _release(model, tracking, settings(params_file, assignments))
    try:
        state = stacks.rollout(result.image, version=result.version)
    except (stacks.StackError, stacks.ContainerError) as error:
        fail(str(error), code=1)
    typer.echo(f"version {state['version']} rolled out in {state['rollout_seconds']:.0f} s")


@stack_app.command("down")
def down_command() -> None:
    """Stop the containers and haproxy."""
    from captioning.release import stack as stacks

    stacks.down()
    typer.echo("stack stopped")


@stack_app.command("promote")
def promote_command() -> None:
    """End the rollout in progress by promoting its candidate now (its remaining analyses skipped)."""
    _control("promote")


@stack_app.command("abort")
def abort_command() -> None:
    """End the rollout in progress by rolling its candidate back now."""
    _control("abort")


@stack_app.command("drill")
def drill_command(
    delay_ms: int = typer.Option(0, "--delay-ms", min=0, max=600_000, help="Each caption batch waits this long."),
    fail_captions: bool = typer.Option(False, "--fail-captions", help="Every caption answers an error."),
) -> None:
    """Start the next rollout's candidate with a fault, to see its stages stop it and roll it back."""
    from captioning.release import rollout

    try:
        env = rollout.drill(delay_ms, fail_captions)
    except ValueError as error:
        fail(str(error))
    typer.echo(f"the next rollout's candidate starts with {env}")


def _control(action: str) -> None:
    from captioning.release import rollout
    from captioning.release import stack as stacks

    state = stacks.read_state()
    plan = (state or {}).get("rollout")
    if not plan:
        fail("no rollout is in progress", code=1)
    rollout.request(action)
    typer.echo(f"{action} of version {plan['version']} requested: the rollout acts on it at its next look")


@stack_app.command("status")
def status_command(as_json: bool = typer.Option(False, "--json")) -> None:
    """What runs: image, version, each replica's health as haproxy sees it, and the rollout in
    progress (its stage, each verdict so far, the candidate's figures next to the stable version's)."""
    from captioning.release import stack as stacks

    state = stacks.status()
    if state["running"] and state.get("rollout"):
        state["figures"] = _figures(state)
    if as_json:
        print_json(state)
    elif not state["running"]:
        typer.echo("no stack is running")
    else:
        for line in _status_lines(state):
            typer.echo(line)


def _figures(state: dict) -> dict:
    """The candidate's and the stable version's figures over the canary window, from Prometheus."""
    from captioning.config import PARAMS_FILE
    from captioning.release.analysis import Prometheus, PrometheusUnreachable, measure
    from captioning.settings import load_settings

    window = load_settings(PARAMS_FILE).release.canary.window_seconds
    prometheus = Prometheus(state["prometheus"]["url"])
    plan, figures = state["rollout"], {}
    try:
        for side, version in (("candidate", plan["version"]), ("stable", plan["stable"]["version"])):
            if version:
                figures[side] = measure(prometheus, version, window).__dict__
    except PrometheusUnreachable as error:
        figures["error"] = str(error)
    return figures


def _status_lines(state: dict) -> list[str]:
    lines = [
        f"version {state['version']} ({state['image']}) on http://127.0.0.1:{state['port']}/, "
        f"API reports {state['served']}; replicas {state['replicas']}; Prometheus {state['prometheus']['url']}"
    ]
    plan = state.get("rollout")
    if plan:
        lines.append(f"rolling out version {plan['version']}: stage {plan['stage']}")
        lines += [f"  {verdict['outcome']}: {verdict['reason']}" for verdict in plan["verdicts"]]
        for side, figures in state.get("figures", {}).items():
            lines.append(f"  {side}: {figures}")
    last = state.get("last_rollout")
    if last:
        lines.append(f"last rollout: version {last['version']} {last['outcome']} after {last['seconds']:.0f} s")
        if last.get("refusal"):
            lines.append(f"  {last['refusal']['reason']}")
    previous = state.get("previous")
    if previous:
        left = max(0.0, previous["until"] - time.time())
        lines.append(f"version {previous['version']} kept warm for {left:.0f} s more (a rollback takes seconds)")
    return lines
