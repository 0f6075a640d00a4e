"""The registration lock: one read-compare-set of a model's aliases at a time.

A sqlite store is one file on one machine: a file lock beside it, which also keeps its writers to
one at a time. Any other store (an `mlflow server` over HTTP, a database) is shared by machines
that share no folder, so the lock lives in MLflow itself (`_lease_lock`). MLflow is imported
inside functions only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from captioning.registry.store import RegistryError, mlflow_client, sqlite_path

logger = logging.getLogger(__name__)


def _lock_file(uri: str) -> Path:
    """The lock file of a sqlite store: beside the database."""
    db = sqlite_path(uri)
    return db.with_name(db.name + ".lock")


_HELD = threading.local()  # lock files this thread holds: re-entering one does not wait on itself


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on `path`, re-entrant within a thread. flock locks belong to the open
    file, so threads of one process exclude each other too."""
    held = _HELD.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_writes(uri: str):
    """One writer at a time on a sqlite store (concurrent writers fail with "database is locked");
    nothing for a server, which takes concurrent requests."""
    return _file_lock(_lock_file(uri)) if sqlite_path(uri) is not None else contextlib.nullcontext()


@contextlib.contextmanager
def registry_lock(uri: str, name: str) -> Iterator[None]:
    """Exclusive lock for the read-compare-set of the aliases of model `name`.

    A sqlite store is one file on one machine: a file lock beside it. Any other store (an
    `mlflow server` over HTTP, a database) is shared by machines that share no folder, so the lock
    lives in MLflow itself: see `_lease_lock`.
    """
    if sqlite_path(uri) is not None:
        with _file_lock(_lock_file(uri)):
            yield
        return
    with _lease_lock(mlflow_client(uri), name):
        yield


LOCK_SUFFIX = ".registry-lock"
LOCK_LEASE_SECONDS = 300.0  # far beyond the few requests of a critical section
LOCK_WAIT_SECONDS = 600.0
_JITTER = random.Random()  # not the global generator, which training seeds
_LET_GO: set[str] = set()  # owners in this process that left their critical section, released or not


@contextlib.contextmanager
def _lease_lock(client, name: str) -> Iterator[None]:
    """A mutex made of a registered model, `<name>.registry-lock`, held for the duration.

    Why a registered model: creating one is atomic in every MLflow store (its name is the primary
    key, so of two concurrent creations one fails with RESOURCE_ALREADY_EXISTS, whatever the
    database behind the server), it is deleted for good (the name is free again), and it needs
    nothing but the tracking URI every client already has. MLflow offers no compare-and-set on
    tags or aliases, and a PostgreSQL advisory lock would need every client to reach the database.

    The lock's tags name its owner (host, process, a random token), its machine and when its lease
    ends. A holder that died leaves the lock behind (so does one that lost the server part-way); once
    the lease is over, or at once when the holder was a process of this machine that no longer
    exists or has left its critical section, a waiter breaks it: first it
    creates `<lock>.break.<hash of the owner>` (atomic again: one waiter alone breaks a holder), then
    deletes the lock if that owner still holds it. Release deletes the lock only while its owner
    tag is still ours. The lease must outlast any critical section (a few requests): if one took
    longer than LOCK_LEASE_SECONDS, a waiter could break the lock while it is still in use.
    """
    lock = f"{name}{LOCK_SUFFIX}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    tags = {"owner": owner, "expires": f"{time.time() + LOCK_LEASE_SECONDS:.3f}", "machine": _machine()}
    while not _try_create(client, lock, tags):
        _break_if_expired(client, lock)
        if time.monotonic() > deadline:
            raise RegistryError(f"the registry lock {lock!r} stayed held for {LOCK_WAIT_SECONDS:.0f} s")
        time.sleep(_JITTER.uniform(0.1, 0.4))  # waiters do not retry in lockstep
    try:
        yield
    finally:
        _LET_GO.add(owner)  # done with it, even if the release below cannot reach the server
        if _lock_owner(client, lock) == owner:
            client.delete_registered_model(lock)
            _LET_GO.discard(owner)


def _try_create(client, lock: str, tags: dict[str, str]) -> bool:
    """Create the registered model `lock`; False when it exists already."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            lock,
            tags=tags,
            description=f"held while the aliases of {lock.removesuffix(LOCK_SUFFIX)!r} change; deleted afterwards",
        )
        return True
    except MlflowException as error:
        if error.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise


def _lock_owner(client, lock: str, expired_only: bool = False) -> str | None:
    """The owner tag of the lock (None when it is not held, or, with expired_only, while its lease
    runs and its holder may be alive)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException:
        return None
    if expired_only and time.time() < float(tags.get("expires", "0")) and not _holder_gone(tags):
        return None
    return tags.get("owner", "")


def _machine() -> str:
    """This boot of this host and this process namespace (where a holder's pid means something);
    empty where /proc does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{socket.gethostname()}:{boot}:{namespace}"


def _holder_gone(tags: dict[str, str]) -> bool:
    """True when the lock's holder was a process of this machine that no longer exists, or an
    earlier critical section of this process that could not release it."""
    if tags.get("owner") in _LET_GO:
        return True
    machine = _machine()
    if not machine or tags.get("machine") != machine:
        return False
    try:
        pid = int(tags.get("owner", "").split(":")[1])
        os.kill(pid, 0)
    except (IndexError, ValueError, PermissionError):
        return False
    except ProcessLookupError:
        return True
    return False


def _break_if_expired(client, lock: str) -> None:
    """Delete the lock of a holder whose lease is over (see `_lease_lock`)."""
    from mlflow.exceptions import MlflowException

    stale = _lock_owner(client, lock, expired_only=True)
    if stale is None:
        return
    breaker = f"{lock}.break.{hashlib.sha1(stale.encode()).hexdigest()[:16]}"
    if not _try_create(client, breaker, {"owner": stale, "expires": f"{time.time() + 60:.3f}"}):
        # Another waiter is breaking it; if that one died on the way, its breaker expires too.
        if _lock_owner(client, breaker, expired_only=True) is not None:
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(breaker)
        return
    try:
        if _lock_owner(client, lock) == stale:
            logger.warning("breaking the registry lock %r: its holder %s is gone or let its lease expire", lock, stale)
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
    finally:
        client.delete_registered_model(breaker)
