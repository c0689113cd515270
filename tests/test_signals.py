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
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import train_yaml
from mlflow import MlflowClient
from mlflow.entities import Run

from maskdiff.ops.orphans import ORPHAN_TAG, OWNER_TAG
from maskdiff.ops.processes import Owner
from maskdiff.ops.servers import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def child_env() -> dict[str, str]:
    """The test environment without the session's stores: a command uses its run root's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    for key in ("PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_URL",
                "MLFLOW_TRACKING_URI"):  # fmt: skip
        env.pop(key, None)
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the tests wait for the training's log lines
    return env


@contextlib.contextmanager
def command(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``maskdiff <argv>`` in its own session; whatever is left of its tree is killed after."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], cwd=log.parent,
                                env=child_env(), stdout=out, stderr=subprocess.STDOUT,
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
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        assert proc.poll() is None, f"ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def tree_of(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


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
    proc: subprocess.Popen[bytes], sig: signal.Signals, log: Path, status: int, last: str
) -> None:
    """Send ``sig`` to the command alone (as ``kill`` would), then: exit ``status`` with ``last``
    as its last line, and nothing of its tree or its ports left."""
    tree = tree_of(proc.pid)
    ports = ports_of(tree)
    assert tree and ports, [p.cmdline() for p in tree]
    proc.send_signal(sig)
    assert proc.wait(90) == status, log.read_text()[-3000:]
    assert log.read_text().strip().splitlines()[-1].endswith(last), log.read_text()[-2000:]
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, f"outlived the command: {[p.cmdline() for p in alive]}"
    assert not [port for port in ports if listening(port)], ports


def prefect_runs(root: Path) -> dict[str, tuple[str, str]]:
    """Flow run id -> (state type, state message) in the run root's Prefect database."""
    db = sqlite3.connect(root / "prefect" / "prefect.db")
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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run root for the module: the data stages are built once."""
    return tmp_path_factory.mktemp("signals")


def config(workdir: Path, name: str, max_steps: int = 100000) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(train_yaml(workdir / "runs", name=name, max_steps=max_steps))
    return path


def training(log: Path) -> Callable[[], bool]:
    return lambda: "mdm step" in log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_stops_every_child(workdir: Path, sig: signal.Signals) -> None:
    """Mid-training: the temporary Prefect server stops too, the MLflow run is KILLED and the
    flow run CRASHED (before: SIGTERM left the server running, holding its port)."""
    log = workdir / f"run-{sig.name}.log"
    argv = ["run", "--config", str(config(workdir, "sig")), "--stage", "train", "--no-progress"]
    with command(argv, log) as proc:
        wait_for(training(log), proc, log)
        signal_and_check(proc, sig, log, 128 + sig, f"maskdiff: stopped by {sig.name}")
    root = workdir / "runs"
    (run,) = [r for r in mlflow_runs(root) if owner_pid(r) == proc.pid]
    assert run.info.status == "KILLED", run.info
    state, _ = prefect_runs(root)[run.data.tags["prefect.flow_run_id"].replace("-", "")]
    assert state == "CRASHED"


def create_flow_run(api: str, deployment: str) -> str:
    """A flow run of ``deployment`` (``flow/name``) through the REST API; returns its id."""
    with urllib.request.urlopen(f"{api}/deployments/name/{deployment}", timeout=30) as resp:
        deployment_id = json.load(resp)["id"]
    request = urllib.request.Request(
        f"{api}/deployments/{deployment_id}/create_flow_run", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as resp:
        return str(json.load(resp)["id"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_every_child(workdir: Path, sig: signal.Signals) -> None:
    """With a served flow run training in its subprocess: the flow run subprocess and the
    temporary server stop, and the flow run is CANCELLED, not left RUNNING (before: SIGINT left
    it RUNNING)."""
    log = workdir / f"serve-{sig.name}.log"
    with command(["serve", "--config", str(config(workdir, "sig"))], log) as proc:
        wait_for(lambda: "Serving" in log.read_text(), proc, log)
        (port,) = ports_of(tree_of(proc.pid))  # the temporary Prefect server's
        run_id = create_flow_run(f"http://127.0.0.1:{port}/api", "maskdiff-pipeline/nightly")
        wait_for(training(log), proc, log)
        assert any("prefect.engine" in " ".join(p.cmdline()) for p in tree_of(proc.pid))
        signal_and_check(proc, sig, log, 128 + sig, f"maskdiff: stopped by {sig.name}")
    state, message = prefect_runs(workdir / "runs")[run_id.replace("-", "")]
    assert state == "CANCELLED", message


def test_ui_stops_both_servers_on_sigint(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) as SIGTERM: both servers' process groups end, both ports are free."""
    cfg = tmp_path / "ui.yaml"
    cfg.write_text(f"data:\n  root: {tmp_path / 'runs'}\n")
    ports = [str(free_port()), str(free_port())]
    argv = ["ui", "--config", str(cfg), "--prefect-port", ports[0], "--mlflow-port", ports[1]]
    log = tmp_path / "ui.log"
    with command(argv, log) as proc:
        wait_for(lambda: "Ctrl-C stops both" in log.read_text(), proc, log)
        signal_and_check(proc, signal.SIGINT, log, 0, "stopped by SIGINT; both servers stopped")


def test_a_run_killed_outright_is_marked_on_the_next_start(workdir: Path) -> None:
    """SIGKILL of a run's whole tree mid-training leaves its MLflow run and Prefect flow run
    RUNNING; the next ``maskdiff run`` closes the first KILLED (tagged why) and marks the second
    CRASHED, then completes."""
    root = workdir / "runs"
    log = workdir / "killed.log"
    argv = ["run", "--config", str(config(workdir, "orphan")), "--stage", "train", "--no-progress"]
    before = {r.info.run_id for r in mlflow_runs(root)} if (root / "mlflow.db").exists() else set()
    with command(argv, log) as proc:
        wait_for(training(log), proc, log)
        tree = [proc, *tree_of(proc.pid)]
        for p in tree:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=15)
    (killed,) = [r for r in mlflow_runs(root) if r.info.run_id not in before]
    assert killed.info.status == "RUNNING"
    flow_run_id = killed.data.tags["prefect.flow_run_id"].replace("-", "")
    assert prefect_runs(root)[flow_run_id][0] == "RUNNING"

    argv += ["--set", "train.max_steps=60"]  # a short run this time
    cli = [sys.executable, "-m", "flows.cli", *argv]
    again = subprocess.run(cli, cwd=workdir, env=child_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    old = {r.info.run_id: r for r in mlflow_runs(root)}[killed.info.run_id]
    assert old.info.status == "KILLED"
    assert f"process {owner_pid(killed)} " in old.data.tags[ORPHAN_TAG]
    state, message = prefect_runs(root)[flow_run_id]
    assert state == "CRASHED" and "killed outright" in message, (state, message)
    summary = json.loads(Path(again.stdout.strip().splitlines()[-1]).read_text())
    new = {r.info.run_id: r for r in mlflow_runs(root)}[summary["mlflow_run_id"]]
    assert new.info.status == "FINISHED"
    assert "mdm step 60/60" in again.stderr, again.stderr[-2000:]
