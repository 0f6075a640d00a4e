"""Validation flow: the Great Expectations suite over a dataset; bad data fails the run.

python -m flows.validation [--dataset flickr8k]     (exit 1 and the failures when the data is bad)
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow
from prefect.states import Completed, Failed

from captioning.settings import Settings
from flows import finish, flow_reports, load_settings, parse_settings, run_parameter, run_settings, settings_parser
from tasks.artifacts import publish_validation
from tasks.data import validate_dataset


def failure_message(outcome: dict[str, Any], shown: int = 5) -> str:
    failures = outcome["failures"]
    more = f"; ... {len(failures) - shown} more" if len(failures) > shown else ""
    return (
        f"validation of {outcome['dataset']} failed ({len(failures)} failure(s)): "
        + "; ".join(failures[:shown])
        + more
        + f" (report: {outcome['report']})"
    )


def run_name() -> str:
    return f"validate-{run_parameter('dataset') or run_settings().data.dataset}"


@flow(name="validation", flow_run_name=run_name)
def validation_flow(dataset: str | None = None, settings: Settings | None = None, fingerprint: str | None = None):
    """Validate `dataset` (default params data.dataset); the run ends Failed, with the reasons, on bad data.

    `fingerprint` (the data's DVC hash) lets an unchanged dataset reuse its last report.
    """
    settings = settings or load_settings()
    name = dataset or settings.data.dataset
    outcome = validate_dataset(name, str(flow_reports() / "validation" / name), settings.synthetic, fingerprint)
    publish_validation(outcome)
    if not outcome["success"]:
        return Failed(message=failure_message(outcome), data=outcome)
    return Completed(message=f"{name} passed validation", data=outcome)


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Validate a dataset (Great Expectations).")
    parser.add_argument("--dataset", help="dataset name (default: params data.dataset)")
    args, settings = parse_settings(parser, argv)
    state = validation_flow(dataset=args.dataset, settings=settings, return_state=True)
    return finish(state, lambda r: f"{r['dataset']} passed validation: {r['summary']} (report: {r['report']})")


if __name__ == "__main__":
    sys.exit(main())
