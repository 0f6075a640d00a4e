"""FeedbackStore on a real SQLite file, and the `feedback` dataset built from it."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from captioning.data.datasets import load_dataset
from captioning.data.feedback import FeedbackError, FeedbackStore, load_feedback


def image_bytes(colour=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def test_add_count_since_and_dataset():
    store = FeedbackStore()
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    first = store.add(image_bytes(), "  a red   rectangle ", model_version="3", predicted_caption="a blue square")
    second = store.add(image_bytes(), "a small red rectangle", model_version="3")
    third = store.add(image_bytes((0, 0, 250), fmt="JPEG"), "a blue rectangle")
    assert store.count() == 3
    assert first.caption == "a red rectangle"  # whitespace normalised
    assert len(store.since(before)) == 3
    assert store.since(first.created_at)[0].caption == "a small red rectangle"
    assert store.since(datetime.now(timezone.utc) + timedelta(hours=1)) == []

    # Nothing enters training unreviewed (params.yaml: agreement of 2 clients); an operator approves.
    assert load_dataset("feedback").records == []
    assert store.approve([first.id, second.id, third.id]) == []
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


def test_texts_are_normalised_and_checked():
    from captioning.data.feedback import clean_caption, clean_version

    assert clean_caption(" a\tred\n\u2028picture ") == "a red picture"  # every whitespace run is one space
    assert clean_caption("un café \u200d👩\u200d👩") == "un café \u200d👩\u200d👩"  # joiners are text, not controls
    assert clean_version(None) is None and clean_version("  ") is None
    assert clean_version(" local-1a2b3c4d5e6f ") == "local-1a2b3c4d5e6f"
    assert clean_version("captioning:v3@champion/7+b.1_x") == "captioning:v3@champion/7+b.1_x"
    for bad in ("a\x00b", "a\x7fb", "a\x9bb"):  # NUL, DEL, a C1 control (CSI)
        with pytest.raises(FeedbackError, match="control character"):
            clean_caption(bad)
    with pytest.raises(FeedbackError, match="model version must be text"):
        clean_version(7)


def test_postgres_urls_get_an_installed_driver():
    import importlib.util

    from captioning.data.feedback import engine_url

    assert engine_url("sqlite:///x.db") == "sqlite:///x.db"
    assert engine_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"  # an explicit driver is kept
    url = engine_url("postgres://u@h:5432/db")
    assert url.startswith("postgresql") and url.endswith("://u@h:5432/db")
    driver = url.split("://")[0].split("+")[-1]
    assert importlib.util.find_spec("psycopg2" if driver == "postgresql" else driver) is not None


def test_stored_images_are_upright_jpegs_without_metadata():
    from PIL import ExifTags

    from captioning.data.feedback import stored_jpeg

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8  # stored rotated: turn 90 degrees counter-clockwise
    exif[ExifTags.Base.Model] = "PhoneModel"
    image = Image.new("RGBA", (40, 30), (0, 200, 0, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif, pnginfo=None)

    data = stored_jpeg(buffer.getvalue())

    stored = Image.open(io.BytesIO(data))
    assert stored.format == "JPEG" and stored.mode == "RGB" and stored.size == (30, 40)
    assert not stored.getexif() and b"PhoneModel" not in data
    assert stored_jpeg(buffer.getvalue()) == data  # the same upload always gives the same bytes (one file)


def test_a_store_removes_temporary_files_left_by_dead_writers(tmp_path):
    import os
    import time

    from captioning.data.feedback import STALE_PART_SECONDS, write_atomically

    images = tmp_path / "fb" / "images"
    write_atomically(images / "a.jpg", b"first")
    write_atomically(images / "a.jpg", b"second")  # replaced whole
    assert (images / "a.jpg").read_bytes() == b"second" and sorted(p.name for p in images.iterdir()) == ["a.jpg"]
    old, young = images / ".b.jpg.x1.part", images / ".c.jpg.x2.part"
    old.write_bytes(b"half")
    young.write_bytes(b"being written")
    past = time.time() - STALE_PART_SECONDS - 60
    os.utime(old, (past, past))

    FeedbackStore(url=f"sqlite:///{tmp_path / 'fb.db'}", root=tmp_path / "fb")

    assert not old.exists() and young.exists()
