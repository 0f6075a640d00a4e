"""Registration flow: register a model version in MLflow; the metric gates decide promotion.

    python -m flows.registration --model artifacts/train/model --metrics reports/metrics.json

A failed gate is a normal outcome: the run completes with "gate failed: ..." and the champion
stays where it was.
"""

from __future__ import annotations

import json
import sys

from prefect import flow
from prefect.states import Completed

from captioning.settings import Settings
from flows import finish, load_settings, parse_settings, run_settings, settings_parser, tracking_uri
from tasks.artifacts import publish_registration
from tasks.registry import register_model


def run_name() -> str:
    return f"register-{run_settings().register.model_name}"


@flow(name="registration", flow_run_name=run_name)
def registration_flow(
    package_dir: str,
    metrics: dict[str, float],
    settings: Settings | None = None,
    query: str | None = None,
    champion_metrics: dict[str, float] | None = None,
    run_id: str | None = None,
):
    """Register `package_dir` scored `metrics` on `query`; promote it when it passes the gates."""
    settings = settings or load_settings()
    query = query or settings.data.test_query
    result = register_model(
        package_dir,
        metrics,
        query,
        settings,
        tracking=tracking_uri(settings),
        champion_metrics=champion_metrics,
        run_id=run_id,
    )
    publish_registration(result, metrics, settings.register.gates.to_dict(), query)
    return Completed(message=result["message"], data=result)


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Register a model; the metric gates decide promotion.")
    parser.add_argument("--model", required=True, help="model package folder")
    parser.add_argument("--metrics", required=True, help="metrics JSON written by the evaluation")
    parser.add_argument("--data", help="query the metrics come from (default: params data.test_query)")
    parser.add_argument("--run-id", help="MLflow run of the training (the model is logged into it)")
    args, settings = parse_settings(parser, argv)
    with open(args.metrics, encoding="utf-8") as handle:
        payload = json.load(handle)
    metrics = payload.get("metrics", payload)
    state = registration_flow(
        package_dir=args.model,
        metrics=metrics,
        settings=settings,
        query=args.data,
        run_id=args.run_id,
        return_state=True,
    )
    return finish(state, lambda r: r["message"])


if __name__ == "__main__":
    sys.exit(main())
