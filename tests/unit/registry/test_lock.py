"""The registration lock: a file lock beside a sqlite store, and the lease lock kept in MLflow itself
for a store that several machines share (exercised here on a real sqlite store)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from captioning.config import PROJECT_ROOT
from captioning.registry import lock
from captioning.registry.lock import LOCK_LEASE_SECONDS, LOCK_SUFFIX, registry_lock, sqlite_writes
from captioning.registry.store import RegistryError, mlflow_client

NAME = "captioner"
LOCK = f"{NAME}{LOCK_SUFFIX}"

# Holds the registry lock of the store in argv[1] until its standard input closes.
HOLDER = """
import sys
from captioning.registry.lock import registry_lock
with registry_lock(sys.argv[1], "captioner"):
    print("held", flush=True)
    sys.stdin.read()
"""


def acquire_in_thread(store: str) -> tuple[threading.Thread, threading.Event]:
    acquired = threading.Event()

    def take() -> None:
        with registry_lock(store, NAME):
            acquired.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread, acquired


def test_a_second_thread_waits_until_the_holder_lets_go(store):
    with registry_lock(store, NAME):
        thread, acquired = acquire_in_thread(store)
        assert not acquired.wait(0.5)
    assert acquired.wait(10)
    thread.join(10)


def test_another_process_holding_the_lock_makes_this_one_wait(store):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        thread, acquired = acquire_in_thread(store)
        assert not acquired.wait(1.0)
        holder.stdin.close()
        assert acquired.wait(30)
        thread.join(10)
    finally:
        holder.kill()
        holder.wait(10)


def test_the_lock_does_not_wait_on_its_own_thread(store):
    """register() takes the sqlite write lock and, inside it, the registry lock: the same file."""

    def nested() -> None:
        with sqlite_writes(store), registry_lock(store, NAME), registry_lock(store, NAME):
            pass

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


def inside_together(uri: str) -> bool:
    """Whether two threads writing to the store at `uri` are inside sqlite_writes at the same time."""
    barrier = threading.Barrier(2, timeout=1)
    met: list[bool] = []

    def write() -> None:
        with sqlite_writes(uri):
            try:
                barrier.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)

    threads = [threading.Thread(target=write, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return met == [True, True]


def test_writers_of_a_sqlite_store_take_turns_and_a_servers_do_not(store):
    assert not inside_together(store)  # concurrent sqlite writers fail with "database is locked"
    assert inside_together("http://127.0.0.1:9")  # a server takes concurrent requests; nothing is contacted


def held_locks(client) -> list[str]:
    return sorted(model.name for model in client.search_registered_models() if LOCK_SUFFIX in model.name)


def test_the_lease_lock_is_a_registered_model_that_lives_while_it_is_held(store):
    client = mlflow_client(store)
    with lock._lease_lock(client, NAME):
        tags = client.get_registered_model(LOCK).tags
        assert tags["owner"].startswith(f"{socket.gethostname()}:{os.getpid()}:")
        assert float(tags["expires"]) > time.time() + LOCK_LEASE_SECONDS - 60
        assert held_locks(client) == [LOCK]
    assert held_locks(client) == []


def test_a_lease_that_ran_out_is_broken_by_the_next_taker(store):
    client = mlflow_client(store)
    client.create_registered_model(LOCK, tags={"owner": "elsewhere:1:gone", "expires": "0", "machine": "elsewhere"})
    with lock._lease_lock(client, NAME):
        assert client.get_registered_model(LOCK).tags["owner"] != "elsewhere:1:gone"
    assert held_locks(client) == []  # neither the lock nor the breaker's marker is left


def test_a_dead_holder_on_this_machine_is_broken_before_its_lease_ends(store, monkeypatch):
    monkeypatch.setattr(lock, "LOCK_WAIT_SECONDS", 20.0)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = f"{socket.gethostname()}:{gone.stdout.strip()}:0123456789ab"
    client = mlflow_client(store)
    tags = {"owner": owner, "expires": f"{time.time() + 3600:.3f}", "machine": lock._machine()}
    client.create_registered_model(LOCK, tags=tags)
    with lock._lease_lock(client, NAME):
        assert client.get_registered_model(LOCK).tags["owner"] != owner
    assert held_locks(client) == []


def test_a_live_holder_makes_a_waiter_give_up_with_the_locks_name(store, monkeypatch):
    monkeypatch.setattr(lock, "LOCK_WAIT_SECONDS", 1.0)
    client = mlflow_client(store)
    tags = {"owner": "elsewhere:1:alive", "expires": f"{time.time() + 3600:.3f}", "machine": "elsewhere"}
    client.create_registered_model(LOCK, tags=tags)
    with pytest.raises(RegistryError, match=f"the registry lock '{LOCK}' stayed held for 1 s"):
        with lock._lease_lock(client, NAME):
            pytest.fail("entered a lock that another holder keeps")
    assert client.get_registered_model(LOCK).tags["owner"] == "elsewhere:1:alive"  # left to its holder
