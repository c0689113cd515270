"""Signals reach every child: ``maskdiff run``, ``serve`` and ``ui`` under SIGTERM and SIGINT.

Each command runs as a real process tree (temporary Prefect server, a served flow run's
subprocess, the UI's two servers). The test lists the tree before the signal and asserts that
nothing of it is left after, that the ports are free, the exit status is 128 + the signal with a
one-line message, and that the runs are closed (MLflow KILLED, Prefect CRASHED or CANCELLED).
``ui`` under SIGTERM is tests/test_cli_errors.py's. Then a run killed outright (SIGKILL of its
whole tree): the next start marks its MLflow run KILLED and its Prefect flow run CRASHED.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
from helpers import code_env, train_yaml, wait_until
from mlflow import MlflowClient
from mlflow.entities import Run

from maskdiff.ops.orphans import ORPHAN_TAG, OWNER_TAG
from maskdiff.ops.processes import Owner
from maskdiff.ops.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow


def child_env() -> dict[str, str]:
    """The test environment without the session's stores: a command uses its run root's."""
    env = code_env()
    for key in ("PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_URL",
                "MLFLOW_TRACKING_URI"):  # fmt: skip
        env.pop(key, None)
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the tests wait for the training's log lines
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a loaded machine
    return env


@contextlib.contextmanager
def command(
    argv: list[str], log: Path, api: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``maskdiff <argv>`` in its own session (on the Prefect server ``api`` if given, else on a
    temporary one); whatever is left of its tree is killed after."""
    env = child_env() | ({"PREFECT_API_URL": api} if api else {})
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], cwd=log.parent,
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    tree: list[psutil.Process] = []
    try:
        yield proc
    finally:
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(proc.pid).children(recursive=True)
        for p in [*tree]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def wait_for(what: Callable[[], object], proc: subprocess.Popen[bytes], log: Path,
             timeout: float = 240) -> object:  # fmt: skip
    """Poll ``what`` until it returns something true; fail with the log if the command ends."""
    watched = ServerProcess(f"maskdiff {proc.args[3]}", "", proc, log)
    return wait_until(what, timeout, "the command", [watched], interval=0.2)


def tree_of(pid: int) -> list[psutil.Process]:
    """The live (not zombie) processes below ``pid``."""
    out = []
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def ports_of(procs: list[psutil.Process]) -> set[int]:
    """The ports named by ``--port N`` in the command lines (the servers of the tree)."""
    out = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            out |= {int(cmd[i + 1]) for i, a in enumerate(cmd[:-1]) if a == "--port"}
    return out


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def signal_and_check(
    proc: subprocess.Popen[bytes], sig: signal.Signals, log: Path, status: int, last: str,
    servers: bool = True,
) -> None:  # fmt: skip
    """Send ``sig`` to the command alone (as ``kill`` would), then: exit ``status`` with ``last``
    as its last line, and nothing of its tree or its ports left. ``servers``: its tree holds a
    server (a ``--port`` in a command line)."""
    tree = tree_of(proc.pid)
    ports = ports_of(tree)
    assert tree and (ports or not servers), [p.cmdline() for p in tree]
    proc.send_signal(sig)
    try:
        assert proc.wait(90) == status, log.read_text()[-3000:]
        assert log.read_text().strip().splitlines()[-1].endswith(last), log.read_text()[-2000:]
        _, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, f"outlived the command: {[p.cmdline() for p in alive]}"
        assert not [port for port in ports if listening(port)], ports
    finally:  # what outlived it is no longer below its PID: the fixture would miss it
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()


def prefect_runs(database: Path) -> dict[str, tuple[str, str]]:
    """Flow run id (without dashes) -> (state type, state message) in a Prefect database."""
    db = sqlite3.connect(database)
    try:
        rows = db.execute(
            "select f.id, f.state_type, s.message from flow_run f "
            "left join flow_run_state s on s.id = f.state_id"
        ).fetchall()
    finally:
        db.close()
    return {str(i).replace("-", ""): (t, m or "") for i, t, m in rows}


def owner_pid(run: Run) -> int | None:
    owner = Owner.parse(run.data.tags.get(OWNER_TAG, ""))
    return None if owner is None else owner.pid


def mlflow_runs(root: Path) -> list[Run]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def config(workdir: Path, name: str) -> Path:
    """A long training run (stopped by the tests) on its own run root, ``workdir/name/runs``;
    ``maskdiff serve`` serves it as ``maskdiff-pipeline/<name>`` (its own name on a shared
    server)."""
    path = workdir / name / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = train_yaml(workdir / name / "runs", name=name, max_steps=100000)
    path.write_text(f"{text}nightly: {{deployment: {name}}}\n")
    return path


def run_argv(cfg: Path) -> list[str]:
    return ["run", "--config", str(cfg), "--stage", "train", "--no-progress"]


class Started(NamedTuple):
    """A command started by ``start``: its process, log, run root, Prefect database."""

    proc: subprocess.Popen[bytes]
    log: Path
    root: Path
    prefect_db: Path
    api: str | None  # the shared Prefect server's API, None with a temporary server


# The commands on the session's Prefect server; the others start Prefect's temporary server
# (the process that SIGTERM used to leave behind).
ON_SHARED_SERVER = {"serve-SIGINT", "killed"}


@pytest.fixture
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Started]]:
    """Starts a command (``run-SIGTERM``, ``serve-SIGINT``, ``ui-SIGINT``, ``killed``...) on its
    own run root, ``tmp_path/<name>/runs``; whatever is left of it is killed after the test.

    Each test starts its command when it runs: started all at once, the trainings waiting for
    their test would keep a core busy each, and Prefect's temporary servers, whose port is
    picked at random and checked free until the server binds, could pick the same one.
    """
    with contextlib.ExitStack() as stack:

        def launch(name: str) -> Started:
            cfg = config(tmp_path, name)
            if name.startswith("ui"):
                ports = [str(free_port()), str(free_port())]
                argv = ["ui", "--config", str(cfg), "--prefect-port", ports[0],
                        "--mlflow-port", ports[1]]  # fmt: skip
            elif name.startswith(("run", "killed")):
                argv = run_argv(cfg)
            else:
                argv = ["serve", "--config", str(cfg)]
            api, db = None, cfg.parent / "runs" / "prefect" / "prefect.db"
            if name in ON_SHARED_SERVER:
                shared = request.getfixturevalue("prefect_server")
                api, db = f"{shared.url}/api", Path(shared.env["PREFECT_HOME"]) / "prefect.db"
            log = cfg.parent / "command.log"
            proc = stack.enter_context(command(argv, log, api))
            return Started(proc, log, log.parent / "runs", db, api)

        yield launch


def training(log: Path) -> Callable[[], bool]:
    return lambda: "mdm step" in log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_stops_every_child(start: Callable[[str], Started], sig: signal.Signals) -> None:
    """Mid-training: the temporary Prefect server stops too, the MLflow run is KILLED and the
    flow run CRASHED (before: SIGTERM left the server running, holding its port)."""
    proc, log, root, prefect_db, _ = start(f"run-{sig.name}")
    wait_for(training(log), proc, log)
    signal_and_check(proc, sig, log, 128 + sig, f"maskdiff: stopped by {sig.name}")
    (run,) = mlflow_runs(root)
    assert owner_pid(run) == proc.pid and run.info.status == "KILLED", run.info
    state, _ = prefect_runs(prefect_db)[run.data.tags["prefect.flow_run_id"].replace("-", "")]
    assert state == "CRASHED"


def api_json(request: urllib.request.Request | str) -> dict:
    """One Prefect API call, retried on 503 as Prefect's own client does: the server answers 503
    when its SQLite database is busy (the served flow's own writes, on a loaded CI machine)."""
    for attempt in range(8):
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 7:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def create_flow_run(api: str, deployment: str) -> str:
    """A flow run of ``deployment`` (``flow/name``) through the REST API; returns its id."""
    deployment_id = api_json(f"{api}/deployments/name/{deployment}")["id"]
    request = urllib.request.Request(
        f"{api}/deployments/{deployment_id}/create_flow_run", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    return str(api_json(request)["id"])


def test_serve_stops_on_sigterm(start: Callable[[str], Started]) -> None:
    """Idle (no flow run): the temporary Prefect server stops with it."""
    proc, log, *_ = start("serve-SIGTERM")
    wait_for(lambda: "Serving" in log.read_text(), proc, log)
    signal_and_check(proc, signal.SIGTERM, log, 143, "maskdiff: stopped by SIGTERM")


def test_serve_stops_its_flow_runs_on_sigint(start: Callable[[str], Started]) -> None:
    """With a served flow run training in its subprocess: Ctrl-C stops as SIGTERM does (the
    same path): the flow run's subprocess ends and the flow run is CANCELLED (before: SIGINT
    left it RUNNING)."""
    proc, log, _, prefect_db, api = start("serve-SIGINT")
    wait_for(lambda: "Serving" in log.read_text(), proc, log)
    run_id = create_flow_run(str(api), "maskdiff-pipeline/serve-SIGINT")
    wait_for(training(log), proc, log)
    assert any("prefect.engine" in " ".join(p.cmdline()) for p in tree_of(proc.pid))
    signal_and_check(proc, signal.SIGINT, log, 130, "maskdiff: stopped by SIGINT", servers=False)
    state, message = prefect_runs(prefect_db)[run_id.replace("-", "")]
    assert state == "CANCELLED", message


def test_ui_stops_both_servers_on_sigint(start: Callable[[str], Started]) -> None:
    """Ctrl-C (SIGINT) as SIGTERM: both servers' process groups end, both ports are free."""
    proc, log, *_ = start("ui-SIGINT")
    wait_for(lambda: "Ctrl-C stops both" in log.read_text(), proc, log)
    signal_and_check(proc, signal.SIGINT, log, 0, "stopped by SIGINT; both servers stopped")


def test_a_run_killed_outright_is_marked_on_the_next_start(
    start: Callable[[str], Started],
) -> None:
    """SIGKILL of a run's whole tree mid-training leaves its MLflow run and Prefect flow run
    RUNNING; the next ``maskdiff run`` closes the first KILLED (tagged why) and marks the second
    CRASHED, then completes."""
    proc, log, root, prefect_db, api = start("killed")
    wait_for(training(log), proc, log)
    tree = [psutil.Process(proc.pid), *tree_of(proc.pid)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=15)
    (killed,) = mlflow_runs(root)
    assert killed.info.status == "RUNNING"
    flow_run_id = killed.data.tags["prefect.flow_run_id"].replace("-", "")
    assert prefect_runs(prefect_db)[flow_run_id][0] == "RUNNING"

    cli = [sys.executable, "-m", "flows.cli", *run_argv(log.parent / "config.yaml"),
           "--set", "train.max_steps=60"]  # fmt: skip
    env = child_env() | {"PREFECT_API_URL": str(api)}
    again = subprocess.run(cli, cwd=log.parent, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    old = {r.info.run_id: r for r in mlflow_runs(root)}[killed.info.run_id]
    assert old.info.status == "KILLED"
    assert f"process {owner_pid(killed)} " in old.data.tags[ORPHAN_TAG]
    state, message = prefect_runs(prefect_db)[flow_run_id]
    assert state == "CRASHED" and "killed outright" in message, (state, message)
    summary = json.loads(Path(again.stdout.strip().splitlines()[-1]).read_text())
    new = {r.info.run_id: r for r in mlflow_runs(root)}[summary["mlflow_run_id"]]
    assert new.info.status == "FINISHED"
    assert "mdm step 60/60" in again.stderr, again.stderr[-2000:]


def test_an_owner_is_dead_only_when_its_process_is_gone() -> None:
    """Alive: this process. Dead: a process that ended, or this PID with another start time (a
    reused PID). Never judged: another host or PID namespace."""
    me = Owner.current()
    assert Owner.parse(me.tag()) == me and not me.is_dead()
    assert not replace(me, host=me.host + "-elsewhere", pid=2**22 + 1).is_dead()
    assert not replace(me, pidns=me.pidns + "0", pid=2**22 + 1).is_dead()
    assert replace(me, started=me.started - 60).is_dead()
    child = subprocess.Popen(["sleep", "30"])
    owner = replace(me, pid=child.pid, started=psutil.Process(child.pid).create_time())
    assert not owner.is_dead()
    child.kill()
    child.wait()
    assert owner.is_dead()
