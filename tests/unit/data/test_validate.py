"""Validation: planted faults are each caught and named; a clean dataset passes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from captioning.data.datasets import load_dataset
from captioning.data.records import Dataset
from captioning.data.validate import Expectations, expectations_for, validate_dataset
from captioning.settings import SyntheticSettings
from tests.fixtures.official import make_flickr8k

TINY = Expectations({"train": 4, "val": 2, "test": 2})


@pytest.fixture(scope="session")
def flickr_root(tmp_path_factory) -> Path:
    return make_flickr8k(tmp_path_factory.mktemp("flickr8k"), n_per_split=(4, 2, 2))


def copy_fixture(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_clean_fixture_passes(flickr_root, tmp_path):
    dataset = load_dataset("flickr8k", flickr_root)
    result = validate_dataset(dataset, tmp_path / "report", TINY)
    assert result.success, result.failures
    assert result.failures == []
    assert result.summary["splits"] == {"train": 4, "val": 2, "test": 2}
    assert result.summary["captions"] == 40
    # The fixture's Flickr8k quirk (captions of an image in no split) is reported, not hidden.
    assert any("2258277193_586949ec62.jpg" in warning for warning in result.warnings)
    saved = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert saved["success"] is True and len(saved["checks"]) == 11
    page = (tmp_path / "report" / "validation.html").read_text()
    assert "PASSED" in page and "every image decodes" in page


def test_planted_faults_are_each_named(flickr_root, tmp_path):
    root = copy_fixture(flickr_root, tmp_path / "flickr8k")
    dataset = load_dataset("flickr8k", root)
    train = [r for r in dataset.records if r.split == "train"]
    corrupt, missing, wordless, doubled = train[0], train[1], train[2], train[3]

    data = Path(corrupt.path).read_bytes()
    Path(corrupt.path).write_bytes(data[: len(data) // 3])  # a truncated JPEG
    Path(missing.path).unlink()
    records = [dataclasses.replace(r, captions=("",) + r.captions[1:]) if r is wordless else r for r in dataset.records]
    records.append(dataclasses.replace(doubled, split="test"))  # the same image in train and test
    dirty = Dataset("flickr8k", records, dataset.dropped)

    result = validate_dataset(dirty, tmp_path / "report", TINY)
    assert not result.success
    text = "\n".join(result.failures)
    assert f"image does not decode: {corrupt.image_id}" in text
    assert f"image file missing: {missing.image_id}" in text
    assert f"empty caption: {wordless.image_id} caption #0" in text
    assert f"image in more than one split: {doubled.image_id} is in test+train" in text
    assert "split test has 3 images, expected 2" in text
    # Nothing else is blamed: the other images are fine.
    blamed = {corrupt.image_id, missing.image_id, wordless.image_id, doubled.image_id}
    for line in result.failures:
        if line.startswith("image") or line.startswith("empty"):
            assert any(image_id in line for image_id in blamed), line
    page = (tmp_path / "report" / "validation.html").read_text()
    assert "FAILED" in page and missing.image_id in page and corrupt.image_id in page
    saved = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert saved["success"] is False and saved["failures"] == result.failures


def test_missing_image_from_the_loader_is_reported(tmp_path):
    # The loader keeps a listed image that is absent on disk; validation names it.
    root = make_flickr8k(tmp_path / "flickr8k", n_per_split=(4, 2, 2), missing=1)
    result = validate_dataset(load_dataset("flickr8k", root), tmp_path / "report", TINY)
    assert not result.success
    assert len(result.failures) == 1 and result.failures[0].startswith("image file missing: ")


def test_wrong_caption_count_and_odd_lengths(flickr_root, tmp_path):
    dataset = load_dataset("flickr8k", flickr_root)
    first, second = dataset.records[0], dataset.records[1]
    records = [dataclasses.replace(first, captions=first.captions[:3])]
    records += [dataclasses.replace(second, captions=("A",) + second.captions[1:])]
    records += dataset.records[2:]
    result = validate_dataset(Dataset("flickr8k", records), tmp_path / "report", TINY)
    assert result.failures == [f"wrong number of captions: {first.image_id} has 3 (expected 5)"]
    # A one-word caption is suspicious but real (Flickr8k has "A"): a warning, not a failure.
    assert any(second.image_id in w and "1 words" in w for w in result.warnings)


def test_empty_dataset_fails(tmp_path):
    result = validate_dataset(Dataset("flickr8k", []), tmp_path / "report")
    assert not result.success
    assert "the dataset has no records" in result.failures
    assert "split train has 0 images, expected 6000" in result.failures


def test_expectations_table():
    assert expectations_for("flickr8k").splits == {"train": 6000, "val": 1000, "test": 1000}
    synthetic = expectations_for("synthetic", SyntheticSettings(seed=0, train=7, val=2, test=1, image_size=64))
    assert synthetic.splits == {"train": 7, "val": 2, "test": 1}
