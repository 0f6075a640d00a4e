"""`captioning feedback list` and `captioning feedback approve` on the store of the test's data folder."""

from __future__ import annotations

import io
import json

from PIL import Image
from typer.testing import CliRunner

from captioning.cli import app
from captioning.data.datasets import load_dataset
from captioning.data.feedback import FeedbackStore

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["feedback", *args])


def picture(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_list_pending_then_approve_admits_into_the_dataset():
    store = FeedbackStore()  # the service's store: data_dir()/feedback/feedback.db
    red = store.add(picture((200, 30, 30)), "a red picture", client="192.0.2.1")
    blue = store.add(picture((30, 30, 200)), "a blue picture", client="192.0.2.1")
    store.add(picture((30, 30, 200)), "a blue picture", client="198.51.100.2")  # agreement on blue

    listed = run("list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(row["id"], row["admitted"]) for row in rows] == [(red.id, False), (blue.id, True), (blue.id + 1, True)]
    assert rows[0]["client"] == "192.0.2.1" and rows[0]["caption"] == "a red picture"
    pending = json.loads(run("list", "--pending", "--json").stdout)
    assert [row["id"] for row in pending] == [red.id]
    text = run("list", "--pending").stdout
    assert "review rule: agreement (min clients 2); 1 correction(s)" in text and "pending" in text
    assert [r.captions for r in load_dataset("feedback").records] == [("a blue picture", "a blue picture")]

    approved = run("approve", str(red.id))
    assert approved.exit_code == 0, approved.output
    assert f"approved 1 correction(s): {red.id}" in approved.stdout
    assert json.loads(run("list", "--pending", "--json").stdout) == []
    assert sorted(r.captions for r in load_dataset("feedback").records) == [
        ("a blue picture", "a blue picture"),
        ("a red picture",),
    ]
    # Under the operator rule only the approved correction is admitted.
    operator = json.loads(run("list", "--json", "--set", "retrain.feedback_review=operator").stdout)
    assert [row["id"] for row in operator if row["admitted"]] == [red.id]


def test_approve_refuses_unknown_ids_and_approves_nothing():
    store = FeedbackStore()
    stored = store.add(picture((200, 30, 30)), "a red picture")
    result = run("approve", str(stored.id), "4242")
    assert result.exit_code == 2
    assert "no correction with id 4242; nothing approved" in result.stderr
    assert all(item.approved_at is None for item in store.since(None))


def test_a_bad_review_setting_exits_2():
    result = run("list", "--set", "retrain.feedback_review=majority")
    assert result.exit_code == 2 and "feedback_review" in result.stderr
