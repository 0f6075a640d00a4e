"""The retraining flow against a real Prefect server on 127.0.0.1.

One server for the session (its own PREFECT_HOME, a free port). The flow runs on a small
synthetic query with a tiny model; flow and task states are read back through the Prefect API.
Scenarios: a full run that promotes a model, a second run with nothing new (a quick no-op),
a run whose metric gate refuses the model (champion untouched), a run that trains on the stored
feedback and one stopped by a broken feedback image, and a run on data with a corrupt image
(validation fails, nothing is trained).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

# A tiny model on a small synthetic slice: training takes seconds on CPU.
SMALL = [
    "data.dataset=synthetic",
    "data.train_query=synthetic[train]-64s1",
    "data.val_query=synthetic[val]-16s1",
    "data.test_query=synthetic[test]-16s1",
    "features.batch_size=16",
    "vocab.min_freq=1",
    "model.embed_dim=32",
    "model.hidden_dim=64",
    "model.attention_dim=32",
    "train.epochs=1",
    "train.batch_size=32",
    "train.warmup_steps=0",
    "train.val_images=16",
    "train.progress=false",
    "decoding.beam_size=1",
    "evaluate.beam_sizes=[1]",
    "register.gates.min={CIDEr: 0.0}",
    "register.gates.margin={}",
    "release.smoke.photos=8",  # the smoke set comes from the validation query (16 images here)
]
IMPOSSIBLE_GATE = "register.gates.min={CIDEr: 1000.0}"
NO_LIVE_DRIFT = "no live drift figures: no stack running and retrain.drift_source unset"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A Prefect server started once for the session; this process talks to it."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    prefect = Path(sys.executable).parent / "prefect"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not ready: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        os.environ["PREFECT_API_URL"] = url  # for subprocesses and settings read later
        with temporary_settings(
            {PREFECT_API_URL: url, PREFECT_HOME: str(home), PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(home / "storage")}
        ):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        os.killpg(server.pid, signal.SIGTERM)  # the server and the processes it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Data, artifacts, reports and an MLflow store shared by the scenarios that build on each other."""
    root = tmp_path_factory.mktemp("pipeline")
    return {
        "data": root / "data",
        "artifacts": root / "artifacts",
        "reports": root / "reports",
        "mlflow": root / "mlflow.db",
    }


def _use(monkeypatch, space: dict[str, Path]) -> str:
    tracking = f"sqlite:///{space['mlflow']}"
    monkeypatch.setenv("CAPTIONING_DATA_DIR", str(space["data"]))
    monkeypatch.setenv("CAPTIONING_ARTIFACTS_DIR", str(space["artifacts"]))
    monkeypatch.setenv("CAPTIONING_REPORTS_DIR", str(space["reports"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return tracking


def _run(overrides: list[str], force: bool = False):
    from flows.retrain import retrain_flow

    return retrain_flow(overrides=overrides, force=force, return_state=True)


def _tree(flow_run_id, settle: float = 30.0) -> tuple[dict, list]:
    """Every flow run under `flow_run_id` (by flow name) and all their task runs, once states settle.

    Task run states reach the server as events, a moment after the flow returns: poll until final.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentTaskRunId,
    )

    deadline = time.monotonic() + settle
    with get_client(sync_client=True) as client:
        while True:
            flows: dict[str, list] = {}
            tasks: list = []
            frontier = [flow_run_id]
            while frontier:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=frontier)))
                for run in runs:
                    flows.setdefault(client.read_flow(run.flow_id).name, []).append(run)
                found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=frontier)))
                tasks.extend(found)
                children = (
                    client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(
                            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in found])
                        )
                    )
                    if found
                    else []
                )
                frontier = [child.id for child in children]
            settled = all(t.state is not None and t.state.is_final() for t in tasks)
            if settled or time.monotonic() > deadline:
                return flows, tasks
            time.sleep(0.5)


def _task_names(tasks: list) -> set[str]:
    """Task names without the run suffix ("train-model-3f2" -> "train-model")."""
    return {t.name.rsplit("-", 1)[0] for t in tasks}


def _artifacts(flows: dict) -> dict[str, list]:
    """The artifacts of every flow run of a tree (and of their task runs), by key, with their data read."""
    import json

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    ids = [run.id for runs in flows.values() for run in runs]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    by_key: dict[str, list] = {}
    for artifact in found:
        data = artifact.data
        if artifact.type == "table" and isinstance(data, str):
            data = json.loads(data)
        by_key.setdefault(artifact.key, []).append((artifact.type, data, artifact.description))
    return by_key


def _versions(tracking: str) -> list[dict]:
    from captioning.registry.versions import list_versions

    return list_versions(tracking, "captioner")


@pytest.fixture(scope="session")
def promoted_run(prefect_api, workspace):
    """The first full run: trains, evaluates, registers and promotes (no champion yet)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        tracking = _use(monkeypatch, workspace)
        state = _run(SMALL)
        return state, tracking


def test_full_run_promotes_and_every_step_completes(promoted_run):
    state, tracking = promoted_run
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["status"] == "promoted" and summary["promoted"] is True
    assert summary["metrics"]["CIDEr"] >= 0 and "BLEU-4" in summary["metrics"]

    flows, tasks = _tree(state.state_details.flow_run_id)
    assert set(flows) == {"retrain", "acquisition", "validation", "training", "evaluation", "registration"}
    for name, runs in flows.items():
        assert [run.state.type.value for run in runs] == ["COMPLETED"], name
    names = _task_names(tasks)
    assert {
        "acquire-dataset",
        "check-for-new-data",
        "validate-dataset",
        "build-features",
        "train-model",
        "evaluate-model",
        "register-model",
        "record-training",
        "live-drift",
    } <= names
    assert all(t.state.is_completed() for t in tasks), [(t.name, t.state.name) for t in tasks]

    versions = _versions(tracking)
    assert [(v["version"], v["aliases"], v["gate"]) for v in versions] == [("1", ["champion"], "passed")]
    assert Path(summary["package_dir"], "weights.pt").is_file()
    assert Path(summary["comparison"]["markdown"]).read_text().count("candidate") == 1


def test_full_run_is_named_tagged_and_shows_its_artifacts(promoted_run):
    from mlflow import MlflowClient

    state, tracking = promoted_run
    flows, _ = _tree(state.state_details.flow_run_id)
    assert flows["retrain"][0].name == "retrain-synthetic-v1"
    assert flows["training"][0].name == "train-attention"
    assert flows["acquisition"][0].name == "acquire-synthetic"
    assert flows["validation"][0].name == "validate-synthetic"
    for name in ("retrain", "validation", "training", "evaluation", "registration"):
        tags = flows[name][0].tags
        assert {"dataset:synthetic", "decoder:attention"} <= set(tags), (name, tags)
        assert any(tag.startswith("data:") and tag != "data:none" for tag in tags), (name, tags)

    shown = _artifacts(flows)
    assert {
        "acquisition-synthetic",
        "validation-synthetic",
        "validation-report-synthetic",
        "features-lite0",
        "training-progress",
        "training-epochs",
        "training-mlflow-run",
        "evaluation-comparison",
        "evaluation-report",
        "registration-gate",
        "registration-verdict",
        "retrain-decision-synthetic",
    } <= set(shown)
    assert shown["training-progress"][0][1] == 100.0
    assert "DVC hash of data/" in shown["acquisition-synthetic"][0][1]
    checks = shown["validation-synthetic"][0][1]
    assert checks and all(row["result"] == "passed" for row in checks)
    assert "](file://" in shown["validation-report-synthetic"][0][1]  # a link: [text](url)
    assert [row["epoch"] for row in shown["training-epochs"][0][1]] == [1]
    comparison = shown["evaluation-comparison"][0][1]
    assert [row["model"] for row in comparison] == ["candidate"] and "CIDEr" in comparison[0]
    assert shown["evaluation-report"][0][1].endswith("/reports/flows/evaluation.html)")
    gate = shown["registration-gate"][0][1]
    assert [(row["metric"], row["outcome"]) for row in gate] == [("CIDEr", "pass")]
    assert "Version 1 is the new champion" in shown["registration-verdict"][0][1]
    decision = shown["retrain-decision-synthetic"][0][1]
    assert "## Evaluation" in decision and "| candidate | greedy |" in decision and "| CIDEr |" in decision
    # No stack runs here and params.yaml names no drift source: the section says so.
    assert decision.endswith(f"## Live photos\n\n{NO_LIVE_DRIFT}\n")
    assert state.result()["live_drift"]["reason"] == NO_LIVE_DRIFT

    # The MLflow run of the training links to its Prefect flow run, and the artifact back to it.
    client = MlflowClient(tracking)
    run_id = next(iter(client.search_model_versions("name='captioner'"))).run_id
    url = client.get_run(run_id).data.tags["prefect.flow_run_url"]
    assert url.endswith(f"/runs/flow-run/{flows['training'][0].id}")
    assert run_id in shown["training-mlflow-run"][0][1]
    description = client.get_model_version("captioner", "1").description
    assert "Gate: passed; now champion (the first one)." in description and url in description


def test_nothing_new_is_a_quick_no_op(promoted_run, workspace, monkeypatch):
    _use(monkeypatch, workspace)
    state = _run(SMALL)
    assert state.is_completed() and state.name == "Skipped"
    assert "nothing new" in state.message
    flows, tasks = _tree(state.state_details.flow_run_id)
    assert set(flows) == {"retrain", "acquisition"}  # no validation, training, evaluation, registration
    assert "train-model" not in _task_names(tasks)
    assert flows["retrain"][0].state_name == "Skipped"
    assert flows["retrain"][0].name == "retrain-synthetic"  # nothing registered: no version in the name
    # Its decision, under the trained runs' key: why nothing was trained, and the live photos' drift.
    kind, decision, description = _artifacts(flows)["retrain-decision-synthetic"][0]
    assert kind == "markdown" and description == f"skipped: {state.message}"
    assert decision.startswith("# Retrain of synthetic: skipped\n") and state.message in decision
    assert decision.endswith(f"## Live photos\n\n{NO_LIVE_DRIFT}\n")


def test_new_feedback_or_new_settings_call_for_retraining(promoted_run, workspace, monkeypatch):
    from captioning.data.feedback import FeedbackStore
    from flows import load_settings
    from tasks.state import check_for_new_data

    _use(monkeypatch, workspace)
    params = load_settings(overrides=SMALL)
    assert check_for_new_data.fn("synthetic", params)["new"] is False

    changed = check_for_new_data.fn("synthetic", load_settings(overrides=SMALL + ["train.lr=2e-3"]))
    assert changed["new"] and "training settings changed" in changed["reasons"][0]
    # Gates are not training settings: changing them alone retrains nothing.
    assert check_for_new_data.fn("synthetic", load_settings(overrides=SMALL + [IMPOSSIBLE_GATE]))["new"] is False

    image = next((workspace["data"] / "synthetic" / "images").glob("*.png")).read_bytes()
    store = FeedbackStore()
    stored = store.add(image, "a red circle in the middle")
    assert check_for_new_data.fn("synthetic", params)["new"] is False  # stored, not admitted yet
    store.approve([stored.id])
    after = check_for_new_data.fn("synthetic", params)
    assert after["new"] and after["feedback_rows"] == 1
    assert "1 feedback row(s) stored since" in after["reasons"][0]
    # Leave the workspace as it was for the other scenarios.
    (workspace["data"] / "feedback" / "feedback.db").unlink()


def test_gate_refusal_completes_and_leaves_the_champion(promoted_run, workspace, monkeypatch):
    tracking = _use(monkeypatch, workspace)
    before = _versions(tracking)
    state = _run(SMALL + [IMPOSSIBLE_GATE], force=True)
    assert state.is_completed(), state.message  # a refused model is an outcome, not a crash
    summary = state.result()
    assert summary["status"] == "gate failed" and summary["promoted"] is False
    assert state.message.startswith("gate failed")
    assert any("CIDEr" in reason and "1000" in reason for reason in summary["gate_reasons"])

    after = _versions(tracking)
    champion = [v["version"] for v in after if "champion" in v["aliases"]]
    assert champion == [v["version"] for v in before if "champion" in v["aliases"]] == ["1"]
    assert after[-1]["version"] == str(len(before) + 1) and after[-1]["gate"] == "failed"

    flows, tasks = _tree(state.state_details.flow_run_id)
    assert all(run.state.is_completed() for runs in flows.values() for run in runs)
    assert {"train-model", "register-model"} <= _task_names(tasks)


def _logs(flow_run_id, text: str, settle: float = 15.0) -> list[str]:
    """Messages of a flow run's logs that contain `text` (logs reach the server in batches: poll)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + settle
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found = [log.message for log in logs if text in log.message]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def _stopped_before_training(state, dataset: str, culprit: str):
    """Check that a run failed on the validation of `dataset`, naming `culprit`, with no step after
    validation run; returns its (flows, tasks) tree."""
    assert state.is_failed()
    assert "stopped before training" in state.message and f"validation of {dataset} failed" in state.message
    assert culprit in state.message
    flows, tasks = _tree(state.state_details.flow_run_id)
    assert set(flows) == {"retrain", "acquisition", "validation"}
    assert not _task_names(tasks) & {"build-features", "train-model", "evaluate-model", "register-model"}
    return flows, tasks


def test_feedback_is_validated_and_trained_on(promoted_run, workspace, monkeypatch):
    """Corrections stored by the service: the next run validates them and trains on
    <train_query>+feedback; a correction whose image no longer decodes stops a run before training."""
    import json
    import shutil

    from mlflow.tracking import MlflowClient

    from captioning.data.feedback import FeedbackStore
    from captioning.vocab import Vocabulary

    tracking = _use(monkeypatch, workspace)
    union = "synthetic[train]-64s1+feedback"
    images = sorted((workspace["data"] / "synthetic" / "images").glob("*.png"))
    store = FeedbackStore()  # the SQLite file the service writes: data/feedback/feedback.db
    for path, caption in zip(images[:2], ["a red teapot in the middle", "a teapot beside a kettle"]):
        store.approve([store.add(path.read_bytes(), caption).id])  # admitted by an operator
    try:
        state = _run(SMALL)
        assert state.is_completed(), state.message
        summary = state.result()
        assert summary["status"] == "promoted" and summary["train_query"] == union
        assert any("2 feedback row(s) stored since" in reason for reason in summary["reasons"])
        run_id = state.state_details.flow_run_id
        flows, tasks = _tree(run_id)
        assert sorted(run.parameters["dataset"] for run in flows["validation"]) == ["feedback", "synthetic"]
        assert all(run.state.is_completed() for runs in flows.values() for run in runs)
        assert {"train-model", "register-model"} <= _task_names(tasks)
        assert _logs(run_id, f"training data: {union}")

        vocab = Vocabulary.from_dict(json.loads(Path(summary["package_dir"], "vocab.json").read_text()))
        assert "teapot" in vocab and "kettle" in vocab  # words only the feedback uses
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name("captioning")
        runs = client.search_runs([experiment.experiment_id], f"tags.data_query = '{union}'")
        assert len(runs) == 1 and runs[0].data.params["data.train_query"] == union

        # A stored image that no longer decodes: validation of the feedback fails, nothing trains.
        broken = store.add(images[2].read_bytes(), "a teapot that will not decode")
        store.approve([broken.id])
        Path(broken.image_path).write_bytes(b"\xff\xd8\xff this is not a JPEG any more")
        state_file = workspace["artifacts"] / "retrain" / "state.json"
        recorded, versions = state_file.read_text(), _versions(tracking)
        flows, _ = _stopped_before_training(_run(SMALL), "feedback", broken.image_sha256)
        outcome = {run.parameters["dataset"]: run.state.type.value for run in flows["validation"]}
        assert outcome == {"synthetic": "COMPLETED", "feedback": "FAILED"}
        assert _versions(tracking) == versions and state_file.read_text() == recorded
    finally:
        # Leave the workspace without feedback for the other scenarios.
        shutil.rmtree(workspace["data"] / "feedback", ignore_errors=True)


def test_bad_data_stops_the_run_before_training(prefect_api, tmp_path, monkeypatch):
    from captioning.data.datasets import load_dataset

    space = {
        "data": tmp_path / "data",
        "artifacts": tmp_path / "artifacts",
        "reports": tmp_path / "reports",
        "mlflow": tmp_path / "mlflow.db",
    }
    tracking = _use(monkeypatch, space)
    from flows import load_settings

    dataset = load_dataset("synthetic", synthetic=load_settings(overrides=SMALL).synthetic)  # generated afresh
    broken = Path(next(r.path for r in dataset.records if r.split == "train"))
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")

    flows, tasks = _stopped_before_training(_run(SMALL), "synthetic", broken.name)
    assert flows["retrain"][0].state.type.value == "FAILED"
    assert flows["validation"][0].state.type.value == "FAILED"
    assert "validate-dataset" in _task_names(tasks)
    assert _versions(tracking) == []
    assert not (space["artifacts"] / "retrain" / "state.json").exists()


def test_serve_creates_a_deployment_on_the_params_cron(prefect_api, tmp_path):
    from prefect import get_client

    from captioning.config import PROJECT_ROOT
    from flows import load_settings
    from flows.retrain import DEPLOYMENT

    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    log = open(tmp_path / "serve.log", "w")
    served = subprocess.Popen(
        [sys.executable, "-m", "flows.retrain", "--serve"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        deployment = None
        with get_client(sync_client=True) as client:
            while deployment is None:
                assert served.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "no deployment after 90 s"
                try:
                    deployment = client.read_deployment_by_name(f"retrain/{DEPLOYMENT}")
                except Exception:  # not created yet
                    time.sleep(0.5)
        crons = [schedule.schedule.cron for schedule in deployment.schedules]
        assert crons == [load_settings().retrain.cron]
        assert deployment.parameters == {"params_file": None, "overrides": []}
    finally:
        os.killpg(served.pid, signal.SIGINT)
        try:
            served.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(served.pid, signal.SIGKILL)
        log.close()
