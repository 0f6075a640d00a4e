"""The smoke stage's pieces: the fixed photo set, the package's recorded captions, the judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioning.data.query import select
from captioning.evaluation.scoring import score_details, score_quick
from captioning.release.smoke import (
    RECORD_FILE,
    SmokeImage,
    Verdict,
    caption_over_http,
    degenerate,
    judge_smoke,
    load_record,
    read_smoke_set,
    record_package_captions,
    set_digest,
    smoke_set,
    stable_record_score,
    write_smoke_set,
)
from harness.serving import free_port
from harness.settings import test_settings
from harness.trained import VAL_QUERY, synthetic_data, tiny_settings, train_tiny_model

LIMITS = dict(margin=0.5, tolerance=0.1, max_repeats=3, max_latency=5.0)


def served_from(captions: dict[str, str], latency: float = 0.2) -> dict[str, dict]:
    return {
        image: {"caption": caption, "error": None, "latency_seconds": latency, "model_version": "7"}
        for image, caption in captions.items()
    }


# --------------------------------------------------------------------------- degenerate captions


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("", "empty caption"),
        ("   ", "empty caption"),
        (None, "empty caption"),
        ("...", "empty caption"),
        ("left left left left", "'left' repeated 4 times in a row"),
        ("a dog on on on on on the grass", "'on' repeated 5 times in a row"),
        ("left a left b left c left", "'left' is 4 of the caption's 7 words"),
    ],
)
def test_degenerate_captions_say_why(caption, reason):
    assert degenerate(caption, max_repeats=3) == reason


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle on the left",
        "left left left",  # three in a row is still within max_repeats=3
        "a man in a red shirt and a hat sits on a bench with a dog",  # "a" is frequent, not most of it
        "two two squares",
    ],
)
def test_ordinary_captions_are_not_degenerate(caption):
    assert degenerate(caption, max_repeats=3) is None


# --------------------------------------------------------------------------- judging fixed answers

RECORDED = {
    "captions": {"a.png": "a red circle on the left", "b.png": "two blue squares"},
    "references": {
        "a.png": ["a red circle on the left", "there is a red circle on the left"],
        "b.png": ["two blue squares", "a pair of blue squares"],
    },
    "scores": {"CIDEr": 80.0, "BLEU-4": 40.0},
}


def test_the_package_own_captions_pass():
    verdict = judge_smoke(served_from(RECORDED["captions"]), RECORDED, stable_score=79.0, **LIMITS)
    assert isinstance(verdict, Verdict)
    assert verdict.passed, verdict.reason
    assert verdict.stage == "smoke"
    assert verdict.figure == 80.0 and verdict.threshold == pytest.approx(78.5)
    assert verdict.figures["differing_captions"] == 0
    assert json.loads(json.dumps(verdict.to_dict()))["outcome"] == "passed"


def test_no_stable_version_skips_the_floor():
    verdict = judge_smoke(served_from(RECORDED["captions"]), RECORDED, stable_score=None, **LIMITS)
    assert verdict.passed and verdict.threshold is None and verdict.figures["score_floor"] is None


def test_a_score_below_the_stable_version_by_more_than_the_margin_fails():
    verdict = judge_smoke(served_from(RECORDED["captions"]), RECORDED, stable_score=90.0, **LIMITS)
    assert not verdict.passed
    assert "below the stable version's 90.00 minus the margin 0.50" in verdict.reason
    assert verdict.figure == 80.0 and verdict.threshold == pytest.approx(89.5)


def test_an_error_answer_fails():
    served = served_from(RECORDED["captions"])
    served["b.png"] = {"caption": None, "error": "HTTP 500: model_error", "latency_seconds": 0.1, "model_version": None}
    verdict = judge_smoke(served, RECORDED, stable_score=79.0, **LIMITS)
    assert not verdict.passed
    assert verdict.reason.startswith("smoke: 1 of 2 answers were errors (b.png: HTTP 500")
    assert verdict.figure == 1 and verdict.threshold == 0
    assert "\n" not in verdict.reason


def test_a_photo_left_unasked_fails():
    served = served_from({"a.png": RECORDED["captions"]["a.png"]})
    verdict = judge_smoke(served, RECORDED, stable_score=None, **LIMITS)
    assert not verdict.passed and "not asked (e.g. b.png)" in verdict.reason


def test_a_slow_answer_fails():
    served = served_from(RECORDED["captions"])
    served["a.png"]["latency_seconds"] = 7.5
    verdict = judge_smoke(served, RECORDED, stable_score=79.0, **LIMITS)
    assert not verdict.passed
    assert verdict.reason == "smoke: slowest answer took 7.50s, above 5.00s"
    assert (verdict.figure, verdict.threshold) == (7.5, 5.0)


def test_degenerate_answers_fail_before_the_caption_comparison():
    served = served_from({"a.png": "left left left left left", "b.png": ""})
    verdict = judge_smoke(served, RECORDED, stable_score=None, **LIMITS)
    assert not verdict.passed
    assert verdict.reason.startswith("smoke: 2 degenerate captions (a.png: 'left' repeated 5 times in a row")
    assert verdict.figures["degenerate"] == 2


def test_a_caption_unlike_the_recorded_one_fails_beyond_the_tolerance():
    references = RECORDED["references"]
    recorded = {**RECORDED, "scores": score_quick(RECORDED["captions"], references)}
    served = served_from({**RECORDED["captions"], "b.png": "a pair of blue squares"})
    served_score = score_quick({"a.png": "a red circle on the left", "b.png": "a pair of blue squares"}, references)
    strict = judge_smoke(served, recorded, stable_score=None, **{**LIMITS, "tolerance": 0.0})
    assert not strict.passed
    assert strict.reason == "smoke: captions differ from the package's on 1 of 2 photos (tolerance 0%)"
    assert (strict.figure, strict.threshold) == (0.5, 0.0)
    assert strict.figures["score"] == pytest.approx(served_score["CIDEr"], abs=1e-3)
    # Half the photos may differ, and the score moved by less than half of the recorded one.
    loose = judge_smoke(served, recorded, stable_score=None, **{**LIMITS, "tolerance": 0.5})
    assert loose.passed, loose.reason
    assert loose.figure == pytest.approx(served_score["CIDEr"], abs=1e-3)


def test_a_served_score_far_from_the_recorded_one_fails():
    recorded = {**RECORDED, "scores": {"CIDEr": 2000.0, "BLEU-4": 100.0}}
    served = served_from({**RECORDED["captions"], "b.png": "a pair of blue squares"})
    verdict = judge_smoke(served, recorded, stable_score=None, **{**LIMITS, "tolerance": 0.5})
    assert not verdict.passed
    assert "differs from the package's 2000.00 by more than 50%" in verdict.reason
    assert verdict.threshold == 1000.0 and verdict.figure > 1000.0


def test_quick_scores_are_the_evaluation_scores():
    captions = {"a.png": "a red circle", "b.png": "two blue squares on the left"}
    quick = score_quick(captions, RECORDED["references"])
    full, _ = score_details(captions, RECORDED["references"])
    for metric in ("BLEU-1", "BLEU-4", "CIDEr"):
        assert quick[metric] == pytest.approx(full[metric], abs=1e-9)


def test_an_unreachable_service_is_an_error_per_photo_not_an_exception(tmp_path):
    folder = tmp_path / "set"
    (tmp_path / "photo.png").write_bytes(b"\x89PNG not really")
    write_smoke_set([SmokeImage("x", str(tmp_path / "photo.png"), ("a photo",))], folder)
    served = caption_over_http(f"http://127.0.0.1:{free_port()}", folder, timeout=5)
    assert list(served) == ["x"]
    assert served["x"]["caption"] is None and served["x"]["error"].startswith("ConnectionError")
    assert served["x"]["latency_seconds"] >= 0


# --------------------------------------------------------------------------- the set


def test_smoke_set_is_the_sampled_validation_query():
    with synthetic_data():
        records = smoke_set(test_settings(data={"val_query": "synthetic[val]"}), 6, seed=3)
        expected = select("synthetic[val]-6s3")
    assert [r.image_id for r in records] == [r.image_id for r in expected]
    assert [r.references for r in records] == [tuple(r.captions) for r in expected]
    assert all(Path(r.path).is_file() for r in records)


def test_smoke_set_of_a_sampled_query_is_a_fixed_subset():
    settings = tiny_settings()  # val_query synthetic[val]-16: already sampled
    with synthetic_data():
        first, again = smoke_set(settings, 5), smoke_set(settings, 5)
        pool = {r.image_id for r in select(VAL_QUERY)}
        everything = smoke_set(settings, 17)  # more than the split holds: all of it
    assert first == again and len(first) == 5
    assert {r.image_id for r in everything} == pool
    assert {r.image_id for r in first} <= pool


def test_written_set_reads_back_with_the_same_digest(tmp_path):
    with synthetic_data():
        records = smoke_set(tiny_settings(), 4)
    folder = write_smoke_set(records, tmp_path / "set")
    back = read_smoke_set(folder)
    assert [(r.image_id, r.references) for r in back] == [(r.image_id, r.references) for r in records]
    assert all(Path(r.path).parent == folder / "images" for r in back)
    assert set_digest(back) == set_digest(records)
    Path(back[0].path).write_bytes(Path(back[0].path).read_bytes() + b"\0")
    assert set_digest(read_smoke_set(folder)) != set_digest(records)
    Path(back[1].path).unlink()
    with pytest.raises(FileNotFoundError, match="1 photos of the smoke set are missing"):
        read_smoke_set(folder)


# --------------------------------------------------------------------------- a real package


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory) -> Path:
    with synthetic_data():
        records = smoke_set(tiny_settings(), 8)
    return write_smoke_set(records, tmp_path_factory.mktemp("smoke") / "set")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny_model(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def recorded(trained, smoke_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("record") / RECORD_FILE
    record = record_package_captions(trained, smoke_folder, out=out)
    assert load_record(out) == record
    return record


def test_recorded_captions_cover_the_set_with_their_scores(recorded, smoke_folder):
    records = read_smoke_set(smoke_folder)
    assert set(recorded["captions"]) == {r.image_id for r in records}
    assert recorded["set_digest"] == set_digest(records)
    assert recorded["decoding"]["beam_size"] == 3
    assert recorded["weights_sha256"]
    # The tiny model learns the synthetic grammar: its captions score well above nothing.
    assert recorded["scores"]["CIDEr"] > 50 and recorded["scores"]["BLEU-4"] > 10
    assert all(degenerate(caption, 3) is None for caption in recorded["captions"].values())


def test_the_same_package_captioning_again_passes(trained, smoke_folder, recorded):
    again = record_package_captions(trained, smoke_folder)
    assert again["captions"] == recorded["captions"]
    verdict = judge_smoke(
        served_from(again["captions"]), recorded, stable_score=recorded["scores"]["CIDEr"] - 1, **LIMITS
    )
    assert verdict.passed, verdict.reason


def test_another_package_fails_on_captions_that_differ(tmp_path, smoke_folder, recorded):
    untrained = train_tiny_model(tmp_path, epochs=1, lr=1e-9)
    other = record_package_captions(untrained, smoke_folder)
    assert stable_record_score(recorded, other) == recorded["scores"]["CIDEr"]  # the same set: comparable
    with pytest.raises(ValueError, match="another photo set"):
        stable_record_score({**recorded, "set_digest": "0" * 64}, other)
    served = served_from(other["captions"])
    # Judged for what it says, not for how it says it: max_repeats high enough to let it through.
    verdict = judge_smoke(served, recorded, stable_score=None, **{**LIMITS, "max_repeats": 100})
    assert not verdict.passed
    assert verdict.reason.startswith("smoke: captions differ from the package's on ")
    assert verdict.figure > 0.5 and verdict.threshold == 0.1
    assert verdict.figures["score"] < recorded["scores"]["CIDEr"] / 2


def test_degenerate_served_captions_fail(recorded):
    served = served_from({image: "left left left left left left" for image in recorded["captions"]})
    verdict = judge_smoke(served, recorded, stable_score=None, **LIMITS)
    assert not verdict.passed
    assert f"{len(served)} degenerate captions" in verdict.reason and "'left' repeated 6 times" in verdict.reason


def test_registration_logs_the_smoke_record_and_leaves_the_package_as_it_was(trained):
    """The staged copy carries smoke/ (photos, references, the package's captions); the package
    folder itself, a DVC stage's output in `dvc repro`, is not touched."""
    from captioning.release.smoke import SMOKE_DIR, registering
    from harness.settings import test_settings
    from harness.trained import tiny_params

    before = sorted(p.name for p in trained.iterdir())
    settings = test_settings(**tiny_params(), release={"smoke": {"photos": 4}})
    with synthetic_data(), registering(trained, settings) as staged:
        record = load_record(staged / SMOKE_DIR / RECORD_FILE)
        assert staged != trained and len(record["captions"]) == 4
        assert len(read_smoke_set(staged / SMOKE_DIR)) == 4
        assert (staged / "weights.pt").read_bytes() == (trained / "weights.pt").read_bytes()
    assert not staged.exists() and sorted(p.name for p in trained.iterdir()) == before
    off = test_settings(**tiny_params(), release={"smoke": {"enabled": False}})
    with registering(trained, off) as staged:
        assert staged == trained
