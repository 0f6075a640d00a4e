"""A Prefect work pool and worker: the retrain flow deployed to a `process` pool, its runs executed
by a `prefect worker start` process, against a real `prefect server start`.

Proves: the deployment takes its code from this checkout; the worker runs the flow when its schedule
fires (an interval anchored a few seconds ahead) and when a run is started through the API
(`run_deployment`), and the server sees both complete: the first trains a tiny model and promotes it,
the second finds nothing new and completes as Skipped. Also proves, offline and on that server, that
the kubernetes base job template (deploy/prefect/kubernetes-job-template.json) is what Prefect's
kubernetes worker expects and renders a valid Kubernetes Job.
"""

from __future__ import annotations

import copy
import json
import shlex
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from captioning.config import PROJECT_ROOT
from flows.deployment import KUBERNETES_TEMPLATE, deploy_retrain, ensure_work_pool
from harness.trained import shared_dir
from tests.fixtures.processes import BIN, child_env, start, stop, tail, wait_until

POOL = "scaleout-process"
NAME = "scaleout"
# The retrain flow on a small synthetic slice: a one-epoch tiny model, evaluated greedily.
TINY = [
    "data.dataset=synthetic",
    "data.train_query=synthetic[train]-32",
    "data.val_query=synthetic[val]-8",
    "data.test_query=synthetic[test]-8",
    "features.batch_size=8",
    "features.workers=0",
    "vocab.min_freq=1",
    "model.embed_dim=32",
    "model.hidden_dim=64",
    "model.attention_dim=32",
    "train.epochs=1",
    "train.batch_size=32",
    "train.warmup_steps=0",
    "train.val_images=8",
    "train.progress=false",
    "train.threads=1",
    "decoding.beam_size=1",
    "evaluate.beam_sizes=[1]",
    "register.gates.min={CIDEr: 0.0}",
    "register.gates.margin={}",
]


def deployment_runs(deployment_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def finished(run) -> bool:
    return run.state is not None and run.state.is_final()


def test_worker_executes_the_deployment_on_schedule_and_from_the_api(prefect_api, tmp_path):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.schedules import Interval

    ensure_work_pool(POOL, "process")
    folders = {
        "CAPTIONING_DATA_DIR": str(shared_dir() / "data"),
        "CAPTIONING_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "CAPTIONING_REPORTS_DIR": str(tmp_path / "reports"),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    # Ahead enough for the server's scheduler (it looks at new deployments every 5 s) to create the run.
    fires_at = datetime.now(timezone.utc) + timedelta(seconds=15)
    # The synthetic features other tests cached already are reused (the same images).
    overrides = TINY + [f"features.dir={shared_dir() / 'features'}"]
    deployment_id = deploy_retrain(
        POOL,
        {"params_file": None, "overrides": overrides},
        [Interval(timedelta(hours=1), anchor_date=fires_at)],
        {"env": folders},
        name=NAME,
    )
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert deployment.work_pool_name == POOL and deployment.entrypoint == "flows/retrain.py:retrain_flow"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}
    ]

    worker = start(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1"],
        tmp_path / "worker.log",
        child_env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="2"),
    )
    try:
        scheduled = wait_until(
            lambda: [run for run in deployment_runs(deployment_id) if finished(run)], 300, "finished scheduled run"
        )[0]
        assert scheduled.state.is_completed(), (scheduled.state.message, tail(tmp_path / "worker.log"))
        assert scheduled.auto_scheduled and abs(scheduled.expected_start_time - fires_at) < timedelta(seconds=1)
        assert scheduled.state.message.startswith("version 1 promoted")

        started = run_deployment(f"retrain/{NAME}", timeout=300)
        assert started.state.is_completed() and started.state.name == "Skipped", started.state.message
        assert not started.auto_scheduled and "nothing new" in started.state.message
    finally:
        stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert all(run.work_pool_name == POOL and str(run.id) in log for run in (scheduled, started))
    assert (tmp_path / "artifacts" / "retrain" / "state.json").is_file()  # written by the flow-run processes


# --------------------------------------------------------------------------- the kubernetes template


def kubernetes_default() -> dict:
    """The base job template of Prefect's kubernetes worker, as the installed Prefect ships it."""
    import prefect

    views = Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    return metadata["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def render_job(template: dict, values: dict) -> dict:
    """The Job a kubernetes worker would submit: Prefect's templating with the variables' defaults
    and `values`, then the worker's two conversions (env as a list, the command as args)."""
    from prefect.utilities.templating import apply_values

    defaults = {key: spec["default"] for key, spec in template["variables"]["properties"].items() if "default" in spec}
    rendered = apply_values(copy.deepcopy(template["job_configuration"]), {**defaults, **values})
    container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": key, "value": value} for key, value in container["env"].items()]
    container["args"] = shlex.split(container["args"])
    return rendered["job_manifest"]


def test_kubernetes_job_template_is_what_the_worker_expects_and_renders_a_valid_job():
    import jsonschema
    import kubernetes_validate
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import find_placeholders

    template = json.loads(KUBERNETES_TEMPLATE.read_text())
    default = kubernetes_default()
    # Every setting the kubernetes worker reads, and every variable it documents, is there.
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    assert used <= set(template["variables"]["properties"])
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)  # Prefect's own checks

    values = {
        "name": "retrain-run",
        "command": "prefect flow-run execute",
        "gpu": 1,
        "image": "registry.example/captioning:1.0",
        "labels": {"prefect.io/flow-run-id": "0"},
    }
    jsonschema.validate(values, template["variables"])
    job = render_job(template, values)
    kubernetes_validate.validate(job, "1.30", strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"] == values["image"]
    assert {"name": "CAPTIONING_ARTIFACTS_DIR", "value": "/pipeline/artifacts"} in container["env"]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "captioning-pipeline"
    assert job["metadata"]["namespace"] == "captioning"


def test_kubernetes_pool_and_deployment_are_accepted_by_the_server(prefect_api):
    """The server validates the template when the pool is created, and the job variables of a
    deployment against the template's variables (no worker needed)."""
    from prefect import get_client

    ensure_work_pool("scaleout-kubernetes", "kubernetes")
    deployment_id = deploy_retrain(
        "scaleout-kubernetes",
        {"params_file": None, "overrides": []},
        job_variables={"gpu": 1},
        image="registry.example/captioning:1.0",
        name="k8s",
    )
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("scaleout-kubernetes")
        deployment = client.read_deployment(deployment_id)
    assert pool.type == "kubernetes" and pool.base_job_template == json.loads(KUBERNETES_TEMPLATE.read_text())
    assert deployment.job_variables == {"gpu": 1, "image": "registry.example/captioning:1.0"}
    with pytest.raises(Exception, match="gpu"):  # a negative GPU count breaks the template's schema
        deploy_retrain(
            "scaleout-kubernetes",
            {"params_file": None, "overrides": []},
            job_variables={"gpu": -1},
            image="registry.example/captioning:1.0",
            name="k8s-bad",
        )
