"""The smoke stage against the real service (`bentoml serve`) running the tiny trained package."""

from __future__ import annotations

import re

import pytest
import requests

from captioning.release.smoke import (
    caption_over_http,
    judge_smoke,
    read_smoke_set,
    record_package_captions,
    smoke_set,
    write_smoke_set,
)
from harness.trained import synthetic_data, tiny_settings

LIMITS = dict(margin=0.5, tolerance=0.0, max_repeats=3, max_latency=30.0)


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory):
    with synthetic_data():
        records = smoke_set(tiny_settings(), 8)
    return write_smoke_set(records, tmp_path_factory.mktemp("smoke") / "set")


@pytest.fixture(scope="module")
def recorded(tiny_model, smoke_folder):
    return record_package_captions(tiny_model, smoke_folder)


def test_the_served_package_captions_as_recorded(caption_service, recorded, smoke_folder):
    served = caption_over_http(caption_service.url, smoke_folder, timeout=60)
    assert set(served) == set(recorded["captions"])
    version = requests.get(caption_service.url + "/model", timeout=10).json()["model_version"]
    assert {answer["model_version"] for answer in served.values()} == {version}
    assert all(answer["error"] is None and answer["latency_seconds"] > 0 for answer in served.values())
    # Tolerance 0: every caption the container serves is the one its package wrote.
    verdict = judge_smoke(served, recorded, stable_score=recorded["scores"]["CIDEr"] - 1.0, **LIMITS)
    assert verdict.passed, (verdict.reason, verdict.figures)
    assert verdict.figures["differing_captions"] == 0


def test_an_unreadable_photo_is_an_error_answer(caption_service, recorded, smoke_folder, tmp_path):
    records = read_smoke_set(smoke_folder)
    broken = write_smoke_set(records[:3], tmp_path / "broken")
    photo = read_smoke_set(broken)[1]
    with open(photo.path, "r+b") as file:
        file.truncate(200)
    served = caption_over_http(caption_service.url, broken, timeout=60)
    assert served[photo.image_id]["caption"] is None
    assert re.match(r"HTTP 4\d\d: ", served[photo.image_id]["error"]), served[photo.image_id]
    assert all(served[r.image_id]["error"] is None for r in records[:3] if r.image_id != photo.image_id)
    recorded = {
        **recorded,
        "captions": {r.image_id: recorded["captions"][r.image_id] for r in records[:3]},
        "references": {r.image_id: list(r.references) for r in records[:3]},
    }
    verdict = judge_smoke(served, recorded, stable_score=None, **LIMITS)
    assert not verdict.passed and verdict.reason.startswith("smoke: 1 of 3 answers were errors")
