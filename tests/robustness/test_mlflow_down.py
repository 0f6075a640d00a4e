"""MLflow down: serving goes on, model servers start without it, registrations fail cleanly.

One real tracking server for the module (`mlflow server`, sqlite backend, artifacts in their own
folder) that is stopped and started again on the same port, and the real service polling it for
its champion. The tests run in this order, each from the state the previous one left:

1. MLflow stopped (SIGTERM): the running service keeps captioning and stays ready while its registry
   polls fail; a model server starts from the bento of the champion with MLflow still down; the
   package downloaded while MLflow was up resolves again from the local cache.
2. A registration with MLflow down fails within seconds with one line naming the server, leaves
   the aliases alone, and succeeds once the server is back.
3. MLflow killed (SIGKILL) in the middle of a registration, while it holds the registry lock:
   the aliases stay coherent, and the same registration run again succeeds at once.
4. MLflow killed between the two alias writes of a registration (the narrowest window, on purpose):
   the aliases stay coherent, and the same process registers again at once.

Each test also starts from wherever the server is, so one can be run alone.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from captioning.config import PARAMS_FILE, PROJECT_ROOT
from captioning.registry.locate import locate
from captioning.registry.lock import LOCK_SUFFIX
from captioning.registry.store import HTTP_DEFAULTS, RegistryError, bounded_http_retries, mlflow_client
from captioning.registry.versions import CHAMPION, PREVIOUS, list_versions, register
from captioning.settings import load_settings
from harness import serving
from tests.fixtures.processes import BIN, MlflowServer, child_env, free_port, start, stop, tail, wait_for_http
from tests.robustness.conftest import record_figures

NAME = "captioner"
QUERY = "synthetic[test]"
SETTINGS = load_settings(PARAMS_FILE, None, [f"register.model_name={NAME}"])
DOWN_SECONDS = 10.0  # how long the running service is watched with MLflow stopped
FAIL_FAST_SECONDS = 30.0  # a registration against a stopped server reports it within this (CLI start included)
FIGURES: dict = {"faults_injected": 0, "faults": [], "requests_served_while_mlflow_down": 0, "unexpected_5xx": 0}


@dataclass
class Scene:
    root: Path
    mlflow: MlflowServer
    service: serving.ServiceProcess
    package: Path
    cached: Path  # models:/captioner/1 as downloaded while MLflow was up
    bento: Path  # the .bento archive of version 1
    env: dict[str, str]  # for the `captioning` commands

    @property
    def db(self) -> Path:
        return self.root / "mlflow.db"


@pytest.fixture(scope="module")
def scene(robust_model, tmp_path_factory):
    """MLflow up with version 1 as champion; the service serving models:/captioner@champion, polling
    every second; the bento of version 1, built meanwhile."""
    root = tmp_path_factory.mktemp("mlflow-down")
    artifacts = root / "artifacts"
    env = child_env(
        CAPTIONING_ARTIFACTS_DIR=str(artifacts),
        CAPTIONING_DATA_DIR=str(root / "data"),
        CAPTIONING_REPORTS_DIR=str(root / "reports"),
        BENTOML_HOME=str(root / "bentoml-build"),
    )
    for key in ("CAPTIONING_MODEL", "CAPTIONING_API_KEY", "MLFLOW_TRACKING_URI", *HTTP_DEFAULTS):
        env.pop(key, None)  # the commands' own defaults, and no model but the one named
    bento = root / "captioning-v1.bento"
    build = start(
        [sys.executable, "-m", "bento", "build", "--package", str(robust_model), "--version", "1", "--out", str(bento)],
        root / "build.log",
        env,
        cwd=PROJECT_ROOT,
    )
    mlflow = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "mlflow-artifacts", root / "mlflow.log")
    service = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTIONING_ARTIFACTS_DIR", str(artifacts))  # where locate() caches downloads
        try:
            mlflow.start()
            first = register(robust_model, {"CIDEr": 10.0}, QUERY, SETTINGS, gates={}, tracking=mlflow.url, lineage={})
            assert (first.version, first.promoted) == ("1", True), first.message
            cached = locate(f"models:/{NAME}/1", mlflow.url).path
            # The service's MLflow client gives up on a dead server as the commands' does (MLflow's own
            # default retries for about four minutes), so each failed poll shows in its log.
            service = serving.start_service(
                f"models:/{NAME}@{CHAMPION}",
                root / "service",
                {
                    "MLFLOW_TRACKING_URI": mlflow.url,
                    "CAPTIONING_POLL_SECONDS": "1",
                    "OMP_NUM_THREADS": "1",
                    "CAPTIONING_TORCH_THREADS": "1",
                    **HTTP_DEFAULTS,
                },
            )
            assert build.wait(timeout=300) == 0, tail(root / "build.log")
            env["MLFLOW_TRACKING_URI"] = mlflow.url
            yield Scene(root, mlflow, service, robust_model, cached, bento, env)
        finally:
            if service is not None:
                service.stop()
            mlflow.stop()
            stop(build)


def captioning(scene: Scene, *args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """Run the `captioning` command; (result, seconds taken)."""
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "captioning"), *args], cwd=scene.root, env=scene.env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started


def register_args(scene: Scene, metrics: dict[str, float], folder: Path) -> list[str]:
    path = folder / "metrics.json"
    path.write_text(json.dumps(metrics))
    return [
        "register",
        "--model",
        str(scene.package),
        "--metrics",
        str(path),
        "--data",
        QUERY,
        "--tracking-uri",
        scene.mlflow.url,
        "--json",
    ]


def aliases(url: str) -> dict[str, str]:
    return {alias: row["version"] for row in list_versions(url, NAME) for alias in row["aliases"]}


def assert_coherent(url: str, champions: tuple[str, ...]) -> dict[str, str]:
    """champion is one of `champions`; `previous` is absent or the version the champion replaced;
    every alias names an existing version that passed its gate. Returns the aliases."""
    rows = {row["version"]: row for row in list_versions(url, NAME)}
    found = aliases(url)
    assert found.get(CHAMPION) in champions, found
    for alias, version in found.items():
        assert version in rows and rows[version]["gate"] == "passed", (alias, version, rows)
    replaced = mlflow_client(url).get_model_version(NAME, found[CHAMPION]).tags.get("previous_champion")
    assert found.get(PREVIOUS) in (None, replaced), (found, replaced)
    return found


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def watch(url: str, image: bytes, until: float, answers: list[int]) -> None:
    """Caption and check readiness in turn until `until`; every status (0: no answer) goes to `answers`."""
    while time.monotonic() < until:
        for method, path, files in (
            ("POST", "/caption", {"image": ("a.jpg", image, "image/jpeg")}),
            ("GET", "/readyz", None),
        ):
            try:
                answers.append(requests.request(method, url + path, files=files, timeout=30).status_code)
            except requests.RequestException:
                answers.append(0)
        time.sleep(0.1)


def test_mlflow_stopped_serving_goes_on_and_a_model_server_starts_from_its_bento(scene, tmp_path, monkeypatch):
    image = serving.synthetic_jpeg(seed=5)
    assert requests.get(scene.service.url + "/model", timeout=30).json()["registry_version"] == "1"
    scene.mlflow.stop()  # SIGTERM to its process group
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append("mlflow server stopped (SIGTERM) under a serving service")
    down_at = time.monotonic()

    # A model server of the released bento, pointed at the dead tracking server, starts meanwhile.
    unpacked = tmp_path / "bento"
    with tarfile.open(scene.bento) as archive:
        archive.extractall(unpacked, filter="data")
    port = free_port()
    bento_env = child_env(
        MLFLOW_TRACKING_URI=scene.mlflow.url,
        BENTOML_HOME=str(tmp_path / "bentoml"),
        CAPTIONING_ARTIFACTS_DIR=str(tmp_path / "artifacts"),
        CAPTIONING_DATA_DIR=str(tmp_path / "data"),
        CAPTIONING_TORCH_THREADS="1",
    )
    for key in ("CAPTIONING_MODEL", "CAPTIONING_API_KEY", "PYTHONPATH"):
        bento_env.pop(key, None)  # the bento's own code and model, as in its container
    log = tmp_path / "bento.log"
    bento_server = start(
        [
            sys.executable,
            "-m",
            "bento",
            "serve",
            "all",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--bento",
            str(unpacked),
        ],
        log,
        bento_env,
        cwd=unpacked / "src",
    )
    try:
        answers: list[int] = []
        watcher = threading.Thread(target=watch, args=(scene.service.url, image, down_at + DOWN_SECONDS, answers))
        watcher.start()
        bento_url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(bento_url + "/readyz", bento_server, log, timeout=150)
            ready_seconds = time.monotonic() - down_at
            bento_answers = [
                requests.post(bento_url + "/caption", files={"image": ("b.jpg", image, "image/jpeg")}, timeout=60),
                requests.get(bento_url + "/model", timeout=60),
            ]
        finally:
            watcher.join()
        service_model = requests.get(scene.service.url + "/model", timeout=30)
    finally:
        stop(bento_server)

    statuses = answers + [answer.status_code for answer in (*bento_answers, service_model)]
    FIGURES["requests_served_while_mlflow_down"] += sum(status == 200 for status in statuses)
    FIGURES["unexpected_5xx"] += sum(status >= 500 for status in statuses)
    polls_failed = scene.service.log_path.read_text(errors="replace").count("registry poll failed")
    assert answers and set(answers) == {200}, answers
    assert len(answers) >= 2 * 3, "too few requests in the window"
    assert polls_failed >= 1, scene.service.log_tail()  # the polls did reach the dead server
    assert service_model.json()["registry_version"] == "1"  # still the champion it loaded

    caption, model = bento_answers
    assert caption.status_code == 200 and caption.json()["caption"].strip(), caption.text
    assert model.status_code == 200, model.text
    assert (model.json()["registry_version"], model.json()["source"]) == ("1", "bento:captioner:v1")

    # The package downloaded while MLflow was up resolves again from the cache.
    monkeypatch.setenv("CAPTIONING_ARTIFACTS_DIR", str(scene.root / "artifacts"))
    started = time.monotonic()
    assert locate(f"models:/{NAME}/1", scene.mlflow.url).path == scene.cached
    resolve_seconds = time.monotonic() - started
    assert (scene.cached / "weights.pt").read_bytes() == (scene.package / "weights.pt").read_bytes()

    FIGURES.update(
        service_requests_while_down=len(answers),
        registry_polls_failed=polls_failed,
        bento_ready_seconds_with_mlflow_down=round(ready_seconds, 1),
        cached_package_resolve_seconds=round(resolve_seconds, 3),
    )
    record_figures("mlflow_down", FIGURES)


def test_a_registration_with_mlflow_down_fails_fast_and_succeeds_once_it_is_back(scene, tmp_path):
    scene.mlflow.stop()  # still down after the previous test (a no-op then)
    args = register_args(scene, {"CIDEr": 60.0, "BLEU-4": 20.0}, tmp_path)
    failed, seconds = captioning(scene, *args)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert failed.stdout == "" and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert (
        last_line(failed.stderr) == f"error: cannot reach the MLflow tracking server at {scene.mlflow.url}: "
        "Connection refused"
    )
    assert seconds < FAIL_FAST_SECONDS

    scene.mlflow.start()  # the same backend store and artifact folder
    listed, _ = captioning(scene, "registry", "list", "--json", "--tracking-uri", scene.mlflow.url)
    assert listed.returncode == 0, listed.stderr[-3000:]
    rows = json.loads(listed.stdout)
    assert [(row["version"], row["aliases"]) for row in rows] == [("1", [CHAMPION])]  # nothing half-made

    done, _ = captioning(scene, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    assert (outcome["version"], outcome["promoted"], outcome["previous"]) == ("2", True, "1")
    assert aliases(scene.mlflow.url) == {CHAMPION: "2", PREVIOUS: "1"}
    FIGURES.update(
        registrations_refused_while_down=1,
        failed_registration_seconds=round(seconds, 1),
        failed_registration_message=last_line(failed.stderr),
    )
    record_figures("mlflow_down", FIGURES)


def _lock_held(db: Path) -> bool:
    """The registry lock row, read straight from the server's sqlite database."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            return bool(
                connection.execute(
                    "SELECT count(*) FROM registered_models WHERE name = ?", (f"{NAME}{LOCK_SUFFIX}",)
                ).fetchone()[0]
            )
    except sqlite3.OperationalError:  # busy: the server is writing
        return False


def test_mlflow_killed_in_the_middle_of_a_registration(scene, tmp_path):
    if scene.mlflow.proc is None:
        scene.mlflow.start()
    before = aliases(scene.mlflow.url)
    new = str(max(int(row["version"]) for row in list_versions(scene.mlflow.url, NAME)) + 1)
    args = register_args(scene, {"CIDEr": 70.0, "BLEU-4": 20.0}, tmp_path)
    out, err = tmp_path / "register.out", tmp_path / "register.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            [str(BIN / "captioning"), *args], cwd=scene.root, env=scene.env, stdout=stdout, stderr=stderr
        )
    try:
        # Kill the server once the registration holds the registry lock: its version exists, and
        # the aliases are about to move.
        deadline = time.monotonic() + 180
        while not (in_lock := _lock_held(scene.db)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        scene.mlflow.stop(signal.SIGKILL)
        FIGURES["faults_injected"] += 1
        FIGURES["faults"].append("mlflow server killed (SIGKILL) while a registration held the registry lock")
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    message = last_line(err.read_text())
    assert in_lock, f"the registration ended before it took the lock: {err.read_text()[-3000:]}"
    if code != 0:  # it lost the server: one line says so
        assert code == 1 and "Traceback" not in err.read_text(), err.read_text()[-3000:]
        assert message.startswith(f"error: cannot reach the MLflow tracking server at {scene.mlflow.url}"), message
        assert f"lost after creating version {new}" in message, message

    scene.mlflow.start()
    after_kill = assert_coherent(scene.mlflow.url, (before[CHAMPION], new))
    started = time.monotonic()
    retried, _ = captioning(scene, *args)  # the same registration, on the same machine
    retry_seconds = time.monotonic() - started
    assert retried.returncode == 0, retried.stderr[-3000:]
    outcome = json.loads(retried.stdout)
    final = assert_coherent(scene.mlflow.url, (new, outcome["version"]))
    rows = {row["version"]: row for row in list_versions(scene.mlflow.url, NAME)}
    assert rows[final[CHAMPION]]["metrics"]["CIDEr"] == 70.0
    assert final.get(PREVIOUS) in (None, before[CHAMPION])
    assert outcome["promoted"] == (after_kill[CHAMPION] != new)  # 70 does not beat 70 by the margin
    with sqlite3.connect(f"file:{scene.db}?mode=ro", uri=True) as connection:  # no lock left behind
        assert (
            connection.execute("SELECT name FROM registered_models WHERE name LIKE ?", (f"%{LOCK_SUFFIX}%",)).fetchall()
            == []
        )
    assert retry_seconds < 90  # the dead holder's lock was broken at once, not after its 300 s lease

    FIGURES.update(
        mid_registration={
            "killed_while_holding_the_lock": in_lock,
            "exit_code": code,
            "message": message,
            "aliases_after_kill": after_kill,
            "retry": outcome["message"],
            "aliases_after_retry": final,
            "retry_seconds": round(retry_seconds, 1),
        }
    )
    record_figures("mlflow_down", FIGURES)


def test_a_server_lost_between_two_alias_writes_leaves_them_coherent(scene, monkeypatch):
    """The narrowest window, hit on purpose: the server dies just before `champion` moves, in a
    registration made in this process (as a Prefect task makes it); the same process then
    registers again at once, without waiting for the lock it could not release."""
    from mlflow import MlflowClient

    if scene.mlflow.proc is None:
        scene.mlflow.start()
    url = scene.mlflow.url
    before = aliases(url)
    new = str(max(int(row["version"]) for row in list_versions(url, NAME)) + 1)
    set_alias = MlflowClient.set_registered_model_alias

    def dying(self, name, alias, version):
        if alias == CHAMPION:
            scene.mlflow.stop(signal.SIGKILL)
        return set_alias(self, name, alias, version)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", dying)
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # test 3 has the commands' own retries
        with bounded_http_retries(), pytest.raises(RegistryError) as lost:
            register(scene.package, {"CIDEr": 90.0}, QUERY, SETTINGS, gates={}, tracking=url, lineage={})
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append("mlflow server killed (SIGKILL) between the two alias writes of a registration")
    assert str(lost.value).startswith(
        f"cannot reach the MLflow tracking server at {url}: Connection refused (lost after creating version {new}"
    )

    scene.mlflow.start()
    # `previous` was taken away first and `champion` had not moved: no alias is wrong, none skips.
    assert assert_coherent(url, (before[CHAMPION],)) == {CHAMPION: before[CHAMPION]}
    started = time.monotonic()
    again = register(scene.package, {"CIDEr": 90.0}, QUERY, SETTINGS, gates={}, tracking=url, lineage={})
    retry_seconds = time.monotonic() - started
    assert again.promoted and again.previous == before[CHAMPION]
    assert assert_coherent(url, (again.version,)) == {CHAMPION: again.version, PREVIOUS: before[CHAMPION]}
    assert retry_seconds < 60  # its own abandoned lock was broken at once, not after the lease
    FIGURES.update(
        between_alias_writes={
            "aliases_after_kill": {CHAMPION: before[CHAMPION]},
            "retry": again.message,
            "retry_seconds": round(retry_seconds, 1),
        }
    )
    record_figures("mlflow_down", FIGURES)
