"""The orphan sweep (flows/orphans.py, maskdiff.ops.orphans) beside a live concurrent run: two
processes each hold a RUNNING flow run (the session's Prefect server) tagged with their
owner, and a RUNNING MLflow run (a SQLite store); one is killed outright. A sweep from this
process, as a concurrent start makes it, marks the dead one's runs and leaves the live one's
alone; the live run then finishes normally."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from helpers import code_env, smoke_config, spawn, wait_until
from mlflow import MlflowClient
from prefect.client.orchestration import get_client

from maskdiff.ops.orphans import ORPHAN_TAG
from maskdiff.ops.servers import ServerProcess

# A run in its own process: claims its flow run as the pipeline does, opens an MLflow run with
# its owner tags, says so, and holds both open until released.
HOLDER = """
import pathlib, sys, time
from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from flows.orphans import claim_flow_run
from maskdiff.ops.orphans import owner_tags

@flow(name="orphan-sweep-probe")
def hold(uri: str, experiment: str, folder: str) -> None:
    claim_flow_run(get_run_logger())
    client = MlflowClient(uri)
    tags = {**owner_tags(), "prefect.flow_run_id": str(flow_run.get_id())}
    run = client.create_run(experiment, tags=tags)
    out = pathlib.Path(folder)
    (out / "ids.tmp").write_text(f"{flow_run.get_id()} {run.info.run_id}")
    (out / "ids.tmp").rename(out / "ids")
    while not (out / "release").exists():
        time.sleep(0.1)
    client.set_terminated(run.info.run_id, "FINISHED")

hold(*sys.argv[1:])
"""


def test_the_sweep_never_marks_a_live_concurrent_run(prefect_harness: str, tmp_path: Path):
    from flows.orphans import sweep_orphans

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("orphans")  # the store's tables, made once here
    env = code_env(PREFECT_API_URL=prefect_harness)
    holders: dict[str, ServerProcess] = {}
    for name in ("live", "killed"):
        (tmp_path / name).mkdir()
        cmd = [sys.executable, "-c", HOLDER, uri, experiment, str(tmp_path / name)]
        log = tmp_path / f"{name}.log"
        holders[name] = ServerProcess(name, "", spawn(cmd, log, env), log)
    try:
        ids = {n: wait_until(lambda n=n: _ids(tmp_path / n), 120, f"{n}'s runs", [p])
               for n, p in holders.items()}  # fmt: skip
        killed = holders["killed"].process
        killed.send_signal(signal.SIGKILL)
        killed.wait(15)
        for flow_id, run_id in ids.values():  # both left RUNNING
            assert _flow_state(flow_id) == "RUNNING"
            assert mlflow.get_run(run_id).info.status == "RUNNING"

        cfg = smoke_config(tmp_path / "runs", f"tracking.tracking_uri={uri}")
        sweep_orphans(cfg, tmp_path / "runs", logging.getLogger("test.orphans"))

        dead_flow, dead_run = ids["killed"]
        assert _flow_state(dead_flow) == "CRASHED"
        assert mlflow.get_run(dead_run).info.status == "KILLED"
        assert f"process {killed.pid} " in mlflow.get_run(dead_run).data.tags[ORPHAN_TAG]
        live_flow, live_run = ids["live"]
        assert _flow_state(live_flow) == "RUNNING"
        assert mlflow.get_run(live_run).info.status == "RUNNING"
        assert ORPHAN_TAG not in mlflow.get_run(live_run).data.tags

        (tmp_path / "live" / "release").touch()  # the live run then ends as it would have
        assert holders["live"].process.wait(60) == 0, holders["live"].log_tail(40)
        wait_until(lambda: _flow_state(live_flow) == "COMPLETED", 30, "the live run's end")
        assert mlflow.get_run(live_run).info.status == "FINISHED"
    finally:
        for holder in holders.values():
            holder.stop()


def _ids(folder: Path) -> tuple[str, str] | None:
    path = folder / "ids"
    return tuple(path.read_text().split()) if path.is_file() else None  # type: ignore[return-value]


def _flow_state(flow_run_id: str) -> str:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state.type.value if state is not None else "NONE"
