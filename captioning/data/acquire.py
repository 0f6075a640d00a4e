"""Put a dataset in its official layout under data_dir()/NAME.

Three ways in, tried in this order:
1. `$CAPTIONING_MIRROR/NAME/` (or `mirror=`) holds the official archives: they are
   checked and unpacked.
2. `$CAPTIONING_MIRROR/NAME/` holds the dataset already unpacked: it is copied (never
   hard-linked: a mirror is often read-only and shared).
3. Otherwise the archives are downloaded from their official URLs (resumable,
   retried, checked) and unpacked.

A finished dataset folder carries `.acquired.json` (what came from where); with it
present `acquire` returns at once. This module never calls DVC: a `dvc repro` stage
holds the repository lock, so versioning is a separate step (`versioning.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterable

import requests

from captioning.config import data_dir, mirror_dir
from captioning.data.sources import Archive, sources_for

log = logging.getLogger(__name__)

MARKER = ".acquired.json"
DOWNLOADS = ".downloads"  # beside the dataset folders; listed in .dvcignore
CHUNK = 1 << 20  # bytes read at a time when hashing files
NET_CHUNK = 1 << 16  # bytes per network read: little is lost when a connection drops

# Files (glob patterns) whose presence anywhere under the dataset folder shows the layout is usable.
EXPECTED_FILES = {
    "flickr8k": ["Flickr8k.token.txt", "Flickr_8k.trainImages.txt"],
    "flickr30k": ["results_20130124.token", "dataset_flickr30k.json"],
    "mscoco": ["captions_*20[01][47].json"],
}


class AcquisitionError(RuntimeError):
    """A dataset could not be acquired; the message says what and what to do."""


# ---------------------------------------------------------------- acquire


def acquire(
    name: str,
    dest: str | Path | None = None,
    mirror: str | Path | None = None,
    progress: bool = True,
    sources: Iterable[Archive] | None = None,
    *,
    force: bool = False,
    retries: int = 4,
    backoff: float = 1.0,
    keep_archives: bool = False,
) -> Path:
    """Acquire dataset `name` into `dest` (default data_dir()/name) and return that folder.

    `mirror` (default $CAPTIONING_MIRROR) is a folder holding NAME/; `sources` replaces
    the official archive list (tests use a local server). Quick when already complete.
    """
    archives = list(sources) if sources is not None else sources_for(name)
    dest = Path(dest) if dest else data_dir() / name
    marker = dest / MARKER
    if marker.is_file() and not force:
        log.info("%s is already acquired in %s (%s)", name, dest, marker.name)
        return dest

    mirror_root = Path(mirror) if mirror else mirror_dir()
    folder = mirror_root / name if mirror_root else None
    dest.mkdir(parents=True, exist_ok=True)
    if folder is not None and folder.is_dir():
        held = [a for a in archives if (folder / a.filename).is_file()]
        if held:
            entries = _from_archives(name, archives, dest, folder, progress, retries, backoff, keep_archives)
            method = "mirror archives"
        else:
            entries = [_copy_tree(folder, dest, progress)]
            method = "mirror copy"
    else:
        if folder is not None:
            log.info("mirror %s has no %s/: downloading", mirror_root, name)
        entries = _from_archives(name, archives, dest, None, progress, retries, backoff, keep_archives)
        method = "download"

    _check_layout(name, dest)
    _write_marker(marker, name, method, folder, entries)
    log.info("%s acquired in %s (%s)", name, dest, method)
    return dest


def _from_archives(
    name: str,
    archives: list[Archive],
    dest: Path,
    folder: Path | None,
    progress: bool,
    retries: int,
    backoff: float,
    keep_archives: bool,
) -> list[dict]:
    """Take each archive from the mirror folder if it holds it, else download it; unpack."""
    entries = []
    downloads = dest.parent / DOWNLOADS
    for archive in archives:
        local = folder / archive.filename if folder is not None else None
        if local is not None and local.is_file():
            digest, verified = _verify_local(local, archive)
            source, fetched = str(local), False
        else:
            local = downloads / archive.filename
            try:
                digest = _download(archive.url, local, archive.sha256, retries, backoff, archive.size, progress)
            except AcquisitionError as error:
                hint = f"set CAPTIONING_MIRROR to a folder holding {name}/ with the official archives or the unpacked dataset"
                raise AcquisitionError(f"{error}; {hint}") from None
            verified = _verification(archive)
            source, fetched = archive.url, True
        safe_extract(local, dest / archive.extract_to, progress=progress)
        if fetched and not keep_archives:
            local.unlink()  # unpacked and checked: the archive would only double the disk use
        entries.append({
            "filename": archive.filename,
            "url": archive.url,
            "source": source,
            "sha256": digest,
            "verified": verified,
        })
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()
    return entries


def _verification(archive: Archive) -> str:
    if archive.sha256:
        return "sha256"
    log.warning(
        "%s has no published sha256: verified only by %s",
        archive.filename,
        "size and layout" if archive.size else "layout",
    )
    return "size+layout" if archive.size else "layout"


def _verify_local(path: Path, archive: Archive) -> tuple[str, str]:
    """Check an archive found in a mirror (never deleted: the mirror is not ours)."""
    if archive.size is not None and path.stat().st_size != archive.size:
        raise AcquisitionError(
            f"{path} is {path.stat().st_size} bytes, expected {archive.size}: the mirror copy is incomplete or different"
        )
    digest = file_sha256(path)
    if archive.sha256 and digest != archive.sha256:
        raise AcquisitionError(f"sha256 mismatch for {path}: expected {archive.sha256}, got {digest}")
    return digest, _verification(archive)


def _copy_tree(src: Path, dest: Path, progress: bool) -> dict:
    """Copy an unpacked mirror, file by file (plain copies: writable, no shared inodes).

    Files already present with the same size are kept, so an interrupted copy resumes.
    """
    from tqdm import tqdm

    files = sorted(p for p in src.rglob("*") if p.is_file())
    copied = total = 0
    for path in tqdm(files, desc=f"copy {src.name}", unit="file", disable=not progress):
        target = dest / path.relative_to(src)
        size = path.stat().st_size
        total += size
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied += 1
    log.info("copied %d of %d files (%.1f MB) from %s", copied, len(files), total / 1e6, src)
    return {"source": str(src), "files": len(files), "bytes": total, "verified": "layout"}


def _check_layout(name: str, dest: Path) -> None:
    for pattern in EXPECTED_FILES.get(name, []):
        if next(dest.rglob(pattern), None) is None:
            raise AcquisitionError(f"{dest} has no {pattern} after acquiring {name}: not the official layout")


def _write_marker(marker: Path, name: str, method: str, mirror: Path | None, entries: list[dict]) -> None:
    info = {
        "dataset": name,
        "method": method,
        "mirror": str(mirror) if mirror is not None and method != "download" else None,
        "acquired_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "archives": entries,
    }
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    tmp.replace(marker)


def read_marker(folder: str | Path) -> dict | None:
    """What `.acquired.json` says about an acquired dataset folder, or None."""
    path = Path(folder) / MARKER
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------- download


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    path: str | Path,
    sha256: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    *,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download `url` to `path`, resuming `path.part` with HTTP Range after interruptions.

    Failed attempts are retried `retries` times, waiting backoff * 2**n seconds.
    A sha256 mismatch deletes the partial file and raises with both digests.
    """
    _download(url, Path(path), sha256, retries, backoff, size, progress, timeout)
    return Path(path)


def _download(
    url: str,
    path: Path,
    sha256: str | None,
    retries: int,
    backoff: float,
    size: int | None,
    progress: bool,
    timeout: float = 30.0,
) -> str:
    """download(), returning the sha256 of the finished file."""
    path = Path(path)
    if path.is_file():  # finished by an earlier run that stopped before unpacking
        digest = file_sha256(path)
        if (sha256 is None or digest == sha256) and (size is None or path.stat().st_size == size):
            return digest
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")

    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            digest = _fetch(url, part, size, progress, timeout)
            break
        except _Retryable as error:
            after = part.stat().st_size if part.exists() else 0
            failures = 0 if after > before else failures + 1  # progress resets the count
            if failures > retries:
                raise AcquisitionError(f"cannot download {url}: {error} (after {retries + 1} attempts)") from None
            wait = backoff * 2 ** max(failures - 1, 0)
            log.info("download of %s interrupted (%s); retrying in %.1f s", url, error, wait)
            time.sleep(wait)

    if sha256 is not None and digest != sha256:
        part.unlink()
        raise AcquisitionError(
            f"sha256 mismatch for {url}: expected {sha256}, got {digest}; the partial file was deleted"
        )
    if size is not None and part.stat().st_size != size:
        actual = part.stat().st_size
        part.unlink()
        raise AcquisitionError(f"size mismatch for {url}: expected {size} bytes, got {actual}; the partial file was deleted")
    part.replace(path)
    return digest


class _Retryable(Exception):
    """A failure worth another attempt (network trouble, server error, short body)."""


def _fetch(url: str, part: Path, size: int | None, progress: bool, timeout: float) -> str:
    """One attempt: append to `part` from where it stops; return the sha256 of the whole file."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as error:
        raise _Retryable(_reason(error)) from None

    with response:
        status = response.status_code
        if status == 416 and offset:  # nothing left to send: the part file is complete
            total = _range_total(response.headers.get("Content-Range", ""))
            if total == offset or (total is None and size == offset):
                return file_sha256(part)
            part.unlink()
            raise _Retryable("server refused the resume range; starting again")
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"HTTP {status}")
        if status >= 400:
            raise AcquisitionError(f"cannot download {url}: HTTP {status}")
        if status == 206 and _range_start(response.headers.get("Content-Range", "")) != offset:
            part.unlink()
            raise _Retryable("server resumed at the wrong offset; starting again")
        if status != 206:
            offset = 0  # the server ignored Range and sends everything

        digest = hashlib.sha256()
        if offset:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(block)
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else size
        received = offset
        bar = tqdm(total=expected, initial=offset, unit="B", unit_scale=True,
                   desc=part.name[: -len(".part")], disable=not progress)
        try:
            with open(part, "ab" if offset else "wb") as handle:
                for chunk in response.iter_content(NET_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (requests.RequestException, OSError) as error:
            raise _Retryable(_reason(error)) from None
        finally:
            bar.close()
        if length is not None and received < expected:
            raise _Retryable(f"connection closed after {received} of {expected} bytes")
        return digest.hexdigest()


def _reason(error: Exception) -> str:
    """The innermost useful text of a requests error, on one line."""
    text = str(error)
    match = re.search(r"\[Errno [^\]]+\][^')\"]*", text)
    return (match.group(0) if match else text).replace("\n", " ")[:200]


def _range_start(content_range: str) -> int | None:
    match = re.match(r"bytes (\d+)-", content_range)
    return int(match.group(1)) if match else None


def _range_total(content_range: str) -> int | None:
    match = re.search(r"/(\d+)$", content_range)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- extract


def safe_extract(archive: str | Path, dest: str | Path, progress: bool = False) -> list[str]:
    """Unpack a zip or tar archive into `dest`; return the member names written.

    Every member is checked before anything is written: absolute paths, `..` and links
    that point outside `dest` are refused with an error naming the member. macOS
    resource forks (`__MACOSX/`, present in the official Flickr8k zip) are skipped.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, root, progress)
        if tarfile.is_tarfile(archive):
            return _extract_tar(archive, root, progress)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
        raise AcquisitionError(f"{archive.name} is damaged: {error}") from None
    raise AcquisitionError(f"{archive.name} is neither a zip nor a tar archive")


def _skipped(name: str) -> bool:
    return name.startswith("__MACOSX/") or name.rstrip("/") == "__MACOSX"


def _check_path(archive: Path, name: str, root: str) -> str:
    """Where member `name` would land; refuse absolute paths and `..`."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise AcquisitionError(f"refusing to extract {archive.name}: member {name!r} has an absolute path")
    if ".." in PurePosixPath(clean).parts:
        raise AcquisitionError(f"refusing to extract {archive.name}: member {name!r} contains '..'")
    return os.path.normpath(os.path.join(root, clean))


def _check_link(archive: Path, name: str, target: str, base: str, root: str) -> None:
    """Refuse a link whose target (relative to `base`) resolves outside `root`."""
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
        raise AcquisitionError(f"refusing to extract {archive.name}: link {name!r} points to absolute path {target!r}")
    resolved = os.path.normpath(os.path.join(base, target))
    if resolved != root and not resolved.startswith(root + os.sep):
        raise AcquisitionError(f"refusing to extract {archive.name}: link {name!r} points outside the target ({target!r})")


def _zip_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _extract_zip(archive: Path, root: str, progress: bool) -> list[str]:
    from tqdm import tqdm

    with zipfile.ZipFile(archive) as zf:
        members = [info for info in zf.infolist() if not _skipped(info.filename)]
        links = {}
        for info in members:
            where = _check_path(archive, info.filename, root)
            if _zip_link(info):
                target = zf.read(info).decode("utf-8")
                _check_link(archive, info.filename, target, os.path.dirname(where), root)
                links[info.filename] = target
        for info in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
            if info.filename in links:
                where = _check_path(archive, info.filename, root)
                os.makedirs(os.path.dirname(where), exist_ok=True)
                if os.path.lexists(where):
                    os.unlink(where)
                os.symlink(links[info.filename], where)
            else:
                zf.extract(info, root)
        return [info.filename for info in members]


def _extract_tar(archive: Path, root: str, progress: bool) -> list[str]:
    from tqdm import tqdm

    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if not _skipped(m.name)]
        for member in members:
            where = _check_path(archive, member.name, root)
            if member.issym():
                _check_link(archive, member.name, member.linkname, os.path.dirname(where), root)
            elif member.islnk():
                _check_link(archive, member.name, member.linkname, root, root)
            elif not (member.isfile() or member.isdir()):
                raise AcquisitionError(f"refusing to extract {archive.name}: member {member.name!r} is a device or pipe")
        for member in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
            # The "data" filter repeats the checks above inside tarfile itself.
            tf.extract(member, root, filter="data")
        return [m.name for m in members]
