"""The content of the Prefect artifacts, built from plain results (creating them needs a Prefect
server: tests/integration/test_flows.py reads them back from one)."""

from __future__ import annotations

import json
import re

from tasks import artifacts


def test_keys_are_lowercase_letters_digits_and_dashes():
    assert artifacts.artifact_key("validation", "Flickr8k") == "validation-flickr8k"
    assert (
        artifacts.artifact_key("features", "synthetic[train]-64s1+feedback") == "features-synthetic-train-64s1-feedback"
    )
    assert artifacts.artifact_key("", "") == "artifact"
    for key in ("training-progress", "evaluation-comparison", "registration-gate"):
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key)


def test_acquisition_names_archives_digests_sizes_and_the_dvc_hash(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x" * 1_500_000)
    (tmp_path / "captions.txt").write_text("a dog\n")
    marker = {
        "method": "download",
        "acquired_at": "2026-12-07T05:00:00+00:00",
        "archives": [
            {
                "filename": "Flickr8k_Dataset.zip",
                "url": "https://example.org/Flickr8k_Dataset.zip",
                "source": "https://example.org/Flickr8k_Dataset.zip",
                "sha256": "ab" * 32,
                "verified": "md5",
            }
        ],
    }
    text = artifacts.acquisition_markdown("flickr8k", str(tmp_path), "0f1e.dir", marker)
    assert "(2 files, 1.5 MB)" in text and "`0f1e.dir`" in text
    assert "download on 2026-12-07T05:00:00+00:00" in text
    assert "| Flickr8k_Dataset.zip | https://example.org/Flickr8k_Dataset.zip |  | " + "ab" * 32 + " | md5 |" in text
    generated = artifacts.acquisition_markdown("synthetic", str(tmp_path), None, None)
    assert "no download" in generated and "not versioned" in generated and "## Fetched" not in generated


def test_validation_rows_say_each_expectation_and_its_result():
    checks = [
        {"check": "images decode", "success": True, "severity": "error", "unexpected_count": 0, "messages": []},
        {
            "check": "captions per image",
            "success": False,
            "severity": "error",
            "unexpected_count": 3,
            "messages": ["img1.jpg has 2 captions"],
        },
        {"check": "image side", "success": False, "severity": "warning", "unexpected_count": 1, "messages": ["x"]},
    ]
    rows = artifacts.validation_table(checks)
    assert [(row["expectation"], row["result"], row["unexpected"]) for row in rows] == [
        ("images decode", "passed", 0),
        ("captions per image", "failed", 3),
        ("image side", "warned", 1),
    ]
    assert rows[1]["example"] == "img1.jpg has 2 captions" and rows[0]["example"] == ""


def test_features_rows_count_encoded_and_reused_images():
    built = [
        {"query": "synthetic[train]-64s1", "images": 64, "encoded": 64, "seconds": 3.14159, "store": "/s/synthetic"},
        {"query": "synthetic[val]-16s1", "images": 16, "encoded": 0, "seconds": 0.02, "store": "/s/synthetic"},
    ]
    rows = artifacts.features_table(built)
    assert [(r["encoded"], r["reused"], r["seconds"]) for r in rows] == [(64, 0, 3.1), (0, 16, 0.0)]


def test_mlflow_run_url_only_for_a_tracking_server():
    assert (
        artifacts.mlflow_run_url("http://127.0.0.1:5000/", "3", "abc")
        == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    )
    assert artifacts.mlflow_run_url("sqlite:////tmp/mlflow.db", "3", "abc") is None


def test_epoch_rows_keep_numbers_and_leave_samples_out():
    history = [
        {"epoch": 1, "train_loss": 3.123456, "val_CIDEr": 12.0, "samples": [{"caption": "a"}], "step": 10},
        {"epoch": 2, "train_loss": 2.5, "val_CIDEr": 20.55555},
    ]
    assert artifacts.epochs_table(history) == [
        {"epoch": 1, "train_loss": 3.1235, "val_CIDEr": 12.0},
        {"epoch": 2, "train_loss": 2.5, "val_CIDEr": 20.5556},
    ]


def test_comparison_rows_are_the_table_rounded():
    rows = [
        {"model": "candidate", "decoding": "beam 3", "BLEU-4": 21.234, "CIDEr": 50.0, "images": 16},
        {"model": "champion v1", "decoding": "beam 3", "BLEU-4": 20.0, "CIDEr": 48.456},
    ]
    assert artifacts.comparison_rows(rows) == [
        {"model": "candidate", "decoding": "beam 3", "BLEU-4": 21.23, "CIDEr": 50.0},
        {"model": "champion v1", "decoding": "beam 3", "BLEU-4": 20.0, "CIDEr": 48.46},
    ]


def test_gate_rows_and_verdict_in_words():
    gates = {"min": {"CIDEr": 45.0, "BLEU-4": 15.0}, "margin": {"CIDEr": 0.5}}
    rows = artifacts.gate_rows({"CIDEr": 60.3, "BLEU-4": 20.0}, gates, {"CIDEr": 60.0, "BLEU-4": 19.0})
    assert rows == [
        {"metric": "CIDEr", "candidate": 60.3, "minimum": 45.0, "champion": 60.0, "margin": 0.5, "outcome": "fail"},
        {"metric": "BLEU-4", "candidate": 20.0, "minimum": 15.0, "champion": 19.0, "margin": None, "outcome": "pass"},
    ]
    refused = {"version": "3", "promoted": False, "champion": "2", "reasons": ["CIDEr 60.30 does not beat ..."]}
    text = artifacts.verdict_markdown(refused, "flickr8k[test]")
    assert text.startswith("**Version 3 was not promoted**: version 2 stays champion.")
    assert "- CIDEr 60.30 does not beat ..." in text and "`flickr8k[test]`" in text
    promoted = {"version": "1", "promoted": True, "previous": None, "reasons": []}
    assert artifacts.verdict_markdown(promoted, "q").startswith("**Version 1 is the new champion** (the first one).")


def test_release_says_what_was_built_and_each_stage():
    built = {
        "version": "4",
        "model": "models:/captioner/4",
        "image": "captioning:v4",
        "bento": "captioning:v4",
        "size_bytes": 812_000_000,
        "build_seconds": 95.2,
        "built": True,
    }
    verdicts = [
        {"stage": "smoke", "outcome": "passed", "reason": "12 photos captioned", "check": None, "figure": None},
        {"stage": "canary", "outcome": "failed", "reason": "error rate", "check": "errors", "figure": 0.123456},
    ]
    text = artifacts.release_markdown("version 4 rolled back: error rate", built, verdicts)
    assert "`captioning:v4` (812.0 MB, built in 95 s)" in text
    assert "| canary | failed | error rate | errors | 0.1235 |  |" in text
    assert "no stage" not in artifacts.release_markdown("version 4: no stack running", built, [])
    json.dumps(artifacts.stages_table(verdicts))  # a table artifact's content is JSON


def test_the_retrain_decision_holds_the_verdict_comparison_and_gates():
    registration = {
        "version": "2",
        "promoted": False,
        "champion": "1",
        "reasons": ["CIDEr 50.10 does not beat the champion's 50.00 by 0.50"],
        "champion_metrics": {"CIDEr": 50.0},
        "message": "gate failed: ...",
    }
    evaluation = {
        "query": "synthetic[test]-16s1",
        "metrics": {"CIDEr": 50.1, "BLEU-4": 20.0},
        "rows": [
            {"model": "candidate", "decoding": "beam 1", "CIDEr": 50.1, "BLEU-4": 20.0},
            {"model": "champion v1", "decoding": "beam 1", "CIDEr": 50.0, "BLEU-4": 19.0},
        ],
    }
    gates = {"min": {"CIDEr": 45.0}, "margin": {"CIDEr": 0.5}}
    text = artifacts.decision_markdown("synthetic", registration, evaluation, gates, "synthetic[train]-64s1")
    assert text.startswith("# Retrain of synthetic: version 2")
    assert "**Version 2 was not promoted**: version 1 stays champion." in text
    assert "| champion v1 | beam 1 | 19.0 | 50.0 |" in text
    assert "| CIDEr | 50.1 | 45.0 | 50.0 | 0.5 | fail |" in text
    assert text.endswith("## Live photos\n\nno live drift figures: none were read\n")  # none passed
    live = {"source": None, "servers": [], "reason": "no live drift figures: no stack running"}
    with_live = artifacts.decision_markdown("synthetic", registration, evaluation, gates, "q", live)
    # After the gate table, last on the page.
    assert with_live.endswith("| fail |\n\n## Live photos\n\nno live drift figures: no stack running\n")


LIVE_SOURCE = "the local stack's Prometheus (http://127.0.0.1:3009)"


def live_server(version: str, server: str, score, threshold, p_value, note: str = "") -> dict:
    alarm = None if score is None or threshold is None else score > threshold
    return {
        "version": version,
        "server": server,
        "score": score,
        "threshold": threshold,
        "p_value": p_value,
        "alarm": alarm,
        "note": note,
    }


def test_the_live_photos_section_shows_each_servers_drift_and_advice_on_an_alarm():
    live = {
        "source": LIVE_SOURCE,
        "read_at": "2026-12-07T05:00:00+00:00",
        "reason": "",
        "servers": [
            live_server("7", "127.0.0.1:3004", 0.0123456, 0.0041234, 0.0009),
            live_server("7", "127.0.0.1:3005", 0.0012, 0.0041234, 0.4567),
            live_server("8", "127.0.0.1:3006", None, 0.0041234, None, "fewer live photos than a window so far"),
        ],
    }
    text = artifacts.live_drift_markdown(live)
    assert text.startswith("## Live photos\n")
    assert f"from {LIVE_SOURCE} at 2026-12-07T05:00:00+00:00" in text
    assert "| version | server | drift score | threshold | p-value | alarm |" in text
    assert "| 7 | 127.0.0.1:3004 | 0.01235 | 0.004123 | 0.0009 | **yes** |" in text
    assert "| 7 | 127.0.0.1:3005 | 0.0012 | 0.004123 | 0.457 | no |" in text
    assert "| 8 | 127.0.0.1:3006 |  | 0.004123 |  | fewer live photos than a window so far |" in text
    assert f"**Drift alarm on version 7.** {artifacts.DRIFT_ADVICE}" in text
    assert "Retraining on the same data will not fix drift" in artifacts.DRIFT_ADVICE
    assert "photos like the recent uploads" in artifacts.DRIFT_ADVICE


def test_the_live_photos_section_without_an_alarm_gives_no_advice():
    live = {"source": LIVE_SOURCE, "reason": "", "servers": [live_server("7", "a:1", 0.001, 0.004, 0.6)]}
    text = artifacts.live_drift_markdown(live)
    assert "| 7 | a:1 | 0.001 | 0.004 | 0.6 | no |" in text
    assert "alarm on" not in text and artifacts.DRIFT_ADVICE not in text


def test_the_live_photos_section_without_figures_says_why():
    reason = "no live drift figures: no stack running and retrain.drift_source unset"
    text = artifacts.live_drift_markdown({"source": None, "servers": [], "reason": reason})
    assert text == f"## Live photos\n\n{reason}\n"
    assert "no live drift figures" in artifacts.live_drift_markdown(None)


def test_a_skipped_retrain_has_a_decision_with_the_live_photos():
    live = {"source": LIVE_SOURCE, "reason": "", "servers": [live_server("3", "a:1", 0.02, 0.004, 0.001)]}
    message = "nothing new since the training of 2026-12-01: same data (abc), same settings, no new feedback"
    text = artifacts.skipped_markdown("synthetic", message, live)
    assert text.startswith("# Retrain of synthetic: skipped\n")
    assert f"**Nothing trained**: {message}." in text
    assert "## Live photos" in text and "**Drift alarm on version 3.**" in text
