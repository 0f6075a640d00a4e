"""Caption metrics agree with pycocoevalcap's scorers; bad predictions are refused; tables and report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from captioning.evaluation.scoring import (
    METRICS,
    EvaluationResult,
    PredictionError,
    check_predictions,
    comparison_table,
    load_predictions,
    save_predictions,
    score_details,
    write_comparison,
)
from tests.fixtures.scoring import direct_scores

REFERENCES = {
    "img1.jpg": ["A black dog runs across the grass .", "A dog is running on a lawn.", "a black dog running outside"],
    "img2.jpg": ["Two children play on the beach.", "Kids playing in the sand near the sea", "two kids at the beach"],
    "img3.jpg": [
        "A man rides a red bicycle down the street.",
        "A cyclist on a red bike",
        "man riding a bike on a road",
    ],
    "img4.jpg": [
        "A woman in a blue dress holds an umbrella.",
        "woman with an umbrella in the rain",
        "A lady holding an umbrella",
    ],
}
PREDICTIONS = {
    "img1.jpg": "a black dog is running on the grass",
    "img2.jpg": "two children are playing on the beach",
    "img3.jpg": "a man is riding a bike",
    "img4.jpg": "a woman is holding an umbrella",
}


@pytest.fixture(scope="module")
def meteor():
    """One METEOR Java process for the module (its start-up is most of the scoring time)."""
    from captioning.evaluation.scoring import meteor_process

    with meteor_process() as process:
        yield process


@pytest.fixture(scope="module")
def scored(meteor):
    return score_details(PREDICTIONS, REFERENCES, meteor=meteor)


def test_scores_match_pycocoevalcap_scorers(scored, meteor):
    metrics, per_image = scored
    expected, expected_cider = direct_scores(PREDICTIONS, REFERENCES, meteor)
    assert set(METRICS) <= set(metrics)
    for name in METRICS:
        assert metrics[name] == pytest.approx(expected[name], abs=0.01), name
    for image_id, value in expected_cider.items():
        assert per_image[image_id]["CIDEr"] == pytest.approx(value, abs=0.01)
    # Percent scale, and the captions are close to the references: clearly non-trivial scores.
    assert 40 < metrics["BLEU-1"] <= 100 and metrics["CIDEr"] > 50


def test_per_image_scores_cover_every_image(scored):
    _, per_image = scored
    assert set(per_image) == set(REFERENCES)
    for scores in per_image.values():
        assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(scores)
        assert all(0 <= v for v in scores.values())


def test_spice_is_skipped_with_one_line(scored):
    from captioning.evaluation.scoring import spice_available

    metrics, _ = scored
    assert ("SPICE" in metrics) == spice_available()


def test_missing_and_extra_ids_are_refused():
    predictions = dict(PREDICTIONS)
    del predictions["img2.jpg"]
    predictions["other.jpg"] = "a cat"
    with pytest.raises(PredictionError) as error:
        check_predictions(predictions, REFERENCES)
    message = str(error.value)
    assert "1 image ids missing" in message and "img2.jpg" in message
    assert "1 image ids not in the data" in message and "other.jpg" in message


def test_empty_captions_and_empty_predictions_are_refused():
    with pytest.raises(PredictionError, match="empty captions.*img3.jpg"):
        check_predictions({**PREDICTIONS, "img3.jpg": "  "}, REFERENCES)
    with pytest.raises(PredictionError, match="no predictions"):
        check_predictions({}, REFERENCES)
    with pytest.raises(PredictionError, match="missing"):
        # score() checks before any Java process starts
        score_details({"img1.jpg": "a dog"}, REFERENCES)


def test_load_predictions_coco_results_format(tmp_path):
    path = save_predictions(PREDICTIONS, tmp_path / "pred.json")
    assert load_predictions(path) == PREDICTIONS
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps([{"image_id": 391895, "caption": "a man on a bike"}]))
    assert load_predictions(coco) == {"391895": "a man on a bike"}


@pytest.mark.parametrize(
    "content, reason",
    [
        ("", "empty"),
        ("[]", "list is empty"),
        ("{not json", "not valid JSON"),
        ('{"image_id": 1, "caption": "x"}', "expected a JSON list"),
        ('[{"image_id": 1}]', "entry 0 is not an object with image_id and caption"),
        ('[{"image_id": 1, "caption": 5}]', "caption is not a string"),
        ('[{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}]', "appears more than once"),
    ],
)
def test_bad_prediction_files_are_reported(tmp_path, content, reason):
    path = tmp_path / "pred.json"
    path.write_text(content)
    with pytest.raises(PredictionError, match=re.escape(reason)):
        load_predictions(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(PredictionError, match="no such predictions file"):
        load_predictions(tmp_path / "absent.json")


def test_cli_bad_predictions_file_exits_2_with_one_line(tmp_path):
    from captioning.cli import app

    path = tmp_path / "pred.json"
    path.write_text("")
    result = CliRunner().invoke(app, ["evaluate-predictions", str(path), "--data", "synthetic[test]"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "predictions file is empty" in lines[0]


def test_comparison_table_markdown_and_json(tmp_path):
    rows = [
        {
            "model": "show_tell",
            "decoding": "greedy",
            "BLEU-1": 55.123,
            "BLEU-4": 15.0,
            "METEOR": 18.2,
            "ROUGE-L": 42.0,
            "CIDEr": 40.5,
            "BLEU-2": 1.0,
        },
        {
            "model": "attention",
            "decoding": "beam 3",
            "BLEU-1": 60.0,
            "BLEU-4": 20.456,
            "METEOR": 20.0,
            "ROUGE-L": 45.0,
            "CIDEr": 52.25,
        },
    ]
    markdown, table = comparison_table(rows)
    lines = markdown.strip().splitlines()
    assert lines[0] == "| Model | Decoding | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr |"
    assert lines[2] == "| show_tell | greedy | 55.12 | 15.00 | 18.20 | 42.00 | 40.50 |"
    assert lines[3].startswith("| attention | beam 3 | 60.00 | 20.46 |")
    assert table == {
        "show_tell greedy": {"BLEU-1": 55.123, "BLEU-4": 15.0, "METEOR": 18.2, "ROUGE-L": 42.0, "CIDEr": 40.5},
        "attention beam 3": {"BLEU-1": 60.0, "BLEU-4": 20.456, "METEOR": 20.0, "ROUGE-L": 45.0, "CIDEr": 52.25},
    }
    md_path, json_path = write_comparison(rows, tmp_path)
    assert md_path.read_text() == markdown
    # `dvc metrics show` needs a dict of (nested dicts of) numbers, not a list.
    loaded = json.loads(json_path.read_text())
    assert isinstance(loaded, dict)
    assert all(isinstance(v, float) for row in loaded.values() for v in row.values())


def test_report_is_self_contained_html(tmp_path, scored):
    from captioning.evaluation.report import write_report

    metrics, per_image = scored
    paths = {}
    for n, image_id in enumerate(REFERENCES):
        path = tmp_path / image_id
        Image.new("RGB", (224, 224), (40 * n, 100, 200 - 40 * n)).save(path)
        paths[image_id] = str(path)
    rng = np.random.default_rng(0)
    words = PREDICTIONS["img1.jpg"].split()
    attention = {"img1.jpg": {"words": words, "maps": rng.random((len(words), 49)).tolist(), "grid": 7}}
    result = EvaluationResult(
        metrics,
        PREDICTIONS,
        REFERENCES,
        per_image,
        attention,
        paths,
        info={"model": "tiny", "data": "made-up", "images": 4},
    )
    out = write_report(result, tmp_path / "report" / "eval.html", examples=2)
    text = out.read_text()
    assert text.startswith("<!doctype html>")
    assert f"{metrics['CIDEr']:.2f}" in text
    best = max(per_image, key=lambda i: per_image[i]["CIDEr"])
    assert "Best captioned" in text and PREDICTIONS[best] in text
    assert "A woman in a blue dress holds an umbrella." in text or "Two children play" in text
    # one overlay per generated word, all embedded; nothing fetched from elsewhere
    assert text.count('class="word"') == len(words)
    assert text.count("data:image/png;base64,") == len(words)
    assert "data:image/jpeg;base64," in text
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert text.count("<tr><td>img") == len(REFERENCES)  # the per-image table


def test_attention_overlay_highlights_the_attended_cell():
    from captioning.evaluation.report import attention_overlay

    image = Image.new("RGB", (224, 224), (128, 128, 128))
    weights = np.zeros(49)
    weights[0] = 1.0  # top-left cell
    overlay = np.asarray(attention_overlay(image, weights, 7, size=140)).astype(int)
    assert overlay.shape == (140, 140, 3)
    assert overlay[5, 5].sum() > overlay[130, 130].sum() + 100


def test_caption_empty_after_tokenisation_scores_zero(meteor):
    """ "..." is a caption, but the PTB tokenizer leaves nothing of it: scored 0, no crash."""
    predictions = {**PREDICTIONS, "img2.jpg": "..."}
    metrics, per_image = score_details(predictions, REFERENCES, meteor=meteor)
    assert per_image["img2.jpg"] == {"BLEU-4": 0.0, "METEOR": 0.0, "ROUGE-L": 0.0, "CIDEr": 0.0}
    assert metrics["CIDEr"] > 0
    # A model's own empty output is scored the same way (a predictions file may not have one).
    _, per_image = score_details({**PREDICTIONS, "img2.jpg": ""}, REFERENCES, meteor=meteor, allow_empty=True)
    assert per_image["img2.jpg"]["CIDEr"] == 0.0


def test_published_rows_sit_beside_measured_ones(tmp_path):
    from captioning.cli import app
    from captioning.evaluation.scoring import PUBLISHED

    markdown, table = comparison_table(PUBLISHED["flickr8k"])
    hard = next(line for line in markdown.splitlines() if "hard" in line)
    # Unreported metrics stay blank, never 0.
    assert hard.endswith("| 67.00 | 21.30 | 20.30 |  |  |")
    assert table["published: Show, Attend and Tell, hard (Xu et al. 2015)"] == {
        "BLEU-1": 67.0,
        "BLEU-4": 21.3,
        "METEOR": 20.3,
    }
    result = CliRunner().invoke(app, ["compare", "--model", f"a={tmp_path}", "--published", "coco9"])
    assert result.exit_code == 2 and "no published results for 'coco9'" in result.output


def _decoding(beam_size, length_penalty=0.0, rerank="none", flip=False, neighbours=0, score_weight=0.0, **other):
    from captioning.settings import DECODING_OFF, DecodingSettings

    given = {"length_penalty": length_penalty, "rerank": rerank, "flip": flip, "rerank_neighbours": neighbours}
    given.update(rerank_score_weight=score_weight, **other)
    return DecodingSettings.model_validate({**DECODING_OFF, "beam_size": beam_size, "max_length": 20, **given})


def test_decoding_names_say_every_setting_that_changes_captions():
    from captioning.evaluation.scoring import decoding_name, decoding_setting

    assert decoding_name(_decoding(1, 0.7, "consensus")) == "greedy"
    assert decoding_name(_decoding(3)) == "beam 3"
    assert decoding_name(_decoding(10, 0.7, "consensus")) == "beam 10, length penalty 0.7, consensus"
    assert decoding_name(_decoding(5, 1.0)) == "beam 5, length penalty 1"
    assert decoding_name(_decoding(1, 0.7, "consensus", flip=True)) == "greedy, flip"
    assert decoding_name(_decoding(10, 0.7, "consensus", True)) == "beam 10, length penalty 0.7, consensus, flip"
    assert (
        decoding_name(_decoding(10, 0.7, "consensus", True, 30, 0.7))
        == "beam 10, length penalty 0.7, consensus with 30 neighbours and 0.7 of the beam score, flip"
    )
    assert decoding_name(_decoding(1, 0.0, "consensus", False, 30, 0.7)) == "greedy"
    assert decoding_name(_decoding(4, early_stop="heuristic")) == "beam 4, heuristic stop"
    assert (
        decoding_setting(
            {
                "beam_size": 5,
                "length_penalty": 0.7,
                "rerank": "consensus",
                "flip": False,
                "rerank_neighbours": 0,
                "rerank_score_weight": 0.5,
            }
        )
        == "beam 5, length penalty 0.7, consensus and 0.5 of the beam score"
    )
