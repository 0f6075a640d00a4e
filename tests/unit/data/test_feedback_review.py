"""The feedback store's quotas (each client's share, every write counted), the review rules that
admit corrections into training, and stores made by the first version of the schema."""

from __future__ import annotations

import io
import sqlite3
from datetime import datetime, timezone

import pytest
from PIL import Image

from captioning.data.feedback import (
    CLIENT_SHARE_ENV,
    FeedbackQuotaError,
    FeedbackStore,
    Review,
    load_feedback,
    stored_jpeg,
)
from captioning.registry.lineage import feedback_since

ALICE, BOB, CAROL = "192.0.2.10", "198.51.100.20", "203.0.113.30"


def image_bytes(colour=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_image(seed: int) -> bytes:
    """A picture JPEG cannot shrink much: a few kilobytes once stored."""
    import random

    generator = random.Random(seed)
    image = Image.new("RGB", (64, 64))
    image.putdata([tuple(generator.randrange(256) for _ in range(3)) for _ in range(64 * 64)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def store_at(tmp_path, **options) -> FeedbackStore:
    return FeedbackStore(url=f"sqlite:///{tmp_path / 'fb' / 'feedback.db'}", root=tmp_path / "fb", **options)


# ---------------------------------------------------------------- quotas


def test_each_client_has_a_share_of_the_quota(tmp_path):
    size = len(stored_jpeg(noisy_image(0)))
    store = store_at(tmp_path, max_bytes=100 * size, client_share=0.1)  # 10 images' worth each
    sent = 0
    with pytest.raises(FeedbackQuotaError, match="this client's share of the feedback store is used"):
        for seed in range(20):
            store.add(noisy_image(seed), f"noise number {seed}", client=ALICE)
            sent += 1
    assert 5 <= sent < 11  # stored images are about `size` each; the share stops Alice near 10 of them
    assert store.count() == sent and store.client_bytes(ALICE) <= 10 * size
    # Another client still has its own share, and the whole store is far from full.
    assert store.add(noisy_image(100), "noise from bob", client=BOB).client == BOB
    assert store.used_bytes() < 100 * size


def test_a_resent_image_is_counted_every_time(tmp_path):
    image = noisy_image(1)
    size = len(stored_jpeg(image))
    store = store_at(tmp_path, max_bytes=100 * size, client_share=0.035)  # 3.5 images' worth
    for number in range(3):
        store.add(image, f"the same noise, again {number}", client=ALICE)
    assert store.client_bytes(ALICE) == 3 * size  # three writes counted, one file kept
    assert len(list((tmp_path / "fb" / "images").iterdir())) == 1
    with pytest.raises(FeedbackQuotaError, match=f"{size * 3} bytes sent of {int(100 * size * 0.035)}"):
        store.add(image, "the same noise once more", client=ALICE)
    assert store.count() == 3


def test_a_resent_image_is_refused_when_the_store_is_full(tmp_path):
    store = store_at(tmp_path)
    store.add(image_bytes(), "a red picture")
    full = store_at(tmp_path, max_bytes=store.used_bytes() + 10)
    with pytest.raises(FeedbackQuotaError, match="the feedback store is full"):
        full.add(image_bytes(), "a red picture, sent again")  # no new file, but a write all the same
    assert full.count() == 1


def test_the_client_share_setting_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(CLIENT_SHARE_ENV, "0.25")
    assert store_at(tmp_path).client_share == 0.25
    for bad, message in (("half", "is not a number"), ("0", "above 0 and at most 1"), ("1.5", "at most 1")):
        monkeypatch.setenv(CLIENT_SHARE_ENV, bad)
        with pytest.raises(ValueError, match=message):
            store_at(tmp_path)
    with pytest.raises(ValueError, match="above 0"):
        store_at(tmp_path, client_share=-0.1)


def test_calls_without_a_client_are_held_to_the_cap_only(tmp_path):
    size = len(stored_jpeg(noisy_image(0)))
    store = store_at(tmp_path, max_bytes=100 * size, client_share=0.009)  # less than one image each
    with pytest.raises(FeedbackQuotaError, match="client's share"):
        store.add(noisy_image(0), "noise", client=ALICE)
    assert store.add(noisy_image(0), "noise from the command line").client is None


# ---------------------------------------------------------------- review


def _ids(store: FeedbackStore, review: Review) -> list[int]:
    return [item.id for item, _ in store.admitted(review)]


def test_agreement_admits_a_caption_sent_by_enough_different_clients(tmp_path):
    store = store_at(tmp_path)
    first = store.add(image_bytes(), "A red picture.", client=ALICE)
    again = store.add(image_bytes(), "a red picture", client=ALICE)  # the same client twice: no agreement
    other = store.add(image_bytes(), "a bad caption", client=BOB)
    two = Review("agreement", 2)
    assert _ids(store, two) == [] and load_feedback(tmp_path / "fb", store.url, two).records == []

    agreed = store.add(image_bytes(), "a  red picture", client=BOB)  # case, spacing, full stop aside
    assert _ids(store, two) == [first.id, again.id, agreed.id]
    assert other.id in [item.id for item in store.pending(two)]
    admitted_at = dict((item.id, moment) for item, moment in store.admitted(two))
    assert admitted_at[first.id] == agreed.created_at  # admitted when the agreement came
    assert _ids(store, Review("agreement", 3)) == []
    store.add(image_bytes(), "a red picture", client=CAROL)
    assert len(_ids(store, Review("agreement", 3))) == 4

    (record,) = load_feedback(tmp_path / "fb", store.url, two).records
    assert record.captions == ("A red picture.", "a red picture", "a red picture", "a red picture")


def test_the_same_caption_for_another_image_is_no_agreement(tmp_path):
    store = store_at(tmp_path)
    store.add(image_bytes((200, 30, 30)), "a coloured picture", client=ALICE)
    store.add(image_bytes((30, 30, 200)), "a coloured picture", client=BOB)
    assert _ids(store, Review("agreement", 2)) == []


def test_an_operator_approval_admits_under_agreement_and_operator_rules(tmp_path):
    store = store_at(tmp_path)
    one = store.add(image_bytes(), "a red picture", client=ALICE)
    two = store.add(image_bytes((0, 0, 250)), "a blue picture", client=ALICE)
    three = store.add(image_bytes((0, 0, 250)), "a blue picture", client=BOB)
    assert _ids(store, Review("operator")) == []
    assert _ids(store, Review("agreement", 2)) == [two.id, three.id]
    assert _ids(store, Review("none")) == [one.id, two.id, three.id]

    assert store.approve([one.id, 999]) == [999]  # unknown ids are reported back
    assert _ids(store, Review("operator")) == [one.id]
    assert _ids(store, Review("agreement", 2)) == [one.id, two.id, three.id]
    (approved,) = [item for item in store.since(None) if item.id == one.id]
    assert approved.approved_at is not None and approved.approved_at >= one.created_at
    first_approval = approved.approved_at
    store.approve([one.id])  # approving again keeps the first approval's time
    assert next(item for item in store.since(None) if item.id == one.id).approved_at == first_approval


def test_new_feedback_is_counted_from_its_admission(tmp_path):
    """A correction stored before the last training but agreed on after it is new to training."""
    store = store_at(tmp_path)
    store.add(image_bytes(), "a red picture", client=ALICE)
    trained_at = datetime.now(timezone.utc).isoformat()
    assert feedback_since(trained_at, store.url, Review("none")) == 0
    assert feedback_since(None, store.url, Review("agreement", 2)) == 0
    store.add(image_bytes(), "a red picture", client=BOB)
    assert feedback_since(trained_at, store.url, Review("agreement", 2)) == 2
    assert feedback_since(trained_at, store.url, Review("none")) == 1


def test_the_review_rule_is_read_from_params_and_checked():
    review = Review.from_params()
    assert (review.rule, review.min_clients) == ("agreement", 2)  # params.yaml's default
    with pytest.raises(ValueError, match="not one of agreement, operator, none"):
        Review("majority")
    with pytest.raises(ValueError, match="1 or more"):
        Review("agreement", 0)


# ---------------------------------------------------------------- first-version stores

FIRST_VERSION_SCHEMA = """
CREATE TABLE feedback (
    id INTEGER NOT NULL PRIMARY KEY,
    image_sha256 VARCHAR(64) NOT NULL,
    image_file VARCHAR(200) NOT NULL,
    caption TEXT NOT NULL,
    predicted_caption TEXT,
    model_version VARCHAR(100),
    created_at DATETIME NOT NULL
);
CREATE INDEX ix_feedback_image_sha256 ON feedback (image_sha256);
CREATE INDEX ix_feedback_created_at ON feedback (created_at);
INSERT INTO feedback (image_sha256, image_file, caption, model_version, created_at)
VALUES ('%s', '%s.jpg', 'an old correction', '3', '2026-01-02 03:04:05.000000');
"""


def test_a_store_of_the_first_version_keeps_working(tmp_path):
    data = stored_jpeg(image_bytes())
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "fb" / "images").mkdir(parents=True)
    (tmp_path / "fb" / "images" / f"{digest}.jpg").write_bytes(data)
    with sqlite3.connect(tmp_path / "fb" / "feedback.db") as connection:
        connection.executescript(FIRST_VERSION_SCHEMA % (digest, digest))

    store = store_at(tmp_path, max_bytes=10_000_000)
    (old,) = store.since(None)
    assert (old.caption, old.client, old.approved_at) == ("an old correction", None, None)
    assert store.client_bytes(ALICE) == 0
    new = store.add(image_bytes(), "an old correction", client=ALICE)
    assert new.image_sha256 == digest and store.client_bytes(ALICE) == len(data)
    # The old row (no client) and Alice's agree: two different senders.
    assert _ids(store, Review("agreement", 2)) == [old.id, new.id]
    assert store.approve([old.id]) == [] and _ids(store, Review("operator")) == [old.id]
    columns = {row[1] for row in sqlite3.connect(tmp_path / "fb" / "feedback.db").execute("PRAGMA table_info(feedback)")}
    assert {"client", "image_bytes", "approved_at"} <= columns
    assert store_at(tmp_path).count() == 2  # opening again finds the columns there


def test_the_secret_url_wins_over_the_cluster_default(tmp_path, monkeypatch):
    from captioning.data.feedback import DEFAULT_DB_ENV, default_url

    monkeypatch.delenv("CAPTIONING_FEEDBACK_DB", raising=False)
    monkeypatch.delenv(DEFAULT_DB_ENV, raising=False)
    assert default_url(tmp_path) == f"sqlite:///{tmp_path / 'feedback.db'}"  # one process: SQLite
    monkeypatch.setenv(DEFAULT_DB_ENV, "postgresql://captioning@captioning-feedback-db:5432/feedback")
    assert default_url(tmp_path) == "postgresql://captioning@captioning-feedback-db:5432/feedback"
    monkeypatch.setenv("CAPTIONING_FEEDBACK_DB", "postgresql://user:pw@elsewhere/feedback")
    assert default_url(tmp_path) == "postgresql://user:pw@elsewhere/feedback"
    monkeypatch.setenv("CAPTIONING_FEEDBACK_DB", "  ")  # an empty secret value counts as unset
    assert default_url(tmp_path).startswith("postgresql://captioning@")
