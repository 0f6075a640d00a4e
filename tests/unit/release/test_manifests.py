"""deploy/rollouts and the rollout alert: the same PromQL and thresholds as the local analysis."""

from __future__ import annotations

import yaml

from captioning.config import PROJECT_ROOT
from captioning.release import analysis
from captioning.release.rollout import step_limits
from harness.settings import test_settings

DEPLOY = PROJECT_ROOT / "deploy"
CANARY, STABLE = "{{args.canary-version}}", "{{args.stable-version}}"


def _load(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    assert docs, f"{path} holds no document"
    return docs


def _templates() -> dict:
    """The AnalysisTemplates by name: every step's ceilings, and the latency ratio of the steps up to 50 %."""
    templates = _load(DEPLOY / "rollouts" / "analysis-template.yaml")
    for template in templates:
        assert (template["apiVersion"], template["kind"]) == ("argoproj.io/v1alpha1", "AnalysisTemplate")
        assert {"stable-version", "canary-version"} <= {arg["name"] for arg in template["spec"]["args"]}
    return {template["metadata"]["name"]: template for template in templates}


def _metrics() -> dict:
    return {m["name"]: m for template in _templates().values() for m in template["spec"]["metrics"]}


def test_the_analysis_templates_ask_the_local_analysis_queries():
    canary = test_settings().release.canary
    window = analysis.duration(canary.window_seconds)
    templates = {name: [m["name"] for m in t["spec"]["metrics"]] for name, t in _templates().items()}
    assert templates == {
        "captioning-model-canary": ["requests", "error-rate", "caption-failure-rate", "p95-latency"],
        "captioning-model-latency-ratio": ["p95-latency-ratio"],
    }
    expected = {
        "requests": analysis.requests_query(CANARY, window),
        "error-rate": analysis.error_rate_query(CANARY, window),
        "caption-failure-rate": analysis.caption_failure_rate_query(CANARY, window),
        "p95-latency": analysis.p95_query(CANARY, window),
        "p95-latency-ratio": analysis.latency_ratio_query(CANARY, STABLE, window, canary.min_requests),
    }
    assert {name: metric["provider"]["prometheus"]["query"] for name, metric in _metrics().items()} == expected


def test_the_analysis_templates_have_the_thresholds_of_params_yaml():
    canary = test_settings().release.canary
    metrics = _metrics()
    requests = metrics["requests"]
    assert requests["successCondition"] == f"len(result) > 0 && result[0] >= {canary.min_requests}"
    assert requests["failureCondition"] == "false"  # too few: inconclusive, the rollout pauses
    limits = {
        "error-rate": canary.max_error_rate,
        "caption-failure-rate": canary.max_error_rate,
        "p95-latency": canary.max_p95_seconds,
        "p95-latency-ratio": canary.max_latency_ratio,
    }
    for name, limit in limits.items():
        # No result (the ratio without enough requests on either side) or NaN: not judged here.
        assert metrics[name]["successCondition"] == f"len(result) == 0 || isNaN(result[0]) || result[0] <= {limit:g}"
        assert metrics[name]["failureLimit"] == 0 and metrics[name]["count"] == 1


def test_the_rollout_steps_are_the_canary_steps_each_judged():
    """Every step judged by the ceilings, and by the latency ratio where the local analysis judges
    it (rollout.step_limits: up to 50 %)."""
    canary, limits = test_settings().release.canary, analysis.Limits.canary(test_settings().release)
    (rollout,) = _load(DEPLOY / "rollouts" / "rollout.yaml")
    assert (rollout["apiVersion"], rollout["kind"]) == ("argoproj.io/v1alpha1", "Rollout")
    assert rollout["spec"]["workloadRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "captioning-model"}
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    assert [step["setWeight"] for step in steps if "setWeight" in step] == canary.steps
    window = analysis.duration(canary.window_seconds)
    for n, share in enumerate(canary.steps):
        weight, pause, judged = steps[3 * n : 3 * n + 3]
        assert weight == {"setWeight": share} and pause == {"pause": {"duration": window}}
        names = ["captioning-model-canary"]
        if step_limits(share, limits).max_latency_ratio == limits.max_latency_ratio:
            names.append("captioning-model-latency-ratio")
        assert judged["analysis"]["templates"] == [{"templateName": name} for name in names], share
        hashes = {arg["name"]: arg["valueFrom"]["podTemplateHashValue"] for arg in judged["analysis"]["args"]}
        assert hashes == {"stable-version": "Stable", "canary-version": "Latest"}
    assert [s for s in canary.steps if s <= 50] and [s for s in canary.steps if s > 50]  # both kinds of step seen


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
