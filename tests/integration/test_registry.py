"""The MLflow registry with metric gates, on a real sqlite store and (once) a real `mlflow server`."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from captioning.config import PARAMS_FILE
from captioning.registry.locate import Located, load_captioner, locate
from captioning.registry.store import RegistryError
from captioning.registry.versions import (
    CHAMPION,
    MODEL_DESCRIPTION,
    PREVIOUS,
    list_versions,
    register,
    rollback,
)
from captioning.settings import load_settings
from tests.fixtures.processes import MlflowServer

GATES = {"min": {"CIDEr": 45.0, "BLEU-4": 15.0}, "margin": {"CIDEr": 0.5}}
QUERY = "synthetic[test]-24"
LINEAGE = {"git_commit": "abc123", "data_hash": "d41d8cd9.dir", "params_hash": "0f0f0f"}
NAME = "captioner"
SETTINGS = load_settings(PARAMS_FILE, None, [f"register.model_name={NAME}"])


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite database (creating the tables takes seconds): copied per test."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(tmp_path, monkeypatch, empty_db) -> str:
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what locate() uses when given no tracking URI
    return uri


def metrics(cider: float, bleu4: float = 20.0) -> dict[str, float]:
    return {"BLEU-1": 60.0, "BLEU-4": bleu4, "METEOR": 20.0, "ROUGE-L": 45.0, "CIDEr": cider}


def reg(package, uri, cider, bleu4=20.0, query=QUERY, **extra):
    return register(
        package, metrics(cider, bleu4), query, SETTINGS, gates=GATES, tracking=uri, lineage=LINEAGE, **extra
    )


def aliases(uri: str) -> dict[str, str]:
    return {alias: row["version"] for row in list_versions(uri, NAME) for alias in row["aliases"]}


def version_tags(uri: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("captioner", version).tags


def test_better_model_promoted_worse_refused(tiny_model, store):
    first = reg(tiny_model, store, 50.0)
    assert first.promoted and first.version == "1" and first.previous is None
    assert aliases(store) == {CHAMPION: "1"}

    better = reg(tiny_model, store, 60.0)
    assert better.promoted and better.message.startswith("version 2 promoted")
    assert aliases(store) == {CHAMPION: "2", PREVIOUS: "1"}

    worse = reg(tiny_model, store, 60.3)  # better, but not by the 0.5 margin
    assert not worse.promoted and worse.version == "3"
    assert worse.message.startswith("gate failed")
    assert worse.reasons == ["CIDEr 60.30 does not beat the champion's 60.00 by 0.50"]
    low_bleu = reg(tiny_model, store, 90.0, bleu4=10.0)
    assert not low_bleu.promoted and low_bleu.reasons == ["BLEU-4 10.00 < minimum 15.00"]
    assert aliases(store) == {CHAMPION: "2", PREVIOUS: "1"}  # untouched

    tags = version_tags(store, "3")
    assert tags["gate"] == "failed" and "does not beat the champion" in tags["gate_reasons"]
    # lineage and metrics on every version
    assert tags["git_commit"] == "abc123" and tags["data_hash"] == "d41d8cd9.dir"
    assert tags["params_hash"] == "0f0f0f" and tags["data_query"] == QUERY
    assert float(tags["metric.CIDEr"]) == pytest.approx(60.3)
    rows = list_versions(store, NAME)
    assert [r["gate"] for r in rows] == ["passed", "passed", "failed", "failed"]
    assert rows[1]["aliases"] == [CHAMPION] and rows[1]["metrics"]["CIDEr"] == 60.0

    # Each version says in words what it is and what the gate decided; the model what it is.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    described = {v: client.get_model_version(NAME, v).description for v in ("1", "2", "3")}
    assert "Gate: passed; now champion (the first one)." in described["1"]
    assert "Gate: passed; now champion, replacing version 1." in described["2"]
    assert "Gate: failed (CIDEr 60.30 does not beat the champion's 60.00 by 0.50); version 2 stays" in described["3"]
    assert f"Test scores on `{QUERY}`:" in described["3"] and "CIDEr 60.30" in described["3"]
    assert "data hash `d41d8cd9.dir`" in described["3"]
    assert client.get_registered_model(NAME).description == MODEL_DESCRIPTION


def test_description_links_to_the_prefect_run_of_the_training(tiny_model, store):
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.create_experiment("captioning")
    url = "http://127.0.0.1:4200/runs/flow-run/0b9e7c1e"
    run = client.create_run(experiment, tags={"prefect.flow_run_url": url}).info.run_id
    result = reg(tiny_model, store, 50.0, run_id=run)
    assert client.get_model_version(NAME, result.version).description.endswith(f"Prefect flow run: {url}")


def test_champion_scored_on_another_query_is_not_compared_blindly(tiny_model, store):
    reg(tiny_model, store, 50.0, query="synthetic[test]-12")
    refused = reg(tiny_model, store, 80.0)
    assert not refused.promoted
    assert "was scored on 'synthetic[test]-12'" in refused.reasons[0]
    # With the champion re-scored on the same query, the comparison is made.
    accepted = reg(tiny_model, store, 80.0, champion_metrics=metrics(52.0))
    assert accepted.promoted and aliases(store) == {CHAMPION: accepted.version, PREVIOUS: "1"}


def test_default_lineage_is_collected(tiny_model, store):
    result = register(tiny_model, metrics(50.0), QUERY, SETTINGS, gates=GATES, tracking=store)
    tags = version_tags(store, result.version)
    assert tags["git_commit"] and tags["git_commit"] != "unknown"
    assert len(tags["params_hash"]) == 16 and tags["data_hash"]


def test_rollback_walks_back_the_champions(tiny_model, store):
    for cider in (50.0, 60.0, 70.0):
        reg(tiny_model, store, cider)
    assert aliases(store) == {CHAMPION: "3", PREVIOUS: "2"}

    assert rollback(store, NAME) == {"champion": "2", "previous": "1", "demoted": "3"}
    assert aliases(store) == {CHAMPION: "2", PREVIOUS: "1"}
    assert "rolled_back" in version_tags(store, "3")
    assert rollback(store, NAME) == {"champion": "1", "previous": None, "demoted": "2"}
    assert aliases(store) == {CHAMPION: "1"}
    with pytest.raises(RegistryError, match="no 'previous' version"):
        rollback(store, NAME)
    assert aliases(store) == {CHAMPION: "1"}


def test_racing_registrations_leave_consistent_aliases(tiny_model, store, tmp_path):
    """Two `captioning register` processes at once: the best wins, the alias chain is coherent."""
    reg(tiny_model, store, 50.0)
    procs = []
    for cider in (70.0, 60.0):
        path = tmp_path / f"metrics-{cider}.json"
        path.write_text(json.dumps({"metrics": metrics(cider)}))
        procs.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "captioning"),
                    "register",
                    "--model",
                    str(tiny_model),
                    "--metrics",
                    str(path),
                    "--data",
                    QUERY,
                    "--tracking-uri",
                    store,
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=os.environ.copy(),
            )
        )
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        outcomes.append(json.loads(out))
    assert sorted(o["version"] for o in outcomes) == ["2", "3"]

    rows = {r["version"]: r for r in list_versions(store, NAME)}
    champion = aliases(store)[CHAMPION]
    assert rows[champion]["metrics"]["CIDEr"] == 70.0
    previous = version_tags(store, champion)["previous_champion"]
    assert aliases(store)[PREVIOUS] == previous
    assert [r for r in rows.values() if CHAMPION in r["aliases"]] == [rows[champion]]
    # Every promotion beat the champion it replaced by the margin; refusals say why.
    for version, row in rows.items():
        assert row["gate"] in ("passed", "failed")
        replaced = version_tags(store, version).get("previous_champion")
        if replaced:
            assert row["metrics"]["CIDEr"] >= rows[replaced]["metrics"]["CIDEr"] + 0.5
        if row["gate"] == "failed":
            assert "does not beat the champion" in row["reasons"]


def test_resolve_champion_loads_into_captioner(tiny_model, store):
    import mlflow
    import pandas as pd
    from PIL import Image

    from captioning.inference.predict import Captioner

    reg(tiny_model, store, 50.0)
    located = locate(f"models:/captioner@{CHAMPION}")
    folder = located.path
    assert located.version == "1"
    assert (folder / "config.json").read_bytes() == (Path(tiny_model) / "config.json").read_bytes()
    assert locate("models:/captioner/1") == located  # downloaded once, by version
    assert locate(f"models:/captioner@{CHAMPION}", store, download=False) == located
    assert locate(tiny_model) == Located(None, Path(tiny_model).resolve())

    captioner = Captioner.load(folder, version=located.version)
    assert captioner.version == "1"
    assert load_captioner(f"models:/captioner@{CHAMPION}").version == "1"
    # The MLflow model loads through captioning.registry alone (no pickled code) and captions.
    model = mlflow.pyfunc.load_model(f"models:/captioner@{CHAMPION}")
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (200, 30, 30)).save(buffer, format="PNG")
    captions = model.predict(pd.DataFrame({"image": [buffer.getvalue()]}))
    assert len(captions) == 1 and isinstance(captions[0], str) and captions[0].strip()


def test_models_logged_with_the_old_loader_still_load(tiny_model, store):
    """Versions registered by earlier releases name captioning.registry (0.0) or captioning.pyfunc (0.1) as their loader."""
    import mlflow
    import yaml
    from PIL import Image

    from captioning.registry.pyfunc import CaptionerPyfunc, log_model

    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (30, 200, 30)).save(buffer, format="PNG")
    image = buffer.getvalue()
    mlflow.set_tracking_uri(store)
    with mlflow.start_run():
        oldest = log_model(Path(tiny_model).resolve(), loader_module="captioning.registry")
        old = log_model(Path(tiny_model).resolve(), loader_module="captioning.pyfunc")
    new = reg(tiny_model, store, 50.0).model_uri
    for uri, loader in ((oldest, "captioning.registry"), (old, "captioning.pyfunc"), (new, "captioning.registry")):
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        assert yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]["loader_module"] == loader
        model = mlflow.pyfunc.load_model(uri)
        assert isinstance(model._model_impl, CaptionerPyfunc)
        (caption,) = model.predict([image])
        assert isinstance(caption, str) and caption.strip()


def test_resolve_errors_are_clear(store, tmp_path):
    with pytest.raises(RegistryError, match="no such model package"):
        locate(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match="holds no captioning package"):
        locate(empty)


def test_evaluate_then_register_with_real_metrics(tiny_model, store, tmp_path):
    """evaluate_model on cached features -> HTML report -> registration gated on those numbers."""
    from captioning.evaluation.report import write_report
    from captioning.evaluation.scoring import evaluate_model
    from captioning.inference.predict import Captioner
    from harness.trained import VAL_QUERY, shared_dir, synthetic_data

    # The validation images: training cached their features already, no encoder run here.
    captioner = Captioner.load(tiny_model, with_encoder=False)
    with synthetic_data():
        result = evaluate_model(
            captioner,
            VAL_QUERY,
            captioner.settings_for(beam_size=3),
            attention_images=2,
            feature_dir=shared_dir() / "features",
        )
    assert result.info["feature_seconds"] < 5
    assert set(result.predictions) == set(result.references) and len(result.predictions) == 16
    assert 0 < result.metrics["CIDEr"] and 0 < result.metrics["BLEU-1"] <= 100
    assert all("CIDEr" in s and "BLEU-4" in s for s in result.per_image.values())
    assert len(result.attention) == 2
    for maps in result.attention.values():
        assert len(maps["words"]) == len(maps["maps"]) and len(maps["maps"][0]) == 49
    html = write_report(result, tmp_path / "report.html").read_text()
    assert html.count('class="word"') == sum(len(a["words"]) for a in result.attention.values())

    gates = {"min": {"CIDEr": result.metrics["CIDEr"] + 1}}
    refused = register(tiny_model, result.metrics, VAL_QUERY, SETTINGS, gates=gates, tracking=store, lineage=LINEAGE)
    assert not refused.promoted and "CIDEr" in refused.reasons[0]
    promoted = register(
        tiny_model, result.metrics, VAL_QUERY, SETTINGS, gates={"min": {"CIDEr": 1.0}}, tracking=store, lineage=LINEAGE
    )
    assert promoted.promoted and aliases(store) == {CHAMPION: promoted.version}


# --------------------------------------------------------------------------- a real server


@pytest.fixture()
def mlflow_server(tmp_path, empty_db):
    shutil.copyfile(empty_db, tmp_path / "server.db")
    server = MlflowServer(
        f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts", tmp_path / "server.log"
    ).start(timeout=90)
    yield server.url
    server.stop()


def test_gates_against_a_real_mlflow_server(tiny_model, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert reg(tiny_model, mlflow_server, 50.0).promoted
    assert reg(tiny_model, mlflow_server, 61.0).promoted
    refused = reg(tiny_model, mlflow_server, 40.0)
    assert not refused.promoted and refused.reasons[0] == "CIDEr 40.00 < minimum 45.00"
    assert aliases(mlflow_server) == {CHAMPION: "2", PREVIOUS: "1"}
    folder = locate(f"models:/captioner@{CHAMPION}").path  # artifacts through the server
    assert json.loads((folder / "config.json").read_text())["encoder"] == "lite0"
    assert rollback(mlflow_server, NAME)["champion"] == "1"
    assert aliases(mlflow_server) == {CHAMPION: "1"}


def test_registry_cli_bad_input_and_empty_store(store, tmp_path):
    from typer.testing import CliRunner

    from captioning.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["registry", "list", "--json", "--tracking-uri", store])
    assert listed.exit_code == 0 and json.loads(listed.output) == []
    rolled = runner.invoke(app, ["registry", "rollback", "--tracking-uri", store])
    assert rolled.exit_code == 1 and "no 'previous' version" in rolled.output
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text("[1, 2]")
    missing = runner.invoke(
        app, ["register", "--model", str(tmp_path / "nope"), "--metrics", str(metrics_file), "--tracking-uri", store]
    )
    assert missing.exit_code == 2 and "not a model package folder" in missing.output
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "config.json").write_text("{}")
    bad = runner.invoke(
        app, ["register", "--model", str(tmp_path / "pkg"), "--metrics", str(metrics_file), "--tracking-uri", store]
    )
    assert bad.exit_code == 2 and "expected a JSON object of metric values" in bad.output
    assert list_versions(store, NAME) == []  # nothing was registered
