"""What an operator sees after a synthetic retrain, in headless Chromium: the run's artifacts in the
Prefect UI (the evaluation table and the gate decision) and the model version's description in the
MLflow UI. A real Prefect server and a real MLflow server; the retrain runs as `make run` runs it
(`python -m flows.retrain --params FILE`), on a tiny slice of the synthetic data.

Screenshots go to reports/screens/ (the README shows two of them).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
import yaml

from tests.fixtures.processes import MlflowServer, PrefectServer, tail

pytestmark = pytest.mark.slow

TINY = {
    "data": {
        "dataset": "synthetic",
        "train_query": "synthetic[train]-64s1",
        "val_query": "synthetic[val]-16s1",
        "test_query": "synthetic[test]-16s1",
    },
    "features": {"batch_size": 16, "workers": 0},
    "vocab": {"min_freq": 1},
    "model": {"embed_dim": 32, "hidden_dim": 64, "attention_dim": 32},
    "train": {"epochs": 2, "batch_size": 32, "warmup_steps": 0, "val_images": 16, "progress": False, "threads": 1},
    "decoding": {"beam_size": 1},
    "evaluate": {"beam_sizes": [1, 2]},
    # laid over params.yaml key by key: every gate of params.yaml is named here
    "register": {"gates": {"min": {"CIDEr": 0.0, "BLEU-4": 0.0}, "margin": {"CIDEr": 0.0}}},
    "release": {"smoke": {"photos": 8}},
}


def screens():
    from captioning.config import PROJECT_ROOT

    folder = PROJECT_ROOT / "reports" / "screens"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """A finished retrain (version 1 promoted) on real Prefect and MLflow servers, left running
    for the browser: (Prefect server, MLflow server, the retrain's flow run)."""
    from captioning.config import PROJECT_ROOT

    root = tmp_path_factory.mktemp("operator")
    prefect = PrefectServer(root / "prefect").start()
    mlflow = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts", root / "mlflow.log")
    try:
        mlflow.start()
        overlay = root / "tiny.yaml"
        overlay.write_text(yaml.safe_dump(TINY), encoding="utf-8")
        env = prefect.env(
            MLFLOW_TRACKING_URI=mlflow.url,
            CAPTIONING_DATA_DIR=str(root / "data"),
            CAPTIONING_ARTIFACTS_DIR=str(root / "artifacts"),
            CAPTIONING_REPORTS_DIR=str(root / "reports"),
        )
        env.pop("CAPTIONING_PARAMS_OVERLAY", None)
        done = subprocess.run(
            [sys.executable, "-m", "flows.retrain", "--params", str(overlay)],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs = requests.post(
            f"{prefect.api}/flow_runs/filter", json={"flows": {"name": {"any_": ["retrain"]}}}, timeout=30
        ).json()
        assert [run["name"] for run in runs] == ["retrain-synthetic-v1"], tail(prefect.log)
        yield prefect, mlflow, runs[0]
    finally:
        mlflow.stop()
        prefect.stop()


def wait_text(page, text: str, timeout: float = 60_000) -> None:
    """Wait until the page shows `text` (the UIs render after loading their data)."""
    page.wait_for_function("text => document.body.innerText.includes(text)", arg=text, timeout=timeout)


def artifact_of(prefect: PrefectServer, run: dict, key: str) -> dict:
    found = requests.post(
        f"{prefect.api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}, "key": {"any_": [key]}}},
        timeout=30,
    ).json()
    assert len(found) == 1, found
    return found[0]


def test_prefect_ui_shows_the_evaluation_table_and_the_gate_decision(retrained, page):
    prefect, _, run = retrained
    page.goto(f"{prefect.url}/runs/flow-run/{run['id']}")
    wait_text(page, "retrain-synthetic-v1")
    page.get_by_text("Artifacts", exact=True).first.click()
    wait_text(page, "retrain-decision-synthetic")
    page.screenshot(path=str(screens() / "prefect-run-artifacts.png"), full_page=True)

    decision = artifact_of(prefect, run, "retrain-decision-synthetic")
    page.goto(f"{prefect.url}/artifacts/artifact/{decision['id']}")
    wait_text(page, "Gate decision")
    body = page.inner_text("body")
    assert "Version 1 is the new champion" in body
    assert "Evaluation" in body and "candidate" in body and "beam 2" in body  # the comparison table
    assert "CIDEr" in body and "pass" in body  # the gate, metric by metric
    page.screenshot(path=str(screens() / "prefect-retrain-decision.png"), full_page=True)


def test_mlflow_ui_shows_the_version_description(retrained, page):
    _, mlflow, run = retrained
    page.goto(f"{mlflow.url}/#/models/captioner/versions/1")
    wait_text(page, "Gate: passed")
    body = page.inner_text("body")
    assert "Settings that differ from params.yaml" in body and "train.epochs=2" in body
    assert "Test scores on" in body and "Prefect flow run" in body
    page.screenshot(path=str(screens() / "mlflow-model-version.png"), full_page=True)
