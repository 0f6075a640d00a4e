"""Deployment artefacts: Kubernetes manifests, Prometheus (a real server scraping the
running service), alert rules and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import requests
import yaml

from captioning.config import PROJECT_ROOT
from captioning.release.watcher_metrics import WatcherMetrics
from harness.serving import free_port

DEPLOY = PROJECT_ROOT / "deploy"


def rendered_production() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: run `make system-deps`")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / "production")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_production_overlay_renders_and_validates():
    import kubernetes_validate

    docs = rendered_production()
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
        kubernetes_validate.validate(doc, "1.30.0", strict=True)  # raises on any schema error
    names = lambda kind: sorted(d["metadata"]["name"] for d in by_kind.get(kind, []))  # noqa: E731
    assert names("Deployment") == ["captioning-api", "captioning-model"]
    assert names("StatefulSet") == ["captioning-feedback-db"]  # feedback goes to PostgreSQL
    assert names("Service") == ["captioning-api", "captioning-feedback-db", "captioning-model"]
    assert names("PersistentVolumeClaim") == []  # no volume shared by the API replicas
    assert names("HorizontalPodAutoscaler") == ["captioning-api", "captioning-model"]
    assert names("PodDisruptionBudget") == ["captioning-api", "captioning-model"]
    assert names("Ingress") == ["captioning"]
    assert all(d["metadata"].get("namespace") == "captioning" for d in docs if d["kind"] != "Namespace")

    for deployment in by_kind["Deployment"]:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
        assert container["image"].startswith("ghcr.io/")
    api = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "captioning-api")
    model = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "captioning-model")
    # Each BentoML service in its own Deployment: the API reaches the model through its Service.
    api_args = api["spec"]["template"]["spec"]["containers"][0]["args"]
    assert api_args[0] == "api" and api_args[api_args.index("--model-url") + 1] == "http://captioning-model:3000"
    assert model["spec"]["template"]["spec"]["containers"][0]["args"][0] == "model"
    assert all("persistentVolumeClaim" not in volume for volume in api["spec"]["template"]["spec"]["volumes"])
    (database,) = by_kind["StatefulSet"]
    assert database["metadata"]["namespace"] == "captioning"
    assert database["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    for hpa in by_kind["HorizontalPodAutoscaler"]:
        assert hpa["spec"]["minReplicas"] == 3  # the production overlay's patch applied


def _pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector with matchLabels only (what our manifests use) matches `labels`."""
    assert set(selector) <= {"matchLabels"}, f"unexpected selector form {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def test_only_the_api_reaches_the_model_pods():
    """The NetworkPolicy on the model pods: ingress on the model's port from the API pods (same
    namespace) and from Prometheus (namespace monitoring), from nothing else."""
    import kubernetes_validate

    docs = rendered_production()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "captioning-model"]
    kubernetes_validate.validate(policy, "1.30.0", strict=True)
    assert policy["metadata"]["namespace"] == "captioning"
    spec = policy["spec"]
    api_pods, model_pods = _pod_labels(deployments["captioning-api"]), _pod_labels(deployments["captioning-model"])
    assert _selects(spec["podSelector"], model_pods) and not _selects(spec["podSelector"], api_pods)
    assert spec["policyTypes"] == ["Ingress"]  # with Ingress listed, whatever no rule allows is denied

    (model_container,) = deployments["captioning-model"]["spec"]["template"]["spec"]["containers"]
    model_ports = {port["name"] for port in model_container["ports"]}
    peers = []
    for rule in spec["ingress"]:
        # Every rule names the model's port and at least one peer: a rule without "from" would
        # admit every source, one without "ports" every port.
        assert rule["from"] and rule["ports"], rule
        assert {port["port"] for port in rule["ports"]} <= model_ports
        peers += rule["from"]
    assert not any("ipBlock" in peer for peer in peers)
    in_namespace = [peer for peer in peers if "namespaceSelector" not in peer]
    assert in_namespace and all(_selects(peer["podSelector"], api_pods) for peer in in_namespace)
    assert not any(_selects(peer["podSelector"], model_pods) for peer in in_namespace)
    (scraper,) = [peer for peer in peers if "namespaceSelector" in peer]
    assert scraper["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert scraper["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


def _policies_of(docs: list[dict], labels: dict) -> list[dict]:
    return [d for d in docs if d["kind"] == "NetworkPolicy" and _selects(d["spec"]["podSelector"], labels)]


def _allowed(policies: list[dict], direction: str) -> list[dict]:
    """The rules of `direction` ("ingress" or "egress") of the policies that govern it."""
    kind = direction.capitalize()
    return [rule for p in policies if kind in p["spec"]["policyTypes"] for rule in p["spec"].get(direction, [])]


def test_every_pod_is_denied_by_default_and_the_api_admits_only_the_ingress_controller():
    import kubernetes_validate

    docs = rendered_production()
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        kubernetes_validate.validate(policy, "1.30.0", strict=True)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    api_pods, model_pods = _pod_labels(deployments["captioning-api"]), _pod_labels(deployments["captioning-model"])
    (deny,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {}]
    assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert not deny["spec"].get("ingress") and not deny["spec"].get("egress")

    api_in = _allowed(_policies_of(docs, api_pods), "ingress")
    peers = [peer for rule in api_in for peer in rule["from"]]  # no rule without "from": none open to all
    assert all(rule["from"] and rule["ports"] for rule in api_in)
    assert not any("ipBlock" in peer for peer in peers)
    namespaces = sorted(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in peers)
    assert namespaces == ["ingress-nginx", "monitoring"]  # no pod of the namespace, nothing else

    def egress_ports(labels: dict) -> set:
        rules = _allowed(_policies_of(docs, labels), "egress")
        return {(port["protocol"], port["port"]) for rule in rules for port in rule["ports"]}

    assert egress_ports(api_pods) == {("UDP", 53), ("TCP", 53), ("TCP", 3000), ("TCP", 5432)}
    assert egress_ports(model_pods) == {("UDP", 53), ("TCP", 53)}
    api_to_model = [rule for rule in _allowed(_policies_of(docs, api_pods), "egress") if rule.get("to")]
    assert any(_selects(peer["podSelector"], model_pods) for rule in api_to_model for peer in rule["to"])


def test_the_ingress_body_limit_is_the_largest_request_the_api_accepts():
    from captioning.serving.config import MB, MULTIPART_OVERHEAD, ServiceConfig

    docs = rendered_production()
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "captioning-config"]
    config = ServiceConfig.from_env(config_map["data"])
    assert config.proxy_hops == 1  # the ingress controller, the one proxy in front
    largest = config.max_upload_bytes * config.max_batch_images + MULTIPART_OVERHEAD  # one full /caption_batch
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m")
    limit = int(size[:-1]) * MB
    assert largest <= limit < largest + MB, (size, largest)


def test_alert_rules_pass_promtool():
    result = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 rules found" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests():
    """deploy/prometheus/alerts_test.yml: the refusal, watcher and Argo alerts on series as their
    exporters write them, at the times they should and should not fire."""
    result = subprocess.run(
        ["promtool", "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(captioning_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def test_dashboard_and_alerts_use_metrics_the_service_exports(caption_service):
    requests.post(caption_service.url + "/caption", files={"image": ("x.txt", b"not an image")}, timeout=30)
    exported = requests.get(caption_service.url + "/metrics", timeout=10).text
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("request rate", "latency", "batch size", "errors"):
        assert topic in titles
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used, "no captioning metric referenced"
    exported += WatcherMetrics().page()  # the release watcher's, scraped beside the service's
    missing = {name for name in used if f"\n{name}" not in exported and f"# TYPE {name} " not in exported}
    assert not missing, f"dashboard/alerts reference metrics the service and the watcher do not export: {missing}"


def test_prometheus_scrapes_the_service(caption_service, tmp_path):
    """A real Prometheus server scrapes /metrics; `up` is 1 and a custom series is stored."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: run `make system-deps`")
    requests.post(caption_service.url + "/caption", files={"image": ("x.txt", b"not an image")}, timeout=30)
    target = caption_service.url.removeprefix("http://")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "captioning", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        up = errors = None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not (up and errors):
            time.sleep(1)
            try:
                up = requests.get(f"{api}/query", params={"query": 'up{job="captioning"}'}, timeout=5).json()["data"][
                    "result"
                ]
                errors = requests.get(
                    f"{api}/query", params={"query": 'captioning_errors_total{kind="not_image"}'}, timeout=5
                ).json()["data"]["result"]
            except (requests.RequestException, KeyError, ValueError):
                continue
        assert up and up[0]["value"][1] == "1", f"up={up}\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}"
        assert errors and float(errors[0]["value"][1]) >= 1
        rules = requests.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"CaptioningHighErrorRate", "CaptioningHighLatencyP95"}
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
