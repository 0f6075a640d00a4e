"""Malicious and damaged archives, built at test time: link chains that lead out of the target,
decompression bombs, archives that are not the published ones. Each is refused with an error that
names the problem, before anything is written, and nothing lands outside the target."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from captioning.data.acquire import MARKER, RATIO_FLOOR, AcquisitionError, acquire, read_marker, safe_extract
from captioning.data.sources import Archive
from tests.fixtures.official import make_archives, make_flickr8k
from tests.robustness.conftest import record_figures


def zip_of(members: list[tuple[str, bytes | str]]) -> bytes:
    """A zip; a str value makes the member a symlink to that target."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, value in members:
            info = zipfile.ZipInfo(name)
            if isinstance(value, str):
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                value = value.encode()
            zf.writestr(info, value)
    return buffer.getvalue()


def tar_of(members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar; a str value makes the member a symlink to that target."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, value in members:
            info = tarfile.TarInfo(name)
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tf.addfile(info)
            else:
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
    return buffer.getvalue()


# Each link alone stays inside the target; followed in order they lead to its parent.
CHAIN = [("a", "."), ("a/b", ".."), ("b/x", b"written outside")]
# `c -> d/..` is inside while d does not exist; `d -> .` then makes c the target's parent.
REDIRECTED = [("c", "d/.."), ("d", "."), ("fine.txt", b"fine")]
CASES = {
    "zip chain": ("chain.zip", zip_of, CHAIN, "'a/b' points outside the target"),
    "tar chain": ("chain.tar", tar_of, CHAIN, "'a/b' points outside the target"),
    "zip redirected link": ("late.zip", zip_of, REDIRECTED, "'c' points outside the target once later links"),
    "tar redirected link": ("late.tar", tar_of, REDIRECTED, "'c' points outside the target once later links"),
    "zip write through a redirected link": (
        "late2.zip",
        zip_of,
        [("c", "d/.."), ("d", "."), ("c/x", b"!")],
        "'c/x' would be written outside",
    ),
    "tar write through a redirected link": (
        "late2.tar",
        tar_of,
        [("c", "d/.."), ("d", "."), ("c/x", b"!")],
        "'c/x' would be written outside",
    ),
    "tar link loop": ("loop.tar", tar_of, [("p", "q"), ("q", "p"), ("p/x", b"!")], "too many levels of links"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_link_chains_that_leave_the_target_are_refused_before_writing(tmp_path, case):
    filename, build, members, message = CASES[case]
    archive = tmp_path / filename
    archive.write_bytes(build(members))
    box = tmp_path / "box"
    dest = box / "inner" / "dest"

    with pytest.raises(AcquisitionError, match=message) as error:
        safe_extract(archive, dest)

    assert filename in str(error.value)
    assert list(dest.iterdir()) == [] and list(box.rglob("*")) == [box / "inner", dest]  # nothing anywhere
    assert not (box / "inner" / "x").exists() and not (box / "x").exists()
    record_figures(f"archive: {case}", {"refused": True, "files_written": 0, "files_outside_target": 0})


def test_links_that_stay_inside_still_unpack(tmp_path):
    archive = tmp_path / "ok.zip"
    archive.write_bytes(
        zip_of([("data/real.txt", b"content"), ("alias", "data"), ("alias/more.txt", b"more"), ("up", "data/..")])
    )
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "data" / "more.txt").read_bytes() == b"more"  # written through the link
    assert (tmp_path / "out" / "up" / "data" / "real.txt").read_bytes() == b"content"


def _zeros_zip(path: Path, size: int) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.bin", "w") as member:
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            member.write(block)


def test_a_zip_bomb_is_refused_by_its_ratio_before_writing(tmp_path):
    archive = tmp_path / "bomb.zip"
    _zeros_zip(archive, RATIO_FLOOR + (16 << 20))  # 80 MiB of zeros in about 80 KB

    with pytest.raises(AcquisitionError, match=r"bomb.zip: it unpacks \d+ bytes into \d+ \(ratio \d+, limit 100\)"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    record_figures(
        "archive: zip bomb",
        {
            "archive_bytes": archive.stat().st_size,
            "declared_bytes": RATIO_FLOOR + (16 << 20),
            "refused": True,
            "files_written": 0,
        },
    )


def test_a_tar_gz_bomb_is_refused_once_its_headers_pass_the_limit(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    size = RATIO_FLOOR + (16 << 20)
    with tarfile.open(archive, "w:gz") as tf:
        for number in range(3):  # refused at the second member: the third is never decompressed
            info = tarfile.TarInfo(f"zeros{number}.bin")
            info.size = size
            tf.addfile(info, io.BytesIO(bytes(size)))

    with pytest.raises(AcquisitionError, match="decompression bomb"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_too_many_bytes_or_members_are_refused_before_writing(tmp_path):
    archive = tmp_path / "big.zip"
    archive.write_bytes(zip_of([(f"file{n}.txt", b"x" * 1000) for n in range(20)]))
    with pytest.raises(AcquisitionError, match="it unpacks to 20000 bytes, more than the limit of 5000"):
        safe_extract(archive, tmp_path / "out", max_bytes=5000)
    with pytest.raises(AcquisitionError, match="it has 20 members, more than the limit of 10"):
        safe_extract(archive, tmp_path / "out", max_members=10)
    assert list((tmp_path / "out").iterdir()) == []
    assert len(safe_extract(archive, tmp_path / "out")) == 20  # within the default limits


def test_an_archive_without_the_published_file_count_is_refused(tmp_path):
    archive = tmp_path / "Flickr8k_Dataset.zip"
    archive.write_bytes(
        zip_of(
            [
                ("Flicker8k_Dataset/1.jpg", b"a"),
                ("Flicker8k_Dataset/2.jpg", b"b"),
                ("__MACOSX/Flicker8k_Dataset/._1.jpg", b"fork"),
                ("readme.txt", b"r"),
            ]
        )
    )
    with pytest.raises(AcquisitionError, match=r"holds 2 files matching '\*.jpg', the published count is 3"):
        safe_extract(archive, tmp_path / "out", files=("*.jpg", 3))
    assert list((tmp_path / "out").iterdir()) == []
    assert len(safe_extract(archive, tmp_path / "out", files=("*.jpg", 2))) == 3  # resource forks skipped


def _mirror_with(tmp_path: Path, archives) -> Path:
    mirror = tmp_path / "mirror"
    (mirror / "flickr8k").mkdir(parents=True)
    for name, data, _ in archives:
        (mirror / "flickr8k" / name).write_bytes(data)
    return mirror


def test_acquire_checks_a_published_md5_and_a_file_count(tmp_path):
    archives = make_archives("flickr8k", make_flickr8k(tmp_path / "fixture"))
    mirror = _mirror_with(tmp_path, archives)
    md5 = {name: hashlib.md5(data).hexdigest() for name, data, _ in archives}
    images = sum(
        1
        for name in zipfile.ZipFile(io.BytesIO(archives[0][1])).namelist()
        if name.endswith(".jpg") and not name.startswith("__MACOSX")
    )
    sources = [
        Archive(
            name,
            f"https://127.0.0.1:9/{name}",
            md5=md5[name],
            files=("*.jpg", images) if name == "Flickr8k_Dataset.zip" else None,
        )
        for name, _, _ in archives
    ]

    folder = acquire("flickr8k", mirror=mirror, progress=False, sources=sources, retries=0)
    assert [entry["verified"] for entry in read_marker(folder)["archives"]] == ["md5", "md5"]

    wrong = [
        Archive(s.filename, s.url, md5="0" * 32 if s.filename == "Flickr8k_text.zip" else s.md5, files=s.files)
        for s in sources
    ]
    with pytest.raises(
        AcquisitionError,
        match=f"md5 mismatch for Flickr8k_text.zip: expected {'0' * 32}, got {md5['Flickr8k_text.zip']}",
    ):
        acquire("flickr8k", dest=tmp_path / "again", mirror=mirror, progress=False, sources=wrong, retries=0)
    assert not (tmp_path / "again" / MARKER).exists()
    assert (mirror / "flickr8k" / "Flickr8k_text.zip").is_file()  # a mirror's file is never deleted
