"""Archives with no published sha256 (flickr30k-images.zip) are trusted on first use: the marker
records the first copy's sha256 and a later copy that differs is refused before unpacking."""

from __future__ import annotations

import io
import zipfile

import pytest

from captioning.data.acquire import MARKER, AcquisitionError, acquire, first_digests, read_marker
from captioning.data.sources import Archive, sources_for
from tests.fixtures.official import make_archives, make_flickr30k


def mirror_of(tmp_path):
    archives = make_archives("flickr30k", make_flickr30k(tmp_path / "fixture"))
    folder = tmp_path / "mirror" / "flickr30k"
    folder.mkdir(parents=True)
    for filename, data, _ in archives:
        (folder / filename).write_bytes(data)
    # The official entries without any digest or size: only the first copy can vouch for them.
    sources = [Archive(filename, f"https://example.invalid/{filename}") for filename, _, _ in archives]
    return folder, sources


def test_a_later_copy_that_differs_from_the_first_is_refused(tmp_path):
    folder, sources = mirror_of(tmp_path)
    dest = tmp_path / "data" / "flickr30k"
    acquire("flickr30k", dest, mirror=tmp_path / "mirror", progress=False, sources=sources)
    first = {entry["filename"]: entry for entry in read_marker(dest)["archives"]}
    assert all(entry["first_acquired_at"] for entry in first.values())

    # The same copies again: accepted, still trusted since the first acquisition.
    acquire("flickr30k", dest, mirror=tmp_path / "mirror", progress=False, sources=sources, force=True)
    again = {entry["filename"]: entry for entry in read_marker(dest)["archives"]}
    assert {k: (v["sha256"], v["first_acquired_at"]) for k, v in again.items()} == {
        k: (v["sha256"], v["first_acquired_at"]) for k, v in first.items()
    }

    # A swapped images archive: same name, same layout, other bytes.
    swapped = io.BytesIO()
    with zipfile.ZipFile(folder / "flickr30k-images.zip") as original, zipfile.ZipFile(swapped, "w") as copy:
        for info in original.infolist():
            copy.writestr(info.filename, original.read(info) + b"\x00")  # a changed picture each
    (folder / "flickr30k-images.zip").write_bytes(swapped.getvalue())
    marker_before = (dest / MARKER).read_text()
    with pytest.raises(AcquisitionError, match="flickr30k-images.zip differs from the copy first acquired"):
        acquire("flickr30k", dest, mirror=tmp_path / "mirror", progress=False, sources=sources, force=True)
    assert (dest / MARKER).read_text() == marker_before  # the trusted record is kept
    assert (folder / "flickr30k-images.zip").is_file()  # a mirror's copy is never deleted

    # Deleting the marker trusts a new first copy, and says so in the new marker.
    (dest / MARKER).unlink()
    acquire("flickr30k", dest, mirror=tmp_path / "mirror", progress=False, sources=sources, force=True)
    images = next(e for e in read_marker(dest)["archives"] if e["filename"] == "flickr30k-images.zip")
    assert images["sha256"] != first["flickr30k-images.zip"]["sha256"]


def test_only_archives_without_a_published_sha256_are_pinned():
    marker = {
        "acquired_at": "2026-01-01T00:00:00+00:00",
        "archives": [
            {"filename": "flickr30k-images.zip", "sha256": "a" * 64},
            {"filename": "caption_datasets.zip", "sha256": "b" * 64},
            {"filename": "flickr30k.tar.gz", "sha256": "c" * 64, "first_acquired_at": "2025-05-05T00:00:00+00:00"},
        ],
    }
    pins = first_digests(marker, sources_for("flickr30k"))
    # caption_datasets.zip has a published sha256: that, not a first copy, is its check.
    assert pins == {
        "flickr30k-images.zip": {"sha256": "a" * 64, "since": "2026-01-01T00:00:00+00:00"},
        "flickr30k.tar.gz": {"sha256": "c" * 64, "since": "2025-05-05T00:00:00+00:00"},
    }
    assert first_digests(None, sources_for("flickr30k")) == {}
    assert not next(a for a in sources_for("flickr30k") if a.filename == "flickr30k-images.zip").sha256
