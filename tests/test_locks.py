"""maskdiff.ops.locks: the data stages' transaction locks end with the process that holds them.

Prefect's file lock would keep a killed holder's lock forever (its rerun waits on it without end);
here a SIGKILLed holder's lock is free at once, and holders within one process still exclude
each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import code_env

from maskdiff.ops.locks import ProcessLockManager

HOLD = """
import sys, time
from maskdiff.ops.locks import ProcessLockManager
ProcessLockManager(sys.argv[1]).acquire_lock("stage-key", holder="killed-run")
print("held", flush=True)
time.sleep(120)
"""


def test_a_killed_holder_leaves_no_lock_behind(tmp_path: Path) -> None:
    waits: list[tuple[str, dict[str, object]]] = []
    locks = ProcessLockManager(tmp_path / "locks", on_wait=lambda *args: waits.append(args))
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(locks.lock_files_directory)],
                             stdout=subprocess.PIPE, text=True, env=code_env())  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert locks.is_locked("stage-key")
        note = json.loads(locks.lock_path("stage-key").read_text())
        assert note["holder"] == "killed-run" and note["pid"] == child.pid
        assert not locks.acquire_lock("stage-key", "rerun", acquire_timeout=0)
        assert waits == []  # one try: no wait to announce
        started = time.monotonic()
        assert not locks.acquire_lock("stage-key", "rerun", acquire_timeout=0.3)
        assert time.monotonic() - started >= 0.3  # waited for it, then gave up
        assert waits == [("stage-key", note)]  # announced once, naming the holder
        assert not locks.wait_for_lock("stage-key", timeout=0.2)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    # the holder is gone: the lock is free without anybody releasing it
    assert not locks.is_locked("stage-key")
    assert locks.wait_for_lock("stage-key", timeout=0)
    assert locks.acquire_lock("stage-key", "rerun", acquire_timeout=5)
    assert locks.is_lock_holder("stage-key", "rerun")
    assert not locks.is_lock_holder("stage-key", "killed-run")
    locks.release_lock("stage-key", "rerun")
    assert not locks.is_locked("stage-key")
    assert locks.lock_path("stage-key").read_text() == ""  # empty between holders


def test_holders_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    locks = ProcessLockManager(tmp_path)
    assert locks.acquire_lock("k", "a")
    assert locks.acquire_lock("k", "a", acquire_timeout=0)  # the holder has it already
    assert not locks.acquire_lock("k", "b", acquire_timeout=0)
    with pytest.raises(ValueError, match="No lock held by b"):
        locks.release_lock("k", "b")
    events: list[str] = []

    def second() -> None:
        assert locks.acquire_lock("k", "b")  # waits for a's release
        events.append("b acquired")
        locks.release_lock("k", "b")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.4)
    events.append("a releases")
    locks.release_lock("k", "a")
    thread.join(10)
    assert events == ["a releases", "b acquired"]
    assert not locks.is_locked("k")


def test_copies_share_the_process_locks_and_keys_become_file_names(tmp_path: Path) -> None:
    locks = ProcessLockManager(tmp_path)
    assert locks.acquire_lock("k", "a")
    copy = pickle.loads(pickle.dumps(locks))  # as a process pool or a result-store copy gets it
    assert copy == locks and copy is not locks
    assert copy.is_lock_holder("k", "a") and copy.is_locked("k")
    copy.release_lock("k", "a")
    assert not locks.is_locked("k")
    odd = "folder/../key with spaces"
    assert locks.lock_path(odd).parent == tmp_path and " " not in locks.lock_path(odd).name
    assert locks.lock_path("abc123").name == "abc123.lock"
    with pytest.raises(ValueError, match="hold_timeout is not supported"):
        locks.acquire_lock("k", "a", hold_timeout=5)


def test_async_callers_wait_without_blocking_the_loop(tmp_path: Path) -> None:
    locks = ProcessLockManager(tmp_path)
    assert locks.acquire_lock("k", "a")

    async def scenario() -> list[str]:
        seen: list[str] = []
        assert not await locks.aacquire_lock("k", "b", acquire_timeout=0.2)
        assert not await locks.await_for_lock("k", timeout=0.2)
        waiter = asyncio.create_task(locks.aacquire_lock("k", "b"))
        await asyncio.sleep(0.3)  # the loop runs while the waiter polls
        seen.append("loop ran")
        await asyncio.to_thread(locks.release_lock, "k", "a")
        assert await asyncio.wait_for(waiter, 10)
        seen.append("b acquired")
        assert await locks.await_for_lock("k", timeout=0) is False
        locks.release_lock("k", "b")
        assert await locks.await_for_lock("k", timeout=0)
        return seen

    assert asyncio.run(scenario()) == ["loop ran", "b acquired"]
