"""Training run folders: resume an unfinished one, or start a fresh one.

A training folder is ``<root>/train/<kind>-<key>-<n>``: ``key`` hashes everything the weights
depend on (model, diffusion and train config with its seed, the data stages' content hashes), ``n``
counts attempts. Choosing a folder:

* an unfinished folder of that key that no live process holds is **resumed** (a crash costs only
  the steps since its last checkpoint; rerunning the same command continues it);
* a finished folder (it has ``DONE``) is left alone: a nightly run on an unchanged corpus trains
  again in folder ``n + 1``;
* a folder locked by a running process (``fcntl.flock``) is skipped, so two runs at once never
  write into the same folder.

The lock is held for as long as the returned :class:`RunFolder` is open.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from maskdiff.data.stage import config_hash, write_json_atomic

__all__ = ["DONE", "RunFolder", "claim_run_folder"]

DONE = "DONE"


@dataclass
class RunFolder:
    """A claimed training folder; ``resumed`` tells whether it held earlier progress."""

    path: Path
    resumed: bool
    _lock: IO[str]

    def mark_done(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / DONE, {"finished_unix": time.time(), **summary})

    def release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(path: Path) -> IO[str] | None:
    handle = open(path, "a+")  # noqa: SIM115 - the handle is the lock; RunFolder closes it
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_run_folder(root: Path, kind: str, identity: dict[str, Any]) -> RunFolder:
    """Claim the folder to train ``kind`` with ``identity`` (JSON-able) in, under ``root/train``."""
    base = root / "train"
    base.mkdir(parents=True, exist_ok=True)
    key = config_hash(identity)
    n = 0
    while True:
        path = base / f"{kind}-{key}-{n}"
        lock = _try_lock(base / f".{kind}-{key}-{n}.lock")
        if lock is None or (path / DONE).exists():
            if lock is not None:
                lock.close()
            n += 1
            continue
        resumed = path.exists() and any(path.iterdir())
        path.mkdir(exist_ok=True)
        if not (path / "identity.json").exists():
            write_json_atomic(path / "identity.json", {"kind": kind, "identity": identity})
        os.utime(path)
        return RunFolder(path, resumed, lock)
