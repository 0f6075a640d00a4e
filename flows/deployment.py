"""The retrain flow deployed to a Prefect work pool, its runs executed by `prefect worker start`.

    python -m flows.deployment --pool local                     # a `process` pool; code from this checkout
    prefect worker start --pool local                           # on the machine (or one with the same path)

    python -m flows.deployment --pool gpu --type kubernetes --image REGISTRY/captioning:TAG --job-variable gpu=1
    prefect worker start --pool gpu --type kubernetes           # in the cluster (needs prefect-kubernetes)

A `process` pool runs each flow run as a child process of the worker, in this checkout (the
deployment's pull step sets the working directory to it). A `kubernetes` pool runs each flow run as
a Job from the image, with the base job template deploy/prefect/kubernetes-job-template.json
(GPU count, resources, the shared pipeline volume). The schedule is params retrain.cron unless
--cron or --every say otherwise; runs can also be started from the UI or `prefect deployment run`.
The deployment's parameters are the `--params` file and `--set` overrides, read at run time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from captioning.config import PROJECT_ROOT
from flows import parse_settings, settings_parser
from flows.retrain import DEPLOYMENT, retrain_flow

KUBERNETES_TEMPLATE = PROJECT_ROOT / "deploy" / "prefect" / "kubernetes-job-template.json"
ENTRYPOINT = "flows/retrain.py:retrain_flow"


def base_job_template(pool_type: str) -> dict[str, Any]:
    """The project's template for a kubernetes pool; Prefect's own default for a process pool."""
    if pool_type == "kubernetes":
        return json.loads(KUBERNETES_TEMPLATE.read_text(encoding="utf-8"))
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    raise ValueError(f"work pool type {pool_type!r}: expected process or kubernetes")


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    """Create the work pool `name` with base_job_template(pool_type) unless it exists (of that type)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(name=name, type=pool_type, base_job_template=base_job_template(pool_type))
            )
            return
    if existing.type != pool_type:
        raise ValueError(f"work pool {name!r} exists with type {existing.type!r}, not {pool_type!r}")


def deploy_retrain(
    pool: str,
    parameters: dict[str, Any],
    schedules: list | None = None,
    job_variables: dict[str, Any] | None = None,
    image: str | None = None,
    name: str = DEPLOYMENT,
    source: Path = PROJECT_ROOT,
):
    """Create (or update) deployment retrain/`name` on work pool `pool`; returns its id.

    Without `image` the flow's code is the folder `source` (a worker on this machine runs it there);
    with one, the code is the image's (its working directory), and nothing is built or pushed here.
    """
    options = {
        "work_pool_name": pool,
        "parameters": parameters,
        "schedules": schedules or [],
        "job_variables": job_variables or {},
        "tags": ["retrain"],
        "print_next_steps": False,
        "description": "Retrain when the data or the feedback changed; promote through the metric gates.",
    }
    if image:
        return retrain_flow.deploy(name, image=image, build=False, push=False, **options)
    flow = retrain_flow.from_source(source=str(source), entrypoint=ENTRYPOINT)
    return flow.deploy(name, **options)


def _job_variables(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE items, values read as YAML (gpu=1 is a number)."""
    result = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--job-variable {item!r} is not of the form key=value")
        result[key.strip()] = yaml.safe_load(value)
    return result


def main(argv: list[str] | None = None) -> int:
    from prefect.schedules import Cron, Interval

    parser = settings_parser("Deploy the retrain flow to a Prefect work pool (created when missing).")
    parser.add_argument("--pool", required=True, help="work pool name")
    parser.add_argument("--type", dest="pool_type", default="process", choices=["process", "kubernetes"])
    parser.add_argument("--image", help="the project's image (kubernetes pools)")
    parser.add_argument("--name", default=DEPLOYMENT, help=f"deployment name (default {DEPLOYMENT})")
    parser.add_argument("--cron", help="schedule (default: params retrain.cron)")
    parser.add_argument("--every", type=float, metavar="SECONDS", help="an interval schedule instead of a cron")
    parser.add_argument(
        "--job-variable",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a job variable of the pool's template, e.g. gpu=1 (repeatable)",
    )
    args, settings = parse_settings(parser, argv)
    if args.pool_type == "kubernetes" and not args.image:
        parser.error("a kubernetes pool runs the project's image: give --image")
    schedule = Interval(args.every) if args.every else Cron(args.cron or settings.retrain.cron)
    ensure_work_pool(args.pool, args.pool_type)
    deployment = deploy_retrain(
        args.pool,
        {"params_file": args.params, "overrides": args.overrides},
        [schedule],
        _job_variables(args.job_variable),
        args.image,
        args.name,
    )
    print(
        f"deployment retrain/{args.name} ({deployment}) on work pool {args.pool!r}; "
        f"start a worker: prefect worker start --pool {args.pool}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
