"""The Kubernetes manifests of the feedback path: the API replicas write to a PostgreSQL
StatefulSet (or an external URL from the secret, which wins) and share no volume; the local
stack's one API replica keeps its SQLite store in the stack's folder."""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml

from captioning.config import PROJECT_ROOT
from captioning.data.feedback import DEFAULT_DB_ENV
from captioning.release import pods, stack

BASE = PROJECT_ROOT / "deploy" / "base"


def load(name: str) -> dict:
    return yaml.safe_load((BASE / name).read_text(encoding="utf-8"))


def api_container() -> dict:
    (container,) = load("api-deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return container


def secret_ref(container: dict, name: str) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    return entry["valueFrom"]["secretKeyRef"]


def test_the_api_replicas_share_no_volume():
    deployment = load("api-deployment.yaml")
    assert deployment["spec"]["replicas"] > 1
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert all("persistentVolumeClaim" not in volume for volume in volumes)
    assert all(set(volume) <= {"name", "emptyDir"} for volume in volumes)  # each pod's own
    kinds = [doc["kind"] for path in BASE.glob("*.yaml") for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert "PersistentVolumeClaim" not in kinds
    # Every manifest of the folder is in the kustomization, and only those.
    listed = load("kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_api_reads_the_secret_url_first_then_the_cluster_database():
    container = api_container()
    assert secret_ref(container, "CAPTIONING_FEEDBACK_DB") == {
        "name": "captioning-secrets",
        "key": "feedback-db-url",
        "optional": True,
    }
    assert secret_ref(container, "PGPASSWORD") == {
        "name": "captioning-secrets",
        "key": "feedback-db-password",
        "optional": True,
    }
    config = load("feedback-db-config.yaml")
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    url = urlsplit(config["data"][DEFAULT_DB_ENV])
    assert url.scheme == "postgresql" and url.password is None  # the password comes as PGPASSWORD

    statefulset, service = load("feedback-db-statefulset.yaml"), load("feedback-db-service.yaml")
    (postgres,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in postgres["env"]}
    assert (url.hostname, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert url.username == env["POSTGRES_USER"] and url.path == "/" + env["POSTGRES_DB"]
    assert secret_ref(postgres, "POSTGRES_PASSWORD") == {"name": "captioning-secrets", "key": "feedback-db-password"}


def test_the_database_statefulset_has_its_own_volume_and_service():
    statefulset, service = load("feedback-db-statefulset.yaml"), load("feedback-db-service.yaml")
    assert statefulset["kind"] == "StatefulSet" and statefulset["spec"]["replicas"] == 1
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # one writer: the server
    (postgres,) = statefulset["spec"]["template"]["spec"]["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in postgres["volumeMounts"]}
    data = mounts[claim["metadata"]["name"]]
    pgdata = next(e["value"] for e in postgres["env"] if e["name"] == "PGDATA")
    assert pgdata.startswith(data + "/")
    assert service["spec"]["ports"][0]["targetPort"] in {port["name"] for port in postgres["ports"]}
    assert postgres["securityContext"]["readOnlyRootFilesystem"] is True
    assert postgres["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_only_the_api_pods_reach_the_database():
    policy = load("feedback-db-networkpolicy.yaml")
    statefulset = load("feedback-db-statefulset.yaml")
    api_labels = load("api-deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= api_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": "postgres"}]


def test_the_manifests_validate():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for name in ("feedback-db-statefulset.yaml", "feedback-db-service.yaml", "feedback-db-config.yaml"):
        kubernetes_validate.validate(load(name), "1.30.0", strict=True)
    kubernetes_validate.validate(load("feedback-db-networkpolicy.yaml"), "1.30.0", strict=True)
    kubernetes_validate.validate(load("api-deployment.yaml"), "1.30.0", strict=True)


def test_kustomize_renders_the_database():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout) if d}
    assert {
        ("StatefulSet", "captioning-feedback-db"),
        ("Service", "captioning-feedback-db"),
        ("ConfigMap", "captioning-feedback-db"),
        ("NetworkPolicy", "captioning-feedback-db"),
    } <= docs
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in docs)


def test_the_local_api_pod_keeps_sqlite_in_the_stack_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPTIONING_API_KEY", raising=False)
    manifest = pods.manifest("api", 1, "localhost/captioning:v7", stack.ports(3000), tmp_path, {})
    (container,) = manifest["spec"]["containers"]
    variables = {entry["name"]: entry["value"] for entry in container["env"]}
    # No database URL and no password: the local API opens SQLite under its data folder.
    assert not {"CAPTIONING_FEEDBACK_DB", DEFAULT_DB_ENV, "PGPASSWORD"} & set(variables)
    data_dir = variables["CAPTIONING_DATA_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    (volume,) = [v for v in manifest["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"] == {"path": str(tmp_path / "feedback"), "type": "Directory"}
    assert (tmp_path / "feedback").is_dir()
