"""How data tasks cache across runs, and the lock that stops two runs building one stage.

A data task's cache key hashes its inputs (config sub-tree, input stage paths), its source code
and the *generation* of the data root: a random id written once into ``<root>/.generation``.
Wiping the data root gives it a new generation, so Prefect never hands back a path that no longer
exists. Results persist under ``$PREFECT_HOME/storage``; the transaction is SERIALIZABLE with a
file lock under ``$PREFECT_HOME/locks``, so a second run with the same inputs waits for the first
and then reads its result instead of building the stage again. The lock is an ``flock``
(:class:`maskdiff.ops.locks.ProcessLockManager`), so it ends with the run that holds it: a run
killed mid-stage does not leave its rerun waiting forever, as Prefect's own file lock would.
(The library's stage folders carry their own ``fcntl`` lock too, for callers outside Prefect.)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_HOME
from prefect.transactions import IsolationLevel

from maskdiff.ops.locks import ProcessLockManager

GENERATION = ".generation"


def root_generation(root: Path) -> str:
    """The data root's generation id, created on first use."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / GENERATION
    if not path.exists():
        tmp = root / f".generation.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        try:
            tmp.rename(path) if not path.exists() else tmp.unlink()
        except OSError:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


@dataclass
class RootGeneration(CachePolicy):
    """Adds the generation of the task's ``root`` argument to the key (no key without it)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        root = inputs.get("root")
        if root is None:
            return None
        path = Path(root) / GENERATION
        return path.read_text().strip() if path.exists() else None


def say_waiting(key: str, note: dict[str, Any]) -> None:
    """Log, in the task run's logs, that this data task waits for another run's lock."""
    try:
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("maskdiff.tasks")
    who = f"process {note.get('pid', '?')} on {note.get('host', '?')}" if note else "another run"
    logger.warning(
        "waiting for %s: it holds the lock on this stage (cache key %s) and is building it; "
        "this run goes on once it finishes or ends",
        who,
        key,
    )


def data_cache_policy() -> CachePolicy:
    """INPUTS + TASK_SOURCE + root generation, serialised by a lock that dies with its holder."""
    locks = Path(PREFECT_HOME.value()) / "locks"
    return (INPUTS + TASK_SOURCE + RootGeneration()).configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=ProcessLockManager(locks, on_wait=say_waiting),
    )
