"""Every official dataset source is fetched over https and carries a published check."""

from __future__ import annotations

import re

import pytest

from captioning.data.sources import SOURCES, sources_for


def test_every_source_uses_https():
    plain = [
        archive.url for archives in SOURCES.values() for archive in archives if not archive.url.startswith("https://")
    ]
    assert plain == []


def test_every_archive_carries_a_digest_or_a_file_count():
    for name, archives in SOURCES.items():
        for archive in archives:
            assert archive.sha256 or archive.md5 or archive.files, f"{name}: {archive.filename} has no check"
            if archive.sha256:
                assert re.fullmatch(r"[0-9a-f]{64}", archive.sha256) and archive.size
            if archive.md5:
                assert re.fullmatch(r"[0-9a-f]{32}", archive.md5)
            if archive.files:
                pattern, count = archive.files
                assert pattern and count > 0


def test_published_flickr_counts():
    flickr8k = {archive.filename: archive for archive in sources_for("flickr8k")}
    assert flickr8k["Flickr8k_Dataset.zip"].files == ("*.jpg", 8091)
    assert {archive.filename: archive.files for archive in sources_for("flickr30k")}["flickr30k-images.zip"] == (
        "*.jpg",
        31783,
    )
    with pytest.raises(KeyError, match="known: flickr30k, flickr8k, mscoco"):
        sources_for("flickr9k")
