"""MLflow on PostgreSQL: `mlflow server --backend-store-uri postgresql://... --artifacts-destination DIR`.

Proves, against a throwaway PostgreSQL server and a real MLflow server: training runs are tracked
(rows in PostgreSQL, files in the separate artifact root); the registry's gates, aliases and
rollback work, and the service's champion lookup follows them; registrations racing from two
"machines" (other working and artifact folders, so no shared lock file) stay consistent, because
alias changes are serialised through MLflow itself (`registry_lock`), which a held lock shows,
and a lock left by a dead holder is broken once its lease is over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioning.config import PARAMS_FILE
from captioning.registry import lock, store, versions
from captioning.registry.lock import LOCK_SUFFIX
from captioning.registry.versions import CHAMPION, PREVIOUS
from captioning.settings import load_settings
from harness.trained import train_tiny_model
from tests.fixtures.processes import BIN, MlflowServer, child_env, start, stop, tail, wait_until

pytestmark = pytest.mark.scaleout

GATES = {"min": {"CIDEr": 45.0, "BLEU-4": 15.0}, "margin": {"CIDEr": 0.5}}  # as params.yaml
QUERY = "synthetic[test]-24"
LINEAGE = {"git_commit": "abc123", "data_hash": "d41d8cd9.dir", "params_hash": "0f0f0f"}
EPOCHS = 2
# Registers a package from another process: argv = package, tracking URI, model name, CIDEr.
REGISTER = """
import sys
from captioning.config import PARAMS_FILE
from captioning.registry.versions import register
from captioning.settings import load_settings
metrics = {"CIDEr": float(sys.argv[4]), "BLEU-4": 20.0}
result = register(sys.argv[1], metrics, "synthetic[test]-24", load_settings(PARAMS_FILE), tracking=sys.argv[2],
                  name=sys.argv[3],
                  gates={"min": {"CIDEr": 45.0, "BLEU-4": 15.0}, "margin": {"CIDEr": 0.5}}, lineage={})
print(result.version, result.promoted)
"""


@pytest.fixture(scope="module")
def server(postgres_server, tmp_path_factory) -> dict:
    """An MLflow server whose backend store is a fresh PostgreSQL database."""
    folder = tmp_path_factory.mktemp("mlflow-pg")
    database = postgres_server.new_database("mlflow")
    mlflow = MlflowServer(database, folder / "artifacts", folder / "server.log").start()
    try:
        yield {"url": mlflow.url, "database": database, "artifacts": folder / "artifacts", "log": folder / "server.log"}
    finally:
        mlflow.stop()


def sql(database: str, query: str, **values) -> list[tuple]:
    """Rows straight from the PostgreSQL database behind the server."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(database)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sqlalchemy.text(query), values)]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory) -> dict:
    """A tiny model trained with its run tracked on the server."""
    from captioning.training.tracking import MLflowCallback

    tracker = MLflowCallback(server["url"], "scaleout")
    package = train_tiny_model(tmp_path_factory.mktemp("pg-train"), epochs=EPOCHS, callbacks=[tracker])
    return {"package": package, "run_id": tracker.run_id}


def reg(trained, server, cider: float, name: str, bleu4: float = 20.0):
    return versions.register(
        trained["package"],
        {"CIDEr": cider, "BLEU-4": bleu4},
        QUERY,
        load_settings(PARAMS_FILE),
        gates=GATES,
        tracking=server["url"],
        lineage=LINEAGE,
        name=name,
    )


def aliases(server, name: str) -> dict[str, str]:
    return {alias: row["version"] for row in versions.list_versions(server["url"], name) for alias in row["aliases"]}


def test_training_is_tracked_in_postgresql_with_artifacts_in_their_own_root(server, trained):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server["url"])
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.decoder"] == "attention"
    assert len(client.get_metric_history(trained["run_id"], "val_CIDEr")) == EPOCHS
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # files go through the server
    local = Path(client.download_artifacts(trained["run_id"], "model/config.json", str(server["artifacts"].parent)))
    assert local.read_bytes() == (trained["package"] / "config.json").read_bytes()

    assert sql(server["database"], "SELECT version()")[0][0].startswith("PostgreSQL")
    stored = sql(server["database"], "SELECT status FROM runs WHERE run_uuid = :run", run=trained["run_id"])
    assert stored == [("FINISHED",)]
    epochs = sql(
        server["database"],
        "SELECT count(*) FROM metrics WHERE run_uuid = :run AND key = 'val_CIDEr'",
        run=trained["run_id"],
    )
    assert epochs == [(EPOCHS,)]
    on_disk = list(server["artifacts"].rglob(f"{trained['run_id']}/artifacts/model/weights.pt"))
    assert len(on_disk) == 1


def test_gates_aliases_rollback_and_the_services_champion_lookup(server, trained, monkeypatch):
    from captioning.registry import locate as located_in_registry
    from captioning.serving.model_source import locate

    name = "pg-gates"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])  # what the service reads
    assert reg(trained, server, 50.0, name).promoted
    assert reg(trained, server, 61.0, name).promoted
    assert reg(trained, server, 40.0, name).reasons[0] == "CIDEr 40.00 < minimum 45.00"
    assert reg(trained, server, 61.2, name).reasons == ["CIDEr 61.20 does not beat the champion's 61.00 by 0.50"]
    assert aliases(server, name) == {CHAMPION: "2", PREVIOUS: "1"}
    assert [row["gate"] for row in versions.list_versions(server["url"], name)] == [
        "passed",
        "passed",
        "failed",
        "failed",
    ]
    assert locate(f"models:/{name}@{CHAMPION}", None, download=False).version == "2"
    folder = located_in_registry.locate(f"models:/{name}@{CHAMPION}").path  # downloaded through the server
    assert (folder / "weights.pt").read_bytes() == (trained["package"] / "weights.pt").read_bytes()

    assert versions.rollback(server["url"], name) == {"champion": "1", "previous": None, "demoted": "2"}
    assert locate(f"models:/{name}@{CHAMPION}", None, download=False).version == "1"
    rows = sql(server["database"], "SELECT alias, version FROM registered_model_aliases WHERE name = :name", name=name)
    assert rows == [(CHAMPION, 1)]
    assert (
        sql(server["database"], "SELECT name FROM registered_models WHERE name LIKE :lock", lock=f"%{LOCK_SUFFIX}%")
        == []
    )  # every lock released


def test_registrations_racing_from_two_machines_stay_consistent(server, trained, tmp_path):
    """Two `captioning register` processes at once, each in its own working and artifacts folder."""
    reg(trained, server, 50.0, "captioner")
    procs = []
    for cider in (70.0, 60.0):
        machine = tmp_path / f"machine-{cider:.0f}"
        machine.mkdir()
        (machine / "metrics.json").write_text(json.dumps({"CIDEr": cider, "BLEU-4": 20.0}))
        env = child_env(CAPTIONING_ARTIFACTS_DIR=str(machine / "artifacts"), MLFLOW_TRACKING_URI=server["url"])
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "captioning"),
                    "register",
                    "--model",
                    str(trained["package"]),
                    "--metrics",
                    "metrics.json",
                    "--data",
                    QUERY,
                    "--tracking-uri",
                    server["url"],
                    "--json",
                ],
                cwd=machine,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        outcomes.append(json.loads(out))
    assert sorted(outcome["version"] for outcome in outcomes) == ["2", "3"]

    rows = {row["version"]: row for row in versions.list_versions(server["url"], "captioner")}
    champion = aliases(server, "captioner")[CHAMPION]
    assert rows[champion]["metrics"]["CIDEr"] == 70.0
    tags = {
        version: store.mlflow_client(server["url"]).get_model_version("captioner", version).tags for version in rows
    }
    assert aliases(server, "captioner")[PREVIOUS] == tags[champion]["previous_champion"]
    for version, row in rows.items():
        replaced = tags[version].get("previous_champion")
        if replaced:  # every promotion beat the champion it replaced, by the margin
            assert row["metrics"]["CIDEr"] >= rows[replaced]["metrics"]["CIDEr"] + 0.5
        if row["gate"] == "failed":
            assert "does not beat the champion" in row["reasons"]
    assert not list(tmp_path.rglob("*.lock"))  # no lock file on either "machine"


def test_a_held_lock_makes_a_registration_wait_and_a_dead_holders_lock_is_broken(server, trained, tmp_path):
    name = "pg-lock"
    reg(trained, server, 50.0, name)
    client = store.mlflow_client(server["url"])
    with lock.registry_lock(server["url"], name):
        owner = client.get_registered_model(f"{name}{LOCK_SUFFIX}").tags["owner"]
        assert owner.split(":")[1] == str(os.getpid())
        proc = start(
            [sys.executable, "-c", REGISTER, str(trained["package"]), server["url"], name, "70"],
            tmp_path / "register.log",
            child_env(),
        )
        # The version is created outside the lock; the aliases wait for it.
        wait_until(
            lambda: len(versions.list_versions(server["url"], name)) == 2 or proc.poll() is not None,
            120,
            "second version",
        )
        time.sleep(2.0)
        assert proc.poll() is None, tail(tmp_path / "register.log")
        assert aliases(server, name) == {CHAMPION: "1"}
    assert proc.wait(timeout=120) == 0, tail(tmp_path / "register.log")
    assert "2 True" in (tmp_path / "register.log").read_text()
    assert aliases(server, name) == {CHAMPION: "2", PREVIOUS: "1"}

    # A holder that died: its lease is over, so the next one breaks the lock and goes on.
    client.create_registered_model(f"{name}{LOCK_SUFFIX}", tags={"owner": "gone:1:dead", "expires": "0"})
    assert versions.rollback(server["url"], name)["champion"] == "1"
    assert (
        sql(
            server["database"], "SELECT name FROM registered_models WHERE name LIKE :lock", lock=f"{name}{LOCK_SUFFIX}%"
        )
        == []
    )
    stop(proc)
