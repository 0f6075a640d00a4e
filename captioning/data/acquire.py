"""Put a dataset in its official layout under data_dir()/NAME.

Three ways in, tried in this order:
1. `$CAPTIONING_MIRROR/NAME/` (or `mirror=`) holds the official archives: they are
   checked and unpacked.
2. `$CAPTIONING_MIRROR/NAME/` holds the dataset already unpacked: it is copied (never
   hard-linked: a mirror is often read-only and shared).
3. Otherwise the archives are downloaded from their official URLs (resumable,
   retried, checked) and unpacked.

A finished dataset folder carries `.acquired.json` (what came from where, with each archive's
sha256); with it present `acquire` returns at once. An archive with no published sha256 is
trusted on first use: `acquire(force=True)` refuses a later copy whose sha256 differs from the
one the marker recorded, before unpacking it (deleting the marker, or the folder, trusts anew). This module never calls DVC: a `dvc repro` stage
holds the repository lock, so versioning is a separate step (`versioning.py`).
"""

from __future__ import annotations

import fnmatch
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
import zlib
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
    pins = first_digests(read_marker(dest) if marker.is_file() else None, archives)

    mirror_root = Path(mirror) if mirror else mirror_dir()
    folder = mirror_root / name if mirror_root else None
    dest.mkdir(parents=True, exist_ok=True)
    if folder is not None and folder.is_dir():
        held = [a for a in archives if (folder / a.filename).is_file()]
        if held:
            entries = _from_archives(name, archives, dest, folder, progress, retries, backoff, keep_archives, pins)
            method = "mirror archives"
        else:
            entries = [_copy_tree(folder, dest, progress)]
            method = "mirror copy"
    else:
        if folder is not None:
            log.info("mirror %s has no %s/: downloading", mirror_root, name)
        entries = _from_archives(name, archives, dest, None, progress, retries, backoff, keep_archives, pins)
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
    pins: dict[str, dict] | None = None,
) -> list[dict]:
    """Take each archive from the mirror folder if it holds it, else download it; check it
    against its first acquisition's sha256 when no digest is published (`pins`); unpack."""
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
            _check_md5(local, archive, delete=True)
            verified = _verification(archive)
            source, fetched = archive.url, True
        first = _check_pin(archive, digest, (pins or {}).get(archive.filename), local if fetched else None)
        safe_extract(local, dest / archive.extract_to, progress=progress, files=archive.files)
        if fetched and not keep_archives:
            local.unlink()  # unpacked and checked: the archive would only double the disk use
        entries.append(
            {
                "filename": archive.filename,
                "url": archive.url,
                "source": source,
                "sha256": digest,
                "verified": verified,
                **({"first_acquired_at": first} if first else {}),
            }
        )
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()
    return entries


def first_digests(marker: dict | None, archives: list[Archive]) -> dict[str, dict]:
    """{filename: {"sha256", "since"}} recorded by an earlier acquisition for the archives that
    have no published sha256 (the copy trusted on first use)."""
    unpublished = {archive.filename for archive in archives if not archive.sha256}
    pins = {}
    for entry in (marker or {}).get("archives", []):
        if entry.get("filename") in unpublished and entry.get("sha256"):
            since = entry.get("first_acquired_at") or marker.get("acquired_at")
            pins[entry["filename"]] = {"sha256": entry["sha256"], "since": since}
    return pins


def _check_pin(archive: Archive, digest: str, pin: dict | None, download: Path | None) -> str | None:
    """When the archive has no published sha256: the time its first copy was trusted (now for a
    first acquisition). A copy that differs from the first one is refused (a download deleted)."""
    if archive.sha256:
        return None
    if pin is None:
        return datetime.now(timezone.utc).isoformat(timespec="seconds")
    if digest != pin["sha256"]:
        if download is not None:
            download.unlink(missing_ok=True)
        raise AcquisitionError(
            f"{archive.filename} differs from the copy first acquired ({pin['since']}): sha256 {digest}, "
            f"expected {pin['sha256']}. It has no published digest, so the first copy is trusted; delete "
            f"{MARKER} to trust a new one"
        )
    return pin["since"]


def _verification(archive: Archive) -> str:
    if archive.sha256:
        return "sha256"
    if archive.md5:
        return "md5"
    checks = [name for name, known in (("size", archive.size), ("files", archive.files)) if known] + ["layout"]
    log.warning("%s has no published sha256: verified only by %s", archive.filename, " and ".join(checks))
    return "+".join(checks)


def _check_md5(path: Path, archive: Archive, delete: bool) -> None:
    """Compare with the published MD5 (the Flickr archives have no published sha256)."""
    if not archive.md5:
        return
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    if digest.hexdigest() != archive.md5:
        if delete:
            path.unlink()
        raise AcquisitionError(
            f"md5 mismatch for {path.name}: expected {archive.md5}, got {digest.hexdigest()}"
            + ("; the download was deleted" if delete else "")
        )


def _verify_local(path: Path, archive: Archive) -> tuple[str, str]:
    """Check an archive found in a mirror (never deleted: the mirror is not ours)."""
    if archive.size is not None and path.stat().st_size != archive.size:
        raise AcquisitionError(
            f"{path} is {path.stat().st_size} bytes, expected {archive.size}: the mirror copy is incomplete or different"
        )
    digest = file_sha256(path)
    if archive.sha256 and digest != archive.sha256:
        raise AcquisitionError(f"sha256 mismatch for {path}: expected {archive.sha256}, got {digest}")
    _check_md5(path, archive, delete=False)  # the mirror is not ours: never deleted
    return digest, _verification(archive)


def _copy_tree(src: Path, dest: Path, progress: bool) -> dict:
    """Copy an unpacked mirror, file by file (plain copies: writable, no shared inodes).

    Files already present with the same size are kept, so an interrupted copy resumes. A link
    is copied as the file it names only when that file is inside the mirror: a link out of it
    (to a key, a password file) is refused before anything is copied.
    """
    from tqdm import tqdm

    files = sorted(p for p in src.rglob("*") if p.is_file())
    _refuse_links_out(src, files)
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


def _refuse_links_out(src: Path, files: list[Path]) -> None:
    root = src.resolve()
    for path in files:
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise AcquisitionError(
                f"the mirror's {path.relative_to(src)} links to {path.resolve()}, outside the mirror {src}: "
                "refusing to copy it (replace the link by the file, or fix the mirror)"
            )


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
        raise AcquisitionError(
            f"size mismatch for {url}: expected {size} bytes, got {actual}; the partial file was deleted"
        )
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
        bar = tqdm(
            total=expected,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=part.name[: -len(".part")],
            disable=not progress,
        )
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

# Limits that refuse a decompression bomb before anything is written. The largest official
# archive (COCO train2017) is 19.3 GB of JPEGs in 118,287 files, unpacking at a ratio of about 1.
MAX_MEMBERS = 500_000
MAX_BYTES = 64 << 30
MAX_RATIO = 100  # unpacked bytes per archive byte; caption JSON packs about 10x, photos about 1x
RATIO_FLOOR = 64 << 20  # below this many unpacked bytes a high ratio is harmless (small text files)
MAX_LINK_BYTES = 4096  # a zip symlink's target is stored as the member's data
MAX_LINK_DEPTH = 40  # links followed while resolving one path, as the kernel's ELOOP limit


def safe_extract(
    archive: str | Path,
    dest: str | Path,
    progress: bool = False,
    *,
    files: tuple[str, int] | None = None,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_BYTES,
    max_ratio: float = MAX_RATIO,
) -> list[str]:
    """Unpack a zip or tar archive into `dest`; return the member names written.

    Every member is checked before anything is written: absolute paths, `..`, links whose
    real destination (following the links of the archive and of `dest`, in order) is
    outside `dest`, devices, too many members, too many bytes or too high a compression
    ratio (a bomb), and, with `files=(pattern, count)`, a member count other than the
    published one. macOS resource forks (`__MACOSX/`, present in the official Flickr8k
    zip) are skipped.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    limits = {"files": files, "max_members": max_members, "max_bytes": max_bytes, "max_ratio": max_ratio}
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, root, progress, limits)
        if tarfile.is_tarfile(archive):
            return _extract_tar(archive, root, progress, limits)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        raise AcquisitionError(f"{archive.name} is damaged: {error}") from None
    raise AcquisitionError(f"{archive.name} is neither a zip nor a tar archive")


def _skipped(name: str) -> bool:
    return name.startswith("__MACOSX/") or name.rstrip("/") == "__MACOSX"


def _refuse(archive: Path, why: str) -> AcquisitionError:
    return AcquisitionError(f"refusing to extract {archive.name}: {why}")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _check_path(archive: Path, name: str, root: str) -> str:
    """Where member `name` would land, lexically; refuse absolute paths and `..`."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise _refuse(archive, f"member {name!r} has an absolute path")
    if ".." in PurePosixPath(clean).parts:
        raise _refuse(archive, f"member {name!r} contains '..'")
    return os.path.normpath(os.path.join(root, clean))


class _Tree:
    """The target folder as it will be once the members checked so far are extracted:
    their links, then whatever is already on disk. Resolves paths as the kernel would, so a
    chain of links (`a -> .`, `a/b -> ..`, then `b/x`) is seen for where it really leads."""

    def __init__(self, archive: Path, root: str):
        self.archive, self.root = archive, root
        self.links: dict[str, str] = {}  # lexical path of a link -> its target

    def realpath(self, path: str, depth: int = 0) -> str:
        current = "/"
        if path.startswith(self.root + os.sep):
            # The root itself is already a real path: only what lies below it can hold links.
            current, path = self.root, path[len(self.root) :]
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, part)
            target = self._link(candidate)
            if target is None:
                current = candidate
                continue
            if depth >= MAX_LINK_DEPTH:
                raise _refuse(self.archive, f"too many levels of links at {candidate!r}")
            current = self.realpath(os.path.join(current, target), depth + 1)
        return current

    def _link(self, path: str) -> str | None:
        if path in self.links:
            return self.links[path]
        # Only the target folder can gain links from this archive; elsewhere trust the disk.
        return os.readlink(path) if os.path.islink(path) else None

    def check_member(self, name: str) -> str:
        """The lexical destination of a file or folder member, refused if it really lands outside."""
        where = _check_path(self.archive, name, self.root)
        if not _inside(self.realpath(where), self.root):
            raise _refuse(self.archive, f"member {name!r} would be written outside the target through a link")
        return where

    def add_link(self, name: str, target: str, relative_to: str | None = None) -> str:
        """Check a symlink (target relative to its folder) or a hard link (`relative_to` the root)."""
        where = self.check_member(name)
        if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
            raise _refuse(self.archive, f"link {name!r} points to absolute path {target!r}")
        base = relative_to if relative_to is not None else os.path.dirname(where)
        if not _inside(self.realpath(os.path.join(base, target)), self.root):
            raise _refuse(self.archive, f"link {name!r} points outside the target ({target!r})")
        if relative_to is None:
            self.links[where] = target
        return where

    def check_links_again(self) -> None:
        """Every link once all are known: a later link can redirect an earlier one (`c -> d/..`, `d -> .`)."""
        for where, target in self.links.items():
            if not _inside(self.realpath(os.path.join(os.path.dirname(where), target)), self.root):
                name = os.path.relpath(where, self.root)
                raise _refuse(self.archive, f"link {name!r} points outside the target once later links are made")


def _check_sizes(archive: Path, names: list[str], total: int, root: str, limits: dict) -> None:
    """Refuse a bomb (members, bytes, ratio), a short disk, or a member count other than the published one."""
    if len(names) > limits["max_members"]:
        raise _refuse(archive, f"it has {len(names)} members, more than the limit of {limits['max_members']}")
    if total > limits["max_bytes"]:
        raise _refuse(archive, f"it unpacks to {total} bytes, more than the limit of {limits['max_bytes']}")
    packed = max(1, archive.stat().st_size)
    if total > RATIO_FLOOR and total / packed > limits["max_ratio"]:
        raise _refuse(
            archive,
            f"it unpacks {packed} bytes into {total} (ratio {total / packed:.0f}, "
            f"limit {limits['max_ratio']}): a decompression bomb",
        )
    free = shutil.disk_usage(root).free
    if total > free:
        raise _refuse(archive, f"it unpacks to {total} bytes and {root} has {free} free")
    if limits["files"] is not None:
        pattern, expected = limits["files"]
        found = sum(1 for name in names if fnmatch.fnmatch(PurePosixPath(name).name, pattern))
        if found != expected:
            raise _refuse(
                archive,
                f"it holds {found} files matching {pattern!r}, the published count is {expected}: "
                "incomplete or not the official archive",
            )


def _write_check(archive: Path, name: str, root: str) -> None:
    """Just before writing: the member's real destination on disk is inside the target."""
    if not _inside(os.path.realpath(os.path.join(root, name)), root):
        raise _refuse(archive, f"member {name!r} would be written outside the target through a link")


def _zip_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _extract_zip(archive: Path, root: str, progress: bool, limits: dict) -> list[str]:
    from tqdm import tqdm

    with zipfile.ZipFile(archive) as zf:
        members = [info for info in zf.infolist() if not _skipped(info.filename)]
        # Declared sizes bound what zipfile writes: it stops at file_size and checks the CRC.
        files = [info.filename for info in members if not info.is_dir() and not _zip_link(info)]
        _check_sizes(archive, files, sum(info.file_size for info in members), root, limits)
        tree, links = _Tree(archive, root), {}
        for info in members:
            if _zip_link(info):
                if info.file_size > MAX_LINK_BYTES:
                    raise _refuse(archive, f"link {info.filename!r} has a {info.file_size}-byte target")
                links[info.filename] = zf.read(info).decode("utf-8")
                tree.add_link(info.filename, links[info.filename])
            else:
                tree.check_member(info.filename)
        tree.check_links_again()
        for info in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
            _write_check(archive, info.filename, root)
            if info.filename in links:
                where = _check_path(archive, info.filename, root)
                os.makedirs(os.path.dirname(where), exist_ok=True)
                if os.path.lexists(where):
                    os.unlink(where)
                os.symlink(links[info.filename], where)
            else:
                zf.extract(info, root)
        return [info.filename for info in members]


def _extract_tar(archive: Path, root: str, progress: bool, limits: dict) -> list[str]:
    from tqdm import tqdm

    with tarfile.open(archive) as tf:
        members = _tar_members(archive, tf, root, limits)
        tree = _Tree(archive, root)
        for member in members:
            if member.issym():
                tree.add_link(member.name, member.linkname)
            elif member.islnk():
                tree.add_link(member.name, member.linkname, relative_to=root)
            elif member.isfile() or member.isdir():
                tree.check_member(member.name)
            else:
                raise _refuse(archive, f"member {member.name!r} is a device or pipe")
        tree.check_links_again()
        for member in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
            _write_check(archive, member.name, root)
            # The "data" filter repeats the checks above inside tarfile itself.
            tf.extract(member, root, filter="data")
        return [m.name for m in members]


def _tar_members(archive: Path, tf: tarfile.TarFile, root: str, limits: dict) -> list[tarfile.TarInfo]:
    """The members, read one header at a time so that a compressed bomb is refused once its
    declared sizes pass a limit, not after decompressing all of it."""
    members, total = [], 0
    packed = max(1, archive.stat().st_size)
    ceiling = min(limits["max_bytes"], max(RATIO_FLOOR, limits["max_ratio"] * packed))
    while (member := tf.next()) is not None:
        if _skipped(member.name):
            continue
        members.append(member)
        total += member.size
        if len(members) > limits["max_members"] or total > ceiling:
            break  # _check_sizes names the limit passed
    files = [m.name for m in members if m.isfile()]
    _check_sizes(archive, files, total, root, limits)
    return members
