"""Lineage fingerprints: settings hashes, file listings, dataset and feedback fingerprints, git."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from captioning.config import PARAMS_FILE, PROJECT_ROOT
from captioning.data.feedback import FeedbackStore, Review
from captioning.registry.lineage import (
    NEUTRAL_SECTIONS,
    canonical_hash,
    collect_lineage,
    data_fingerprint,
    feedback_fingerprint,
    feedback_since,
    git_commit,
    listing_hash,
    params_hash,
    settings_dict,
    training_hash,
)
from captioning.settings import apply_overrides, load_settings

SETTINGS = load_settings(PARAMS_FILE)


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (20, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_canonical_hash_ignores_key_order_and_sees_every_value():
    assert canonical_hash({"a": 1, "b": [1, 2]}) == canonical_hash({"b": [1, 2], "a": 1})
    assert canonical_hash({"a": 1, "b": [1, 2]}) != canonical_hash({"a": 1, "b": [2, 1]})
    assert re.fullmatch(r"[0-9a-f]{16}", canonical_hash({"a": 1}))
    assert canonical_hash({"path": Path("/x")}) == canonical_hash({"path": "/x"})  # other values as text


def test_settings_as_plain_data_leave_the_profiles_out():
    data = settings_dict(SETTINGS)
    assert "profiles" not in data and "train" in data
    assert settings_dict({**data, "profiles": {"full": {"train.epochs": 30}}}) == data
    assert params_hash(SETTINGS) == params_hash(data)  # a Settings and its plain data hash alike


def test_the_training_hash_changes_only_with_what_shapes_a_model():
    assert "register" in NEUTRAL_SECTIONS and "train" not in NEUTRAL_SECTIONS
    renamed = apply_overrides(SETTINGS, ["register.model_name=another"])
    assert training_hash(renamed) == training_hash(SETTINGS)
    assert params_hash(renamed) != params_hash(SETTINGS)
    faster = apply_overrides(SETTINGS, [f"train.lr={SETTINGS.train.lr * 2}"])
    assert training_hash(faster) != training_hash(SETTINGS)


def test_a_listing_hash_follows_names_and_sizes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"12345")
    first = listing_hash(tmp_path)
    assert first.startswith("files:") and listing_hash(tmp_path) == first
    (tmp_path / "images" / "b.jpg").write_bytes(b"6")
    added = listing_hash(tmp_path)
    (tmp_path / "images" / "a.jpg").write_bytes(b"1234")
    assert len({first, added, listing_hash(tmp_path)}) == 3


def test_a_dataset_outside_the_project_is_fingerprinted_by_its_files(tmp_path):
    data_root = tmp_path / "data"
    assert data_fingerprint("flickr8k", data_root, project_root=tmp_path / "project") == "missing"
    (data_root / "flickr8k").mkdir(parents=True)
    (data_root / "flickr8k" / "captions.txt").write_text("a dog\n", encoding="utf-8")
    found = data_fingerprint("flickr8k", data_root, project_root=tmp_path / "project")
    assert found == listing_hash(data_root / "flickr8k")


def test_feedback_is_counted_after_a_time_and_never_creates_the_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback' / 'feedback.db'}"
    assert feedback_since(None, url) == 0
    assert not (tmp_path / "feedback").exists()
    store = FeedbackStore(url=url, root=tmp_path / "feedback")
    first = store.add(jpeg(), "a blue picture")
    store.add(jpeg(), "a plain blue picture")
    assert feedback_since(None, url, Review("none")) == 2
    assert feedback_since(first.created_at.isoformat(), url, Review("none")) == 1
    assert feedback_since(None, url) == 0  # params.yaml's rule: neither is agreed on nor approved


def test_the_feedback_fingerprint_changes_when_a_correction_is_stored(tmp_path):
    root, url = tmp_path / "feedback", f"sqlite:///{tmp_path / 'feedback' / 'feedback.db'}"
    empty = feedback_fingerprint(root, url)
    assert empty == "feedback:0:missing"
    store = FeedbackStore(url=url, root=root)
    store.add(jpeg(), "a blue picture")
    assert feedback_fingerprint(root, url).startswith("feedback:0:files:")  # stored, not admitted yet
    store.add(jpeg(), "A blue picture.", client="198.51.100.7")  # a second client agrees
    stored = feedback_fingerprint(root, url)
    assert stored.startswith("feedback:2:files:") and stored != empty


def test_git_commit_outside_a_repository_is_none(tmp_path):
    assert git_commit(tmp_path) is None


def test_the_lineage_of_a_checkout():
    lineage = collect_lineage(SETTINGS)
    assert set(lineage) == {"params_hash", "git_commit", "data_hash"}
    assert lineage["params_hash"] == params_hash(SETTINGS)
    commit = git_commit(PROJECT_ROOT)
    if (PROJECT_ROOT / ".git").exists():
        assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert lineage["git_commit"] == (commit or "unknown")
    assert lineage["data_hash"]  # a DVC hash, or why there is none
