"""deploy/rollouts and the rollout alert: the same PromQL and thresholds as the local analysis."""

from __future__ import annotations

import yaml

from captioning.config import PROJECT_ROOT
from captioning.release import analysis
from harness.settings import test_settings

DEPLOY = PROJECT_ROOT / "deploy"
CANARY, STABLE = "{{args.canary-version}}", "{{args.stable-version}}"


def _load(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    assert docs, f"{path} holds no document"
    return docs


def _template() -> dict:
    (template,) = _load(DEPLOY / "rollouts" / "analysis-template.yaml")
    assert (template["apiVersion"], template["kind"]) == ("argoproj.io/v1alpha1", "AnalysisTemplate")
    return template


def test_the_analysis_template_asks_the_local_analysis_queries():
    canary = test_settings().release.canary
    window = analysis.duration(canary.window_seconds)
    metrics = {metric["name"]: metric for metric in _template()["spec"]["metrics"]}
    expected = {
        "requests": analysis.requests_query(CANARY, window),
        "error-rate": analysis.error_rate_query(CANARY, window),
        "caption-failure-rate": analysis.caption_failure_rate_query(CANARY, window),
        "p95-latency": analysis.p95_query(CANARY, window),
        "p95-latency-ratio": analysis.latency_ratio_query(CANARY, STABLE, window),
    }
    assert {name: metric["provider"]["prometheus"]["query"] for name, metric in metrics.items()} == expected


def test_the_analysis_template_has_the_thresholds_of_params_yaml():
    canary = test_settings().release.canary
    metrics = {metric["name"]: metric for metric in _template()["spec"]["metrics"]}
    assert metrics["requests"]["successCondition"] == f"result[0] >= {canary.min_requests}"
    assert metrics["requests"]["failureCondition"] == "false"  # too few: inconclusive, the rollout pauses
    limits = {
        "error-rate": canary.max_error_rate,
        "caption-failure-rate": canary.max_error_rate,
        "p95-latency": canary.max_p95_seconds,
        "p95-latency-ratio": canary.max_latency_ratio,
    }
    for name, limit in limits.items():
        assert metrics[name]["successCondition"] == f"isNaN(result[0]) || result[0] <= {limit:g}"
        assert metrics[name]["failureLimit"] == 0 and metrics[name]["count"] == 1
    args = {arg["name"] for arg in _template()["spec"]["args"]}
    assert {"stable-version", "canary-version"} <= args


def test_the_rollout_steps_are_the_canary_steps_each_judged():
    canary = test_settings().release.canary
    (rollout,) = _load(DEPLOY / "rollouts" / "rollout.yaml")
    assert (rollout["apiVersion"], rollout["kind"]) == ("argoproj.io/v1alpha1", "Rollout")
    assert rollout["spec"]["workloadRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "captioning-model"}
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    assert [step["setWeight"] for step in steps if "setWeight" in step] == canary.steps
    window = analysis.duration(canary.window_seconds)
    for n, share in enumerate(canary.steps):
        weight, pause, judged = steps[3 * n : 3 * n + 3]
        assert weight == {"setWeight": share} and pause == {"pause": {"duration": window}}
        assert judged["analysis"]["templates"] == [{"templateName": _template()["metadata"]["name"]}]
        hashes = {arg["name"]: arg["valueFrom"]["podTemplateHashValue"] for arg in judged["analysis"]["args"]}
        assert hashes == {"stable-version": "Stable", "canary-version": "Latest"}


def test_prometheus_labels_pods_with_the_version_the_analysis_selects():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    relabels = config["scrape_configs"][0]["relabel_configs"]
    targets = {rule.get("target_label"): rule.get("source_labels") for rule in relabels}
    assert targets["version"] == ["__meta_kubernetes_pod_label_rollouts_pod_template_hash"]
    assert targets["component"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    assert analysis.selector("x").startswith('{component="model",')


def test_the_breach_alert_is_the_analysis_limits():
    canary = test_settings().release.canary
    (rules,) = _load(DEPLOY / "prometheus" / "alerts.yml")
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    breach = alerts["CaptioningRolloutBreach"]
    assert breach["expr"] == analysis.breach_alert_query(canary.max_error_rate, canary.max_p95_seconds, "1m")
    assert "for" not in breach  # the analysis rolls back at once: the alert fires at once too
