"""MLflow runs left RUNNING by a process killed outright, found and closed KILLED.

Each pipeline's MLflow run is created with tags naming its owner process (:func:`owner_tags`:
``maskdiff.owner`` = ``host/pidns/pid/started``, ``maskdiff.owner.host`` for the query). A run
still RUNNING whose owner :meth:`~maskdiff.ops.processes.Owner.is_dead` is an orphan: it is
tagged ``maskdiff.orphaned`` with the reason and closed KILLED. A run of another host, of a live
process, or without owner tags (made before they existed) is never touched.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import ViewType

from maskdiff.ops.processes import Owner
from maskdiff.ops.tracking import opening_store

__all__ = ["HOST_TAG", "ORPHAN_TAG", "OWNER_TAG", "OrphanRun", "mark_orphan_runs", "owner_tags"]

OWNER_TAG = "maskdiff.owner"
HOST_TAG = "maskdiff.owner.host"
ORPHAN_TAG = "maskdiff.orphaned"
FLOW_RUN_TAG = "prefect.flow_run_id"  # set by the pipeline (tasks/report.py)


@dataclass(frozen=True)
class OrphanRun:
    """An MLflow run closed KILLED, its dead owner, and the Prefect flow run it records."""

    run_id: str
    owner: Owner
    flow_run_id: str | None


def owner_tags(owner: Owner | None = None) -> dict[str, str]:
    """The tags naming the process that owns a run (this one by default)."""
    owner = owner or Owner.current()
    return {OWNER_TAG: owner.tag(), HOST_TAG: owner.host}


def orphan_reason(owner: Owner) -> str:
    return (
        f"its process {owner.pid} on {owner.host} (started {owner.started:.2f}) ended "
        "without closing it (killed outright); closed KILLED by the next maskdiff start"
    )


def mark_orphan_runs(tracking_uri: str) -> list[OrphanRun]:
    """Close KILLED every RUNNING run of the store whose owner process on this host is gone."""
    if (
        tracking_uri.startswith("sqlite:///")
        and not Path(tracking_uri.removeprefix("sqlite:///")).is_file()
    ):
        return []  # no store yet, so no run in it (and no tables created here)
    experiments: list[str] = []
    token = None
    # the first use of a SQLite store may migrate its tables: never beside another run's
    with opening_store(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        while True:
            page = client.search_experiments(
                ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
            experiments += [e.experiment_id for e in page]
            token = page.token
            if not token:
                break
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    out = []
    for lo in range(0, len(experiments), 100):
        token = None
        while True:
            runs = client.search_runs(
                experiments[lo : lo + 100], query, max_results=1000, page_token=token
            )
            for run in runs:
                owner = Owner.parse(run.data.tags.get(OWNER_TAG, ""))
                if owner is None or not owner.is_dead():
                    continue
                client.set_tag(run.info.run_id, ORPHAN_TAG, orphan_reason(owner))
                client.set_terminated(run.info.run_id, "KILLED")
                out.append(OrphanRun(run.info.run_id, owner, run.data.tags.get(FLOW_RUN_TAG)))
            token = runs.token
            if not token:
                break
    return out
