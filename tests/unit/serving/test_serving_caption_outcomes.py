"""The model service counts each image it captions by outcome: a failed or empty caption is seen
even though the model service answers 200 with the error inside the result."""

from __future__ import annotations

from captioning.serving.metrics import CAPTION_OUTCOMES, caption_outcome, count_captions


def test_each_result_has_one_outcome():
    assert caption_outcome({"caption": "a dog", "model_version": "7"}) == "ok"
    assert caption_outcome({"error": "RuntimeError: broken", "model_version": "7"}) == "error"
    assert caption_outcome({"caption": "", "model_version": "7"}) == "empty"
    assert caption_outcome({"caption": "   "}) == "empty"
    assert caption_outcome({}) == "empty"


def test_the_outcomes_are_counted_per_image(series):
    results = [{"caption": "a dog"}, {"caption": "a cat"}, {"error": "bad image"}, {"caption": ""}, None]
    count_captions(series.metrics.captions, results)
    counted = {
        outcome: series.value("captioning_model_captions_total", outcome=outcome) for outcome in CAPTION_OUTCOMES
    }
    assert counted == {"ok": 2, "error": 1, "empty": 2}


def test_every_outcome_is_exposed_at_zero_from_the_start(series):
    text = series.text()
    for outcome in CAPTION_OUTCOMES:
        assert f'captioning_model_captions_total{{outcome="{outcome}"}} 0.0' in text
