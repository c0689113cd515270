"""Prefect flow runs left RUNNING by a process killed outright, found and marked CRASHED.

The pipeline tags its flow run with its owner process as it starts (:func:`claim_flow_run`):
``maskdiff.host:<host>`` to query by and ``maskdiff.owner:<host/pidns/pid/started>``. On the next
start (:func:`sweep_orphans`, called by the pipeline and by ``maskdiff serve``) a RUNNING flow
run of this host whose owner is dead is set CRASHED (forced: Prefect would refuse to leave
RUNNING otherwise), and so are its RUNNING subflow runs and task runs; the MLflow runs of dead
owners are closed KILLED (:mod:`maskdiff.ops.orphans`). Runs of live processes, of other hosts,
and runs without owner tags are left alone.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed

from maskdiff.config import Config
from maskdiff.ops.processes import Owner

HOST_PREFIX = "maskdiff.host:"
OWNER_PREFIX = "maskdiff.owner:"
Logger = logging.Logger | logging.LoggerAdapter  # a task or flow run logger
UNFINISHED = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]


def owner_flow_tags(owner: Owner) -> list[str]:
    return [HOST_PREFIX + owner.host, OWNER_PREFIX + owner.tag()]


def claim_flow_run(logger: Logger, owner: Owner | None = None) -> None:
    """Tag the current flow run with its owner process (this one by default); a failure is
    logged (the run then only misses the orphan check)."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(str(run_id)))
            extra = [t for t in owner_flow_tags(owner or Owner.current()) if t not in run.tags]
            client.update_flow_run(run.id, tags=[*run.tags, *extra])
    except Exception as exc:
        logger.warning("could not tag the flow run with its owner process: %s", exc)


def _owner(tags: list[str]) -> Owner | None:
    for tag in tags:
        if tag.startswith(OWNER_PREFIX):
            return Owner.parse(tag.removeprefix(OWNER_PREFIX))
    return None


def mark_orphan_flow_runs() -> list[UUID]:
    """Set CRASHED every RUNNING flow run of this host whose owner is dead (with its unfinished
    subflow and task runs); returns the ids of the top flow runs marked."""
    marked: list[UUID] = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.CANCELLING])
                ),
                tags=FlowRunFilterTags(all_=[HOST_PREFIX + socket.gethostname()]),
            )
        )
        for run in runs:
            owner = _owner(run.tags)
            if owner is None or not owner.is_dead():
                continue
            message = (
                f"Crashed: its process {owner.pid} on {owner.host} ended without reporting "
                "(killed outright); marked by the next maskdiff start"
            )
            _crash_tree(client, run.id, message)
            marked.append(run.id)
    return marked


def _crash_tree(client, run_id: UUID, message: str) -> None:
    """Force CRASHED on the flow run, its unfinished task runs and subflow runs, depth first."""
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)),
        )
    )
    for child in children:
        _crash_tree(client, child.id, message)
    tasks = client.read_task_runs(
        task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[run_id]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED)),
        )
    )
    for task_run in tasks:
        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    client.set_flow_run_state(run_id, Crashed(message=message), force=True)


def sweep_orphans(cfg: Config, root: Path, logger: Logger) -> None:
    """Mark the orphans of dead processes on both sides; a failure here is logged, never
    raised (a run must not fail for its predecessors' bookkeeping)."""
    try:
        for run_id in mark_orphan_flow_runs():
            logger.warning("flow run %s: its process was killed; marked Crashed", run_id)
    except Exception as exc:
        logger.warning("could not look for orphan Prefect flow runs: %s", exc)
    if not cfg.tracking.enabled:
        return
    try:
        from maskdiff.ops.orphans import mark_orphan_runs
        from maskdiff.ops.tracking import resolve_tracking_uri

        for orphan in mark_orphan_runs(resolve_tracking_uri(cfg.tracking, root)):
            logger.warning("MLflow run %s: its process was killed; closed KILLED", orphan.run_id)
    except Exception as exc:
        logger.warning("could not look for orphan MLflow runs: %s", exc)
