"""The API's feedback store opens on a thread, each attempt bounded; /feedback answers 503 meanwhile."""

from __future__ import annotations

import socket
import time

import pytest

from captioning.data.feedback import FeedbackStore
from captioning.serving.errors import InputError
from captioning.serving.feedback_store import FeedbackStoreOpener, with_connect_timeout


def test_postgresql_urls_get_a_connect_timeout_unless_they_name_one():
    assert with_connect_timeout("postgresql://u:p@db:5432/f", 2.5) == "postgresql://u:p@db:5432/f?connect_timeout=3"
    assert with_connect_timeout("postgres://u@db/f", 5) == "postgres://u@db/f?connect_timeout=5"
    named = "postgresql+psycopg://u@db/f?connect_timeout=9"
    assert with_connect_timeout(named, 5) == named
    assert with_connect_timeout("sqlite:////data/feedback.db", 5) == "sqlite:////data/feedback.db"
    assert with_connect_timeout(None, 5) is None


def test_an_unanswering_database_costs_one_connect_timeout_per_attempt_and_answers_503(tmp_path):
    # A port that accepts connections (the kernel's backlog) and never says a word: a hung server.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    url = with_connect_timeout(f"postgresql://user:secret@127.0.0.1:{port}/feedback", 1)
    try:
        opener = FeedbackStoreOpener(lambda: FeedbackStore(url=url, root=tmp_path), retry_seconds=60).start()
        with pytest.raises(InputError) as refused:
            opener.get()  # at once, while the thread waits for the database
        assert (refused.value.status, refused.value.kind) == (503, "feedback_unavailable")
        assert refused.value.headers["Retry-After"] == "60"
        started = time.monotonic()
        while opener.failures < 1 and time.monotonic() - started < 40:
            time.sleep(0.05)
        # The attempt gave up (without a connect timeout libpq waits forever): the store's table
        # creation tries 5 connections, each cut after the timeout (libpq counts at least 2 s).
        assert opener.failures == 1 and time.monotonic() - started < 25 and opener.store is None
    finally:
        opener.stop()
        silent.close()


def test_the_store_is_served_once_open(tmp_path):
    opener = FeedbackStoreOpener(lambda: FeedbackStore(url=f"sqlite:///{tmp_path / 'f.db'}", root=tmp_path)).start()
    opener.thread.join(timeout=30)
    assert isinstance(opener.get(), FeedbackStore) and opener.attempts == 1


def test_a_database_failure_on_write_answers_503_and_bad_input_422(tmp_path):
    import asyncio

    from PIL import Image

    database = tmp_path / "f.db"
    opener = FeedbackStoreOpener(lambda: FeedbackStore(url=f"sqlite:///{database}", root=tmp_path)).start()
    opener.thread.join(timeout=30)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    with pytest.raises(InputError) as bad:
        asyncio.run(opener.add(image, "", None, None))
    assert (bad.value.status, bad.value.kind) == (422, "bad_feedback")
    assert asyncio.run(opener.add(image, "a red picture", "7", None)).caption == "a red picture"
    opener.store.engine.dispose()
    database.unlink()
    database.mkdir()  # the database file is now a folder: every connection fails
    with pytest.raises(InputError) as down:
        asyncio.run(opener.add(image, "a red picture", "7", None))
    assert (down.value.status, down.value.kind) == (503, "feedback_unavailable")
    assert str(database) not in down.value.message
