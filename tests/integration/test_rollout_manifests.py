"""deploy/rollouts rendered by Kustomize, and every PromQL expression of the analysis checked by
promtool (Debian's prometheus package)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from captioning.config import PROJECT_ROOT
from captioning.release import analysis

DEPLOY = PROJECT_ROOT / "deploy"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run `make system-deps`")
    return path


def test_every_analysis_query_passes_promtool(tmp_path):
    templates = [d for d in yaml.safe_load_all((DEPLOY / "rollouts" / "analysis-template.yaml").read_text()) if d]
    queries = [metric["provider"]["prometheus"]["query"] for t in templates for metric in t["spec"]["metrics"]]
    assert len(queries) == 5
    queries += [
        analysis.requests_query("7", "30s"),
        analysis.error_rate_query("7", "30s"),
        analysis.p95_query("7", "500ms"),
        analysis.latency_ratio_query("7", "6", "30s", 10),
        analysis.breach_alert_query(0.02, 5.0, "1m"),
    ]
    rules = {"groups": [{"name": "analysis", "rules": [{"record": f"q{n}", "expr": q} for n, q in enumerate(queries)]}]}
    path = tmp_path / "analysis-rules.yml"
    path.write_text(yaml.safe_dump(rules, width=1000))
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(queries)} rules found" in result.stdout


def test_a_bad_query_fails_promtool(tmp_path):
    """The check above can fail: promtool refuses a broken expression."""
    broken = analysis.error_rate_query("7", "30s").replace("[30s]", "[30s", 1)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "q", "expr": broken}]}]}))
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def test_the_rollouts_overlay_renders_with_the_production_objects():
    result = subprocess.run(
        [_tool("kubectl"), "kustomize", str(DEPLOY / "rollouts")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    rollout = by_name[("Rollout", "captioning-model")]
    for template in ("captioning-model-canary", "captioning-model-latency-ratio"):
        assert by_name[("AnalysisTemplate", template)]["metadata"]["namespace"] == "captioning"
    assert rollout["metadata"]["namespace"] == "captioning"
    # The Deployment keeps the pod template only; the Rollout selects the same pods.
    deployment = by_name[("Deployment", "captioning-model")]
    assert deployment["spec"]["replicas"] == 0
    assert rollout["spec"]["selector"] == deployment["spec"]["selector"]
    assert by_name[("Deployment", "captioning-api")]["spec"]["replicas"] == 3  # production's, untouched
    hpa = by_name[("HorizontalPodAutoscaler", "captioning-model")]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "name": "captioning-model",
    }
    assert hpa["spec"]["minReplicas"] == 3
