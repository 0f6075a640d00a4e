"""The promotion decision: a candidate's metrics against the minimums and the champion's scores."""

from __future__ import annotations

from captioning.config import PARAMS_FILE
from captioning.registry.gates import gate_reasons, metric_tags, metrics_from_tags
from captioning.settings import load_settings

GATES = {"min": {"CIDEr": 45.0, "BLEU-4": 15.0}, "margin": {"CIDEr": 0.5}}


def test_a_candidate_above_the_minimums_that_beats_the_champion_by_the_margin_passes():
    assert gate_reasons({"CIDEr": 61.0, "BLEU-4": 20.0}, GATES, {"CIDEr": 60.0}) == []
    assert gate_reasons({"CIDEr": 60.5, "BLEU-4": 20.0}, GATES, {"CIDEr": 60.0}) == []  # the margin exactly


def test_the_first_candidate_meets_the_minimums_only():
    assert gate_reasons({"CIDEr": 45.0, "BLEU-4": 15.0}, GATES, None) == []  # equal to a minimum passes


def test_a_metric_below_its_minimum_fails_with_both_values():
    assert gate_reasons({"CIDEr": 44.99, "BLEU-4": 20.0}, GATES, None) == ["CIDEr 44.99 < minimum 45.00"]
    assert gate_reasons({"CIDEr": 30.0, "BLEU-4": 10.0}, GATES, None) == [
        "CIDEr 30.00 < minimum 45.00",
        "BLEU-4 10.00 < minimum 15.00",
    ]


def test_a_candidate_that_does_not_beat_the_champion_by_the_margin_fails():
    reasons = gate_reasons({"CIDEr": 60.3, "BLEU-4": 20.0}, GATES, {"CIDEr": 60.0})
    assert reasons == ["CIDEr 60.30 does not beat the champion's 60.00 by 0.50"]
    worse = gate_reasons({"CIDEr": 50.0, "BLEU-4": 20.0}, GATES, {"CIDEr": 60.0})
    assert worse == ["CIDEr 50.00 does not beat the champion's 60.00 by 0.50"]


def test_both_gates_fail_together():
    reasons = gate_reasons({"CIDEr": 40.0, "BLEU-4": 20.0}, GATES, {"CIDEr": 60.0})
    assert reasons == ["CIDEr 40.00 < minimum 45.00", "CIDEr 40.00 does not beat the champion's 60.00 by 0.50"]


def test_missing_metrics_fail_and_name_the_gate():
    reasons = gate_reasons({"BLEU-4": 20.0}, GATES, {"CIDEr": 60.0})
    assert reasons == [
        "CIDEr missing from the metrics (gate min 45.0)",
        "CIDEr missing from the metrics (gate margin 0.5)",
    ]
    assert gate_reasons({}, GATES, None) == [
        "CIDEr missing from the metrics (gate min 45.0)",
        "BLEU-4 missing from the metrics (gate min 15.0)",
    ]


def test_a_champion_without_the_metric_cannot_be_compared_with():
    reasons = gate_reasons({"CIDEr": 90.0, "BLEU-4": 20.0}, GATES, {"BLEU-4": 18.0})
    assert reasons == ["the champion has no CIDEr to compare with"]


def test_no_gates_let_anything_through():
    assert gate_reasons({}, {}, {"CIDEr": 90.0}) == []
    assert gate_reasons({"CIDEr": 1.0}, {"min": None, "margin": None}, {"CIDEr": 90.0}) == []


def test_the_gates_in_params_yaml_have_the_shape_the_decision_reads():
    gates = load_settings(PARAMS_FILE).register.gates.to_dict()
    assert set(gates) == {"min", "margin"}
    minimums = {metric: float(value) for metric, value in gates["min"].items()}
    assert gate_reasons(minimums, gates, None) == []
    below = {metric: value - 1.0 for metric, value in minimums.items()}
    assert len(gate_reasons(below, gates, None)) == len(minimums)


def test_metrics_travel_as_version_tags():
    tags = metric_tags({"CIDEr": 61.23456, "BLEU-4": 20})
    assert tags == {"metric.CIDEr": "61.2346", "metric.BLEU-4": "20.0000"}
    # Other tags, and metric tags that are not numbers, are left out.
    stored = {**tags, "git_commit": "abc123", "metric.note": "n/a"}
    assert metrics_from_tags(stored) == {"CIDEr": 61.2346, "BLEU-4": 20.0}


def test_gate_table_decides_metric_by_metric_as_the_reasons_do():
    from captioning.registry.gates import gate_reasons, gate_table

    gates = {"min": {"CIDEr": 45.0, "BLEU-4": 15.0}, "margin": {"CIDEr": 0.5}}
    first = gate_table({"CIDEr": 50.0, "BLEU-4": 10.0}, gates, None)  # no champion: no margin to beat
    assert [(row["metric"], row["margin"], row["outcome"]) for row in first] == [
        ("CIDEr", None, "pass"),
        ("BLEU-4", None, "fail"),
    ]
    for candidate, champion in [({"CIDEr": 50.4, "BLEU-4": 20.0}, {"CIDEr": 50.0}), ({"CIDEr": 51.0}, {"CIDEr": 50.0})]:
        rows = gate_table(candidate, gates, champion)
        assert any(row["outcome"] == "fail" for row in rows) == bool(gate_reasons(candidate, gates, champion))
    missing = gate_table({"CIDEr": 60.0}, gates, {"CIDEr": 50.0})
    assert missing[1] == {
        "metric": "BLEU-4",
        "candidate": None,
        "minimum": 15.0,
        "champion": None,
        "margin": None,
        "outcome": "fail",
    }
