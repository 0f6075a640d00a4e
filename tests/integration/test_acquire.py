"""Acquisition against a real HTTP server on 127.0.0.1, real archives, real mirrors, real DVC."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from captioning.config import data_dir
from captioning.data.acquire import MARKER, AcquisitionError, acquire, download, read_marker, safe_extract
from captioning.data.datasets import load_dataset
from captioning.data.sources import Archive
from captioning.data.versioning import data_hash, track_with_dvc
from tests.fixtures.official import as_sources, make_archives, make_flickr8k, make_flickr30k, make_mscoco


class ArchiveServer:
    """Serves `files` by name, honours `Range: bytes=N-`, and can cut a response half-way once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                owner.requests.append((name, self.headers.get("Range")))
                data = owner.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start, ranged = 0, self.headers.get("Range")
                if ranged:
                    start = int(re.fullmatch(r"bytes=(\d+)-", ranged).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in owner.cut_once:
                    owner.cut_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
    monkeypatch.delenv("CAPTIONING_MIRROR", raising=False)


# ---------------------------------------------------------------- download


def test_download_resumes_with_range_after_a_cut(tmp_path):
    blob = random.Random(0).randbytes(600_000)
    with ArchiveServer({"blob.bin": blob}) as server:
        server.cut_once.add("blob.bin")
        path = download(
            server.url("blob.bin"),
            tmp_path / "blob.bin",
            hashlib.sha256(blob).hexdigest(),
            retries=2,
            backoff=0.01,
            progress=False,
        )

    assert path.read_bytes() == blob
    assert not (tmp_path / "blob.bin.part").exists()
    assert server.requests[0] == ("blob.bin", None)
    resumed = [r for name, r in server.requests[1:] if name == "blob.bin"]
    assert len(resumed) == 1
    start = int(resumed[0].split("=")[1].rstrip("-"))
    assert 0 < start <= len(blob) // 2


def test_checksum_mismatch_deletes_the_partial_file_and_names_both_digests(tmp_path):
    blob = b"not the archive you expected" * 100
    wrong = "0" * 64
    with ArchiveServer({"a.zip": blob}) as server:
        with pytest.raises(AcquisitionError) as error:
            download(server.url("a.zip"), tmp_path / "a.zip", wrong, retries=0, progress=False)

    message = str(error.value)
    assert wrong in message and hashlib.sha256(blob).hexdigest() in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_not_retried(tmp_path):
    with ArchiveServer({}) as server:
        with pytest.raises(AcquisitionError, match="HTTP 404"):
            download(server.url("gone.zip"), tmp_path / "gone.zip", retries=3, backoff=0.01, progress=False)
    assert len(server.requests) == 1


# ---------------------------------------------------------------- safe_extract


def _zip_with(name: str, data: bytes = b"x", link: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("good.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
    return buffer.getvalue()


def _tar_with(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        good = tarfile.TarInfo("good.txt")
        good.size = 4
        tf.addfile(good, io.BytesIO(b"fine"))
        bad = tarfile.TarInfo(name)
        bad.type, bad.linkname = kind, target
        tf.addfile(bad, io.BytesIO(b""))
    return buffer.getvalue()


BAD_ARCHIVES = {
    "zip-dotdot": ("bad.zip", lambda: _zip_with("../../escaped.txt"), "../../escaped.txt"),
    "zip-absolute": ("bad.zip", lambda: _zip_with("/tmp/captioning-escaped.txt"), "/tmp/captioning-escaped.txt"),
    "zip-symlink": ("bad.zip", lambda: _zip_with("link", b"../../outside", link=True), "link"),
    "tar-dotdot": ("bad.tar", lambda: _tar_with("sub/../../escaped.txt"), "sub/../../escaped.txt"),
    "tar-symlink": ("bad.tar", lambda: _tar_with("link", tarfile.SYMTYPE, "../../outside"), "link"),
    "tar-absolute-symlink": ("bad.tar", lambda: _tar_with("etc", tarfile.SYMTYPE, "/etc"), "etc"),
    "tar-hardlink": ("bad.tar", lambda: _tar_with("hard", tarfile.LNKTYPE, "../outside"), "hard"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_safe_extract_refuses_members_that_leave_the_target(tmp_path, case):
    filename, build, member = BAD_ARCHIVES[case]
    archive = tmp_path / filename
    archive.write_bytes(build())
    box = tmp_path / "box"
    dest = box / "dest"

    with pytest.raises(AcquisitionError) as error:
        safe_extract(archive, dest)

    assert repr(member) in str(error.value)
    assert list(box.iterdir()) == [dest] and list(dest.iterdir()) == []  # nothing written, anywhere
    assert not Path("/tmp/captioning-escaped.txt").exists()


def test_safe_extract_keeps_links_inside_the_target(tmp_path):
    archive = tmp_path / "ok.tar"
    archive.write_bytes(_tar_with("alias.txt", tarfile.SYMTYPE, "good.txt"))
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "alias.txt").read_text() == "fine"


def test_safe_extract_refuses_a_damaged_archive(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK\x03\x04 this is no zip")
    with pytest.raises(AcquisitionError, match="broken.zip"):
        safe_extract(archive, tmp_path / "out")


# ---------------------------------------------------------------- acquire


def test_acquire_flickr8k_over_http_resumes_verifies_and_is_idempotent(tmp_path):
    archives = make_archives("flickr8k", make_flickr8k(tmp_path / "fixture"))
    with ArchiveServer({name: data for name, data, _ in archives}) as server:
        server.cut_once.add("Flickr8k_Dataset.zip")
        folder = acquire(
            "flickr8k", progress=False, sources=as_sources(archives, server.url()), retries=2, backoff=0.01
        )
        first = list(server.requests)
        again = acquire("flickr8k", progress=False, sources=as_sources(archives, server.url()))
        assert server.requests == first  # complete: nothing fetched again

    assert folder == again == tmp_path / "data" / "flickr8k"
    # The cut came before a whole network chunk arrived, so the retry starts again (no Range).
    assert [name for name, _ in first].count("Flickr8k_Dataset.zip") == 2
    assert (folder / "Flicker8k_Dataset").is_dir() and (folder / "Flickr8k.token.txt").is_file()
    assert not (folder / "__MACOSX").exists()
    assert not (folder.parent / ".downloads").exists()  # archives removed once unpacked
    marker = read_marker(folder)
    assert marker["method"] == "download"
    assert {a["filename"]: a["verified"] for a in marker["archives"]} == {
        "Flickr8k_Dataset.zip": "sha256",
        "Flickr8k_text.zip": "sha256",
    }
    dataset = load_dataset("flickr8k")
    assert len(dataset.records) == 8 and all(os.path.isfile(r.path) for r in dataset.records)


def test_acquire_without_published_digest_says_so(tmp_path, caplog):
    archives = make_archives("flickr30k", make_flickr30k(tmp_path / "fixture"))
    with ArchiveServer({name: data for name, data, _ in archives}) as server:
        with caplog.at_level(logging.WARNING, logger="captioning.data.acquire"):
            folder = acquire("flickr30k", progress=False, sources=as_sources(archives, server.url(), with_sha=False))

    lines = [r.getMessage() for r in caplog.records if "no published sha256" in r.getMessage()]
    assert len(lines) == 3 and all("verified only by size and layout" in line for line in lines)
    assert read_marker(folder)["archives"][1]["verified"] == "size+layout"
    assert (folder / "results_20130124.token").is_file()  # from the tar.gz
    assert len(load_dataset("flickr30k", folder).records) == 8


def _read_only(folder: Path, writable: bool = False) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = 0o755 if path.is_dir() else 0o644
        path.chmod(mode if writable else mode & ~0o222)


def test_acquire_copies_an_unpacked_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    make_flickr8k(mirror / "flickr8k", layout="mirror")
    _read_only(mirror)
    monkeypatch.setenv("CAPTIONING_MIRROR", str(mirror))
    try:
        folder = acquire(
            "flickr8k",
            progress=False,
            sources=[Archive("Flickr8k_Dataset.zip", f"http://127.0.0.1:{closed_port()}/Flickr8k_Dataset.zip")],
        )
    finally:
        _read_only(mirror, writable=True)

    source = mirror / "flickr8k" / "Flickr8k.token.txt"
    copy = folder / "Flickr8k.token.txt"
    assert copy.read_bytes() == source.read_bytes()
    assert copy.stat().st_ino != source.stat().st_ino and copy.stat().st_nlink == 1
    assert os.access(copy, os.W_OK) and os.access(folder / "images", os.W_OK)
    assert read_marker(folder)["method"] == "mirror copy"
    dataset = load_dataset("flickr8k")
    assert {s: len(r) for s, r in dataset.splits().items()} == {"train": 4, "val": 2, "test": 2}
    assert all(Path(r.path).parent == folder / "images" for r in dataset.records)


def test_acquire_refuses_a_mirror_link_that_leaves_the_mirror(tmp_path, monkeypatch):
    """An unpacked mirror whose file links outside it (here to a private file) copies nothing."""
    mirror = tmp_path / "mirror"
    make_flickr8k(mirror / "flickr8k", layout="mirror")
    secret = tmp_path / "secret.txt"
    secret.write_text("not a dataset file")
    (mirror / "flickr8k" / "images" / "zz_link.jpg").symlink_to(secret)
    inside = mirror / "flickr8k" / "Flickr8k.lemma.token.txt"
    inside.symlink_to(mirror / "flickr8k" / "Flickr8k.token.txt")  # a link inside the mirror is fine
    monkeypatch.setenv("CAPTIONING_MIRROR", str(mirror))
    closed = [Archive("Flickr8k_Dataset.zip", f"http://127.0.0.1:{closed_port()}/Flickr8k_Dataset.zip")]
    with pytest.raises(AcquisitionError, match="outside the mirror"):
        acquire("flickr8k", progress=False, sources=closed)
    dest = data_dir() / "flickr8k"
    assert not any(p.is_file() for p in dest.rglob("*")), "nothing is copied before the refusal"
    (mirror / "flickr8k" / "images" / "zz_link.jpg").unlink()
    folder = acquire("flickr8k", progress=False, sources=closed)
    copy = folder / "Flickr8k.lemma.token.txt"
    assert not copy.is_symlink() and copy.read_bytes() == (folder / "Flickr8k.token.txt").read_bytes()


def test_acquire_unpacks_a_mirror_of_official_archives(tmp_path):
    archives = make_archives("flickr8k", make_flickr8k(tmp_path / "fixture"))
    mirror = tmp_path / "mirror"
    (mirror / "flickr8k").mkdir(parents=True)
    for name, data, _ in archives:
        (mirror / "flickr8k" / name).write_bytes(data)
    offline = as_sources(archives, f"http://127.0.0.1:{closed_port()}")

    folder = acquire("flickr8k", mirror=mirror, progress=False, sources=offline, retries=0)

    assert read_marker(folder)["method"] == "mirror archives"
    assert all((mirror / "flickr8k" / name).is_file() for name, _, _ in archives)  # mirror untouched
    assert len(load_dataset("flickr8k").records) == 8


def test_acquire_mscoco_from_mirror_archives_reads_the_karpathy_split(tmp_path):
    archives = make_archives(
        "mscoco", make_mscoco(tmp_path / "fixture", karpathy=True, n_train=3, n_val=3, years=(2014, 2017))
    )
    mirror = tmp_path / "mirror"
    (mirror / "mscoco").mkdir(parents=True)
    for name, data, _ in archives:
        (mirror / "mscoco" / name).write_bytes(data)

    folder = acquire(
        "mscoco",
        mirror=mirror,
        progress=False,
        sources=as_sources(archives, f"http://127.0.0.1:{closed_port()}"),
        retries=0,
    )

    assert {p.name for p in folder.iterdir()} >= {"annotations", "train2014", "val2014", "train2017", "val2017"}
    dataset = load_dataset("mscoco")
    assert {s: len(r) for s, r in dataset.splits().items()} == {"train": 3, "restval": 1, "val": 1, "test": 1}
    assert all(os.path.isfile(r.path) for r in dataset.records)


def test_acquire_refuses_a_mirror_without_the_official_files(tmp_path):
    mirror = tmp_path / "mirror"
    make_flickr8k(mirror / "flickr8k", layout="mirror")
    (mirror / "flickr8k" / "Flickr8k.token.txt").unlink()

    with pytest.raises(AcquisitionError, match="has no Flickr8k.token.txt"):
        acquire("flickr8k", mirror=mirror, progress=False, sources=[])
    assert not (tmp_path / "data" / "flickr8k" / MARKER).exists()


def test_acquire_refuses_a_mirror_archive_with_the_wrong_checksum(tmp_path):
    archives = make_archives("flickr8k", make_flickr8k(tmp_path / "fixture"))
    mirror = tmp_path / "mirror" / "flickr8k"
    mirror.mkdir(parents=True)
    for name, data, _ in archives:
        (mirror / name).write_bytes(data)
    damaged = bytearray(archives[1][1])
    damaged[-30] ^= 0xFF
    (mirror / archives[1][0]).write_bytes(damaged)

    with pytest.raises(AcquisitionError) as error:
        acquire(
            "flickr8k",
            mirror=tmp_path / "mirror",
            progress=False,
            sources=as_sources(archives, f"http://127.0.0.1:{closed_port()}"),
        )
    assert archives[1][2] in str(error.value) and hashlib.sha256(damaged).hexdigest() in str(error.value)
    assert (mirror / archives[1][0]).is_file()
    assert not (tmp_path / "data" / "flickr8k" / MARKER).exists()


def test_no_network_and_no_mirror_names_the_url_and_the_mirror_setting(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/Flickr8k_Dataset.zip"
    with pytest.raises(AcquisitionError) as error:
        acquire("flickr8k", progress=False, sources=[Archive("Flickr8k_Dataset.zip", url)], retries=1, backoff=0.01)
    message = str(error.value)
    assert url in message and "CAPTIONING_MIRROR" in message and "flickr8k/" in message
    assert "\n" not in message
    assert not (tmp_path / "data" / "flickr8k" / MARKER).exists()


# ---------------------------------------------------------------- DVC


def test_track_with_dvc_records_the_data_folder(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, env=env, check=True)
    dataset = make_flickr8k(repo / "data" / "flickr8k", n_per_split=1)

    assert data_hash(repo) is None
    dvc_file = track_with_dvc(dataset, repo_root=repo)
    assert dvc_file == repo / "data.dvc"
    first = data_hash(repo)
    assert first and first.endswith(".dir")

    (dataset / "Flickr8k.token.txt").write_text("changed\n")
    track_with_dvc(dataset, repo_root=repo)
    assert data_hash(repo) not in (None, first)

    assert track_with_dvc(tmp_path / "elsewhere", repo_root=repo) is None  # outside the repo
    assert track_with_dvc(dataset, repo_root=tmp_path) is None  # not a DVC repo


def test_a_download_that_differs_from_the_first_copy_is_refused_and_deleted(tmp_path):
    """flickr30k-images.zip has no published digest: the first download's sha256 is trusted, and a
    later download with other bytes (a swapped file at the same URL) is refused and deleted."""
    archives = make_archives("flickr30k", make_flickr30k(tmp_path / "fixture"))
    with ArchiveServer({name: data for name, data, _ in archives}) as server:
        sources = [Archive(name, f"{server.url().rstrip('/')}/{name}") for name, _, _ in archives]
        folder = acquire("flickr30k", progress=False, sources=sources)
        trusted = next(e for e in read_marker(folder)["archives"] if e["filename"] == "flickr30k-images.zip")
        images = server.files["flickr30k-images.zip"]
        server.files["flickr30k-images.zip"] = images[:-22] + b"swapped!" + images[-14:]  # same size
        with pytest.raises(AcquisitionError, match="differs from the copy first acquired"):
            acquire("flickr30k", progress=False, sources=sources, force=True)
    assert not (folder.parent / ".downloads" / "flickr30k-images.zip").exists()
    kept = next(e for e in read_marker(folder)["archives"] if e["filename"] == "flickr30k-images.zip")
    assert kept == trusted
