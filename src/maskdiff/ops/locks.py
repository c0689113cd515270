"""Locks that end with the process holding them, for Prefect's SERIALIZABLE cache transactions.

Prefect's own ``FileSystemLockManager`` counts a key as locked while a file ``<key>.lock`` exists.
Its transactions pass no ``hold_timeout``, so the file never expires: a run killed while it holds a
data stage's lock (SIGKILL, the OOM killer, a lost machine) leaves the file behind, and every later
run with the same cache key waits on it forever.

:class:`ProcessLockManager` holds a key with ``flock(LOCK_EX)`` on ``<directory>/<key>.lock``
instead. The kernel drops an ``flock`` when the last descriptor of it closes, which includes the
holder's process ending in any way, so a waiter goes on as soon as the holder is gone. The lock
files are never deleted: deleting one would let a waiter lock an inode that a newcomer no longer
sees. Between holders a file is empty; while held it names the holder, the PID and the host, for
whoever looks into the folder.

It implements Prefect's ``LockManager`` protocol (``prefect.locking.protocol``) by its method
names; nothing here imports Prefect. Locks are local to one machine: ``flock`` is not reliable on
network file systems. Within a process, locks are per holder (Prefect's transactions give each
its own id): a second holder of a key in the same process waits like one in another process. The
held locks are the process's, not the object's, so copies and pickles of a manager (Prefect copies
its result stores; a process pool pickles the task) all see the same state in one process.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProcessLockManager"]

POLL_S = 0.1  # how often a waiter tries again
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,200}")


@dataclass(frozen=True)
class _Held:
    holder: str
    fd: int


# lock file path -> holder and descriptor, for every lock this process holds (all managers share it)
_HELD: dict[str, _Held] = {}
_MUTEX = threading.Lock()


class ProcessLockManager:
    """Prefect lock manager on ``flock``: a lock ends at ``release_lock`` or its holder's exit."""

    def __init__(
        self,
        lock_files_directory: Path | str,
        on_wait: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        """``on_wait(key, note)`` is called once when an acquire has to wait, with the holder's
        note (holder, pid, host; empty if unreadable): say who is waiting on whom. A module-level
        function, so that the manager still pickles."""
        self.lock_files_directory = Path(lock_files_directory)
        self.on_wait = on_wait

    def __repr__(self) -> str:
        return f"ProcessLockManager({str(self.lock_files_directory)!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ProcessLockManager)
            and other.lock_files_directory == self.lock_files_directory
        )

    def __hash__(self) -> int:
        return hash(self.lock_files_directory)

    def lock_path(self, key: str) -> Path:
        """The file that carries ``key``'s lock (a key that is no safe file name is hashed)."""
        name = key if _SAFE_KEY.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()
        return self.lock_files_directory / f"{name}.lock"

    # -- acquiring -------------------------------------------------------------------------

    def _start(
        self, key: str, holder: str, acquire_timeout: float | None, hold_timeout: float | None
    ) -> tuple[str, int, float | None] | bool:
        """Either the answer (this holder has it already) or ``(path, fd, deadline)`` to try
        locking with."""
        if hold_timeout is not None:
            raise ValueError(
                "ProcessLockManager: hold_timeout is not supported; a lock lasts until "
                "release_lock or the end of the process that holds it"
            )
        path = str(self.lock_path(key))
        with _MUTEX:
            held = _HELD.get(path)
        if held is not None and held.holder == holder:
            return True
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        return path, os.open(path, os.O_RDWR | os.O_CREAT, 0o644), deadline

    @staticmethod
    def _try(path: str, fd: int, holder: str) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        note = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        with _MUTEX:
            _HELD[path] = _Held(holder, fd)
        return True

    def _step(
        self, key: str, holder: str, path: str, fd: int, deadline: float | None, first: bool
    ) -> bool | None:
        """One try: True when taken, False when the deadline passed (the descriptor is then
        closed), None to try again after :data:`POLL_S` (the first time, ``on_wait`` is told)."""
        if self._try(path, fd, holder):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            os.close(fd)
            return False
        if first:
            self._waiting(key, path)
        return None

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Take ``key`` for ``holder``, waiting up to ``acquire_timeout`` s (None: no limit; 0:
        one try). True if ``holder`` holds it now."""
        started = self._start(key, holder, acquire_timeout, hold_timeout)
        if isinstance(started, bool):
            return started
        path, fd, deadline = started
        try:
            first = True
            while (taken := self._step(key, holder, path, fd, deadline, first)) is None:
                first = False
                time.sleep(POLL_S)
        except BaseException:
            self._abandon(path, fd)
            raise
        return taken

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """:meth:`acquire_lock` for async callers: waits without blocking the event loop."""
        started = self._start(key, holder, acquire_timeout, hold_timeout)
        if isinstance(started, bool):
            return started
        path, fd, deadline = started
        try:
            first = True
            while (taken := self._step(key, holder, path, fd, deadline, first)) is None:
                first = False
                await asyncio.sleep(POLL_S)
        except BaseException:
            self._abandon(path, fd)
            raise
        return taken

    def _waiting(self, key: str, path: str) -> None:
        if self.on_wait is None:
            return
        try:
            note = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            note = {}
        self.on_wait(key, note if isinstance(note, dict) else {})

    @staticmethod
    def _abandon(path: str, fd: int) -> None:
        """Interrupted while trying: drop the descriptor (and the lock, if it was just taken)."""
        with _MUTEX:
            held = _HELD.get(path)
            if held is not None and held.fd == fd:
                del _HELD[path]
        os.close(fd)

    # -- releasing and looking -------------------------------------------------------------

    def release_lock(self, key: str, holder: str) -> None:
        """Give ``key`` up; ValueError if ``holder`` does not hold it."""
        path = str(self.lock_path(key))
        with _MUTEX:
            held = _HELD.get(path)
            if held is None or held.holder != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            del _HELD[path]
        try:
            os.ftruncate(held.fd, 0)
        finally:
            os.close(held.fd)  # closing the last descriptor drops the flock

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        """Whether any holder, in this process or another, holds ``key`` now."""
        path = str(self.lock_path(key))
        with _MUTEX:
            if path in _HELD:
                return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the probe's own flock
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether ``holder`` holds ``key`` (only ever true in the holder's own process)."""
        with _MUTEX:
            held = _HELD.get(str(self.lock_path(key)))
        return held is not None and held.holder == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds ``key``, up to ``timeout`` s; False if it is still held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """:meth:`wait_for_lock` for async callers."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True
