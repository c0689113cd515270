"""Three ``maskdiff run`` commands started at once in one project folder, as a user would.

No store is configured in the environment, so the runs use the project stores under
``data.root``: one Prefect SQLite database (each run starts its own temporary Prefect server on
it) and one MLflow SQLite database. With the same config each stage is built once and reused by
the other run, each run trains in its own folder; a run with other seeds beside them completes
with its own corruption stage and shares the rest. Neither store reports "database is locked" or
any other error.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import cli_command, spawn, train_yaml
from mlflow import MlflowClient

STAGES = ("documents", "tokenizer", "blocks", "corruptions")
_STORE_VARIABLES = (
    "PREFECT_HOME",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
)
_BAD_SIGNS = ("database is locked", "Traceback", "OperationalError", "IntegrityError", "ERROR")


def run_at_once(config: Path, logs: Path, *extra: list[str]) -> list[dict]:
    """Start one ``maskdiff run`` per ``extra`` argument list at the same moment; wait for all;
    return their run summaries. Every process group is killed if anything goes wrong."""
    env = {k: v for k, v in os.environ.items() if k not in _STORE_VARIABLES}
    children, paths = [], []
    try:
        for i, args in enumerate(extra):
            log = logs / f"run-{i}.log"
            paths.append(log)
            children.append(spawn([*cli_command(config), *args], log, env))
        deadline = time.monotonic() + 300  # three on 2 loaded cores
        for child in children:
            child.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)
    summaries = []
    for child, log in zip(children, paths, strict=True):
        text = log.read_text(errors="replace")
        assert child.returncode == 0, text[-4000:]
        for sign in _BAD_SIGNS:
            assert sign not in text, f"{sign!r} in {log.name}:\n{text[-4000:]}"
        summaries.append(json.loads(Path(text.strip().splitlines()[-1]).read_text()))
    return summaries


def finished_flow_runs(root: Path) -> list[tuple[str, str]]:
    """(flow name, state) of every flow run in the project's Prefect database."""
    query = (
        "SELECT flow.name, flow_run.state_type"
        " FROM flow_run JOIN flow ON flow.id = flow_run.flow_id"
    )
    uri = f"file:{root / 'prefect' / 'prefect.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        return sorted(db.execute(query).fetchall())


@pytest.mark.slow
def test_runs_at_once_share_stages_and_stores(tmp_path: Path) -> None:
    """Three at once: two of one config, and one with other seeds."""
    root = tmp_path / "project" / "runs"
    config = tmp_path / "concurrent.yaml"
    config.write_text(train_yaml(root, name="concurrent", max_steps=40), encoding="utf-8")

    other = ["--set", "train.seed=2", "--set", "corruption.seed=2"]
    first, second, seeded = run_at_once(config, tmp_path, [], [], other)
    for name in STAGES:  # built once, the other run reused it
        assert first["stages"][name] == second["stages"][name]
        expected = 2 if name == "corruptions" else 1  # the other seed's corruptions are its own
        assert len(list((root / "data").glob(f"{name}-*"))) == expected, name
    assert not list(root.rglob("*.tmp-*"))
    runs = {first["models"]["mdm"]["run_dir"], second["models"]["mdm"]["run_dir"]}
    assert len(runs) == 2, "two runs at once must never train in one folder"
    assert all((Path(r) / "DONE").is_file() for r in runs)
    assert seeded["stages"]["corruptions"] != first["stages"]["corruptions"]
    assert seeded["stages"]["blocks"] == first["stages"]["blocks"]
    assert seeded["models"]["mdm"]["metrics"] != first["models"]["mdm"]["metrics"]

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("maskdiff")
    assert experiment is not None
    mlflow_runs = client.search_runs([experiment.experiment_id])
    ids = {s["mlflow_run_id"] for s in (first, second, seeded)}
    assert len(ids) == 3 and {r.info.run_id for r in mlflow_runs} == ids
    assert {r.info.status for r in mlflow_runs} == {"FINISHED"}
    states = finished_flow_runs(root)
    assert [name for name, _ in states].count("maskdiff-pipeline") == 3
    assert {state for _, state in states} == {"COMPLETED"}
