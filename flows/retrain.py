"""The end-to-end retraining flow: acquire -> (anything new?) -> validate -> train -> evaluate -> register.

    python -m flows.retrain [--params params-synthetic.yaml] [--set train.epochs=2] [--force]
    python -m flows.retrain --serve        # a deployment scheduled by params.yaml retrain.cron

Each step is a subflow, so the Prefect UI shows it with its own tasks and logs.

With params `retrain.include_feedback` on and corrections stored by the service, the run trains
on `<data.train_query>+feedback` (feedback records are all in the train split: corrections never
reach validation or test) after the `feedback` dataset passed the same validation as the data.
With it off, feedback is neither trained on nor a reason to retrain. Outcomes:
- nothing new since the last training (same DVC data hash, same training settings, no feedback
  stored since): a quick run that completes as "Skipped" and says so;
- the data or the feedback fails validation: the run ends Failed with the reasons, before any training;
- the metric gates refuse the model: the run completes with "gate failed: ..." (champion untouched);
- otherwise the new version becomes champion.

Trained or skipped, the run publishes its decision as the markdown artifact
`retrain-decision-<dataset>` (one history per dataset in the Prefect UI). Its "Live photos" section
shows the drift of the photos the served versions caption, per model server (score, threshold,
p-value, alarm), read from params `retrain.drift_source` (a Prometheus URL, or a model server's
/metrics page) or else from the local stack's Prometheus when `make up` runs one
(captioning/release/live_drift.py); without either it says there are no live figures and why.
An alarm there is a reason to add photos like the recent uploads to the training data: retraining
on the same data does not fix drift. Reading the figures never fails the run.
"""

from __future__ import annotations

import hashlib
import sys
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.states import Completed, Failed

from captioning.registry.lineage import feedback_fingerprint, feedback_since
from captioning.settings import Settings
from flows import label_run, load_settings, parse_settings, run_settings, settings_parser
from flows.acquisition import acquisition_flow
from flows.evaluation import evaluation_flow
from flows.registration import registration_flow
from flows.training import training_flow
from flows.validation import validation_flow
from tasks.artifacts import publish_decision, publish_skipped
from tasks.drift import live_drift
from tasks.state import check_for_new_data, record_training

DEPLOYMENT = "scheduled-retrain"


def with_feedback(settings: Settings) -> Settings:
    """These settings with the stored feedback added to the training data: `<train_query>+feedback`
    (unchanged when the training query already selects feedback)."""
    from captioning.data.query import parse_selection

    query = settings.data.train_query
    if any(part.dataset == "feedback" for part in parse_selection(query)):
        return settings
    return settings.replace(data=settings.data.replace(train_query=f"{query}+feedback"))


def run_folder(check: dict[str, Any]) -> str:
    """Training folder named by what the model is trained from: the same inputs resume or reuse it."""
    from captioning.config import artifacts_dir

    key = f"{check['dataset']}|{check['data']}|{check['params']}|{check['feedback_total']}"
    return str(artifacts_dir() / "retrain" / "runs" / hashlib.sha256(key.encode()).hexdigest()[:12])


def run_name() -> str:
    """retrain-DATASET; once a version is registered the run is renamed retrain-DATASET-vN."""
    return f"retrain-{run_settings().data.dataset}"


def run_tags(settings: Settings, data_hash: str | None) -> list[str]:
    """What the run and its subflows are about, as Prefect tags: dataset, decoder, data hash."""
    decoders = "+".join(member.model.decoder for member in settings.members())
    return [f"dataset:{settings.data.dataset}", f"decoder:{decoders}", f"data:{(data_hash or 'none')[:12]}"]


@flow(name="retrain", flow_run_name=run_name)
def retrain_flow(
    params_file: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    settings: Settings | None = None,
):
    """Retrain when something is new, promote the model when it passes the metric gates.

    Settings: `settings` when given, else params.yaml with `params_file` (partial YAML) and `overrides`
    laid over it (read at run time, so a scheduled run sees the current params.yaml).
    """
    logger = get_run_logger()
    settings = settings or load_settings(params_file, overrides)
    started = datetime.now(timezone.utc).isoformat()
    dataset = settings.data.dataset

    acquisition_flow(dataset=dataset, settings=settings)
    include_feedback = settings.retrain.include_feedback
    feedback = feedback_since(None) if include_feedback else 0
    if feedback:
        settings = with_feedback(settings)
    logger.info(
        "training data: %s (%d feedback row(s) admitted, retrain.include_feedback %s)",
        settings.data.train_query,
        feedback,
        include_feedback,
    )
    check = check_for_new_data(dataset, settings, use_feedback=include_feedback)
    if not check["new"] and not force:
        message = (
            f"nothing new since the training of {check['last'].get('trained_at')}: "
            f"same data ({check['data']}), same settings, no new feedback; no retraining"
        )
        logger.info(message)
        live = live_drift(settings.retrain.drift_source)
        publish_skipped(dataset, message, live)
        data = {"status": "nothing new", "message": message, "last": check["last"], "live_drift": live}
        return Completed(name="Skipped", message=message, data=data)

    labels = run_tags(settings, check["data"])
    label_run(tags=labels)
    with tags(*labels):
        return _train_and_register(settings, check, feedback, started, logger)


def _train_and_register(settings: Settings, check: dict[str, Any], feedback: int, started: str, logger):
    """Validate (the data, and the feedback when there is any), train, evaluate, register."""
    dataset = settings.data.dataset
    checks = [(dataset, check["data"])] + ([("feedback", feedback_fingerprint())] if feedback else [])
    for name, fingerprint in checks:
        validation = validation_flow(dataset=name, settings=settings, fingerprint=fingerprint, return_state=True)
        if not validation.is_completed():
            logger.error(validation.message)
            return Failed(
                message=f"stopped before training: {validation.message}", data=validation.result(raise_on_failure=False)
            )

    trained = training_flow(settings=settings, out_dir=run_folder(check))
    evaluation = evaluation_flow(model=trained["package_dir"], settings=settings)
    registration = registration_flow(
        package_dir=trained["package_dir"],
        metrics=evaluation["metrics"],
        settings=settings,
        query=evaluation["query"],
        champion_metrics=evaluation["champion_metrics"],
        run_id=trained["mlflow_run_id"],
    )
    record_training(
        check,
        {
            "package_dir": trained["package_dir"],
            "version": registration["version"],
            "promoted": registration["promoted"],
            "metrics": evaluation["metrics"],
        },
        started,
    )
    status = "promoted" if registration["promoted"] else "gate failed"
    summary = {
        "status": status,
        "message": registration["message"],
        "reasons": check["reasons"],
        "train_query": settings.data.train_query,
        "version": registration["version"],
        "promoted": registration["promoted"],
        "gate_reasons": registration["reasons"],
        "metrics": evaluation["metrics"],
        "package_dir": trained["package_dir"],
        "comparison": evaluation["comparison"],
    }
    logger.info(registration["message"])
    gates = settings.register.gates.to_dict()
    summary["live_drift"] = live = live_drift(settings.retrain.drift_source)
    publish_decision(dataset, registration, evaluation, gates, settings.data.train_query, live)
    label_run(name=f"retrain-{dataset}-v{registration['version']}")
    return Completed(message=registration["message"], data=summary)


def serve(params_file: str | None, overrides: list[str], settings: Settings) -> None:
    """A deployment of this flow on the cron of `settings` retrain.cron, run by this process; each run
    reads params.yaml with `params_file` and `overrides` again."""
    cron = settings.retrain.cron
    print(f"serving {DEPLOYMENT!r} on cron {cron!r}; runs show up in the Prefect UI. Stop with Ctrl+C.")
    retrain_flow.serve(
        name=DEPLOYMENT,
        cron=cron,
        tags=["retrain"],
        parameters={"params_file": params_file, "overrides": overrides},
        description="Retrain when the data or the feedback changed; promote through the metric gates.",
    )


def main(argv: list[str] | None = None) -> int:
    parser = settings_parser("Retrain, evaluate and register a caption model when anything is new.")
    parser.add_argument(
        "--force",
        action="store_true",
        help="validate, evaluate and register even if nothing is new (a finished training "
        "on the same data and settings is reused, not repeated)",
    )
    parser.add_argument(
        "--serve", action="store_true", help="create a deployment scheduled by params retrain.cron and run it here"
    )
    args, settings = parse_settings(parser, argv)
    if args.serve:
        serve(args.params, args.overrides, settings)
        return 0
    state = retrain_flow(settings=settings, force=args.force, return_state=True)
    data = state.result(raise_on_failure=False) if state.is_completed() else None
    print(f"{state.name}: {state.message}")
    if isinstance(data, dict) and data.get("status") in ("promoted", "gate failed"):
        print(f"metrics: {data['metrics']}")
        print(f"comparison table: {data['comparison']['markdown']}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
