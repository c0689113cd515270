"""A command's own temporary Prefect server (flows.stores.start_temporary_server).

Without ``PREFECT_API_URL`` a command starts Prefect's API in a child process itself, instead of
letting Prefect import its whole server application into the command to do the same. Checked in
a child process as a command runs it: Prefect's server module is never imported, the flow run
talks to the server, its final state is in the database before the server stops, the server is
gone when the command ends, and no link to the stopped server is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import REPO, code_env

COMMAND = """
import json, os, sys
from flows.stores import (prepare_local_prefect_database, start_temporary_server,
                          wait_for_temporary_server)
server = start_temporary_server(prepare_local_prefect_database())
from prefect import flow
wait_for_temporary_server(server)

@flow(name="tiny")
def tiny():
    return 42

state = tiny(return_state=True)
print(json.dumps({"pid": server.process.pid, "api": os.environ["PREFECT_API_URL"],
                  "flow_run": str(state.state_details.flow_run_id), "result": state.result(),
                  "server_module": "prefect.server.api.server" in sys.modules}))
"""


def _command_env(home: Path, **extra: str) -> dict[str, str]:
    """A command's environment with its own Prefect home and database, and no server named."""
    database = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = code_env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=database, **extra)
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_UI_URL", None)
    return env


@pytest.mark.slow  # a Prefect server: not in `make test-fast`
def test_a_command_runs_its_flow_on_its_own_temporary_server(tmp_path: Path) -> None:
    home = tmp_path / "prefect"
    env = _command_env(home, PREFECT_LOGGING_LEVEL="INFO")
    out = subprocess.run([sys.executable, "-c", COMMAND], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["result"] == 42
    assert facts["api"].startswith("http://127.0.0.1:") and facts["api"].endswith("/api")
    assert not facts["server_module"], "Prefect's server application was imported"
    # the server ended with the command; the flow run's last state reached it before that
    assert not psutil.pid_exists(facts["pid"])
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        rows = db.execute("SELECT state_type FROM flow_run WHERE id = ?",
                          (facts["flow_run"],)).fetchall()  # fmt: skip
    assert rows == [("COMPLETED",)], rows
    url = facts["api"].removesuffix("/api")
    assert f"Starting temporary server on {url}" in out.stderr
    assert f"Stopping temporary server on {url}" in out.stderr
    assert "View at" not in out.stderr  # no link to a UI that stopped with the command
    assert (home / ".prepared.json").is_file()  # migrated once, by the command, under its lock


KILLED = """
import sys, time
from flows.stores import (prepare_local_prefect_database, start_temporary_server,
                          wait_for_temporary_server)
server = start_temporary_server(prepare_local_prefect_database())
wait_for_temporary_server(server)
print(server.process.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.slow  # a Prefect server: not in `make test-fast`
def test_the_server_ends_with_a_command_killed_outright(tmp_path: Path) -> None:
    """SIGKILL runs no ``atexit``: the server, in its own process group, still ends (Linux's
    parent-death signal), rather than serving on with nobody to stop it."""
    env = _command_env(tmp_path / "prefect")
    command = subprocess.Popen([sys.executable, "-c", KILLED], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    server = None
    try:
        assert command.stdout is not None
        server = psutil.Process(int(command.stdout.readline()))
        assert server.is_running() and os.getpgid(server.pid) != os.getpgid(command.pid)
    finally:
        command.kill()
        command.wait(10)
    assert server is not None
    _, alive = psutil.wait_procs([server], timeout=20)
    if alive:
        server.kill()
    assert not alive, "the temporary server outlived its killed command"
