"""FeedbackStore on a real SQLite file, and the `feedback` dataset built from it."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from captioning.data.datasets import load_dataset
from captioning.feedback import FeedbackError, FeedbackStore, load_feedback


def image_bytes(colour=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def test_add_count_since_and_dataset():
    store = FeedbackStore()
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    first = store.add(image_bytes(), "  a red   rectangle ", model_version="3", predicted_caption="a blue square")
    store.add(image_bytes(), "a small red rectangle", model_version="3")
    store.add(image_bytes((0, 0, 250), fmt="JPEG"), "a blue rectangle")
    assert store.count() == 3
    assert first.caption == "a red rectangle"  # whitespace normalised
    assert len(store.since(before)) == 3
    assert store.since(first.created_at)[0].caption == "a small red rectangle"
    assert store.since(datetime.now(timezone.utc) + timedelta(hours=1)) == []

    # The default root is data_dir()/feedback, the folder the dataset loader reads.
    dataset = load_dataset("feedback")
    assert dataset.name == "feedback" and len(dataset.records) == 2  # one record per distinct image
    red = next(r for r in dataset.records if r.image_id == first.image_sha256)
    assert red.split == "train"
    assert red.captions == ("a red rectangle", "a small red rectangle")
    assert Image.open(red.path).format == "JPEG"  # stored as <sha256>.jpg, a real JPEG


def test_refuses_bad_input_and_stores_nothing(tmp_path):
    store = FeedbackStore(url=f"sqlite:///{tmp_path / 'fb.db'}", root=tmp_path / "fb")
    with pytest.raises(FeedbackError, match="empty"):
        store.add(image_bytes(), "   ")
    with pytest.raises(FeedbackError, match="not an image"):
        store.add(b"plain text", "a caption")
    with pytest.raises(FeedbackError, match="truncated"):
        store.add(image_bytes(fmt="JPEG")[:200], "a caption")
    with pytest.raises(FeedbackError, match="characters"):
        store.add(image_bytes(), "word " * 200)
    assert store.count() == 0
    assert not (tmp_path / "fb" / "images").exists() or not any((tmp_path / "fb" / "images").iterdir())
    assert load_feedback(tmp_path / "fb", url=f"sqlite:///{tmp_path / 'fb.db'}").records == []
