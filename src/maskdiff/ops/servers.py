"""Starting and stopping the Prefect and MLflow servers (and MLflow's model server) as child
processes.

Used by ``maskdiff ui`` and by the end-to-end tests. Commands are argument lists (never shell
strings), servers bind to 127.0.0.1 unless told otherwise, and every process is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from maskdiff.ops.store_templates import seed_from_template

__all__ = [
    "MLFLOW_UI_PORT",
    "PREFECT_UI_PORT",
    "ServerProcess",
    "free_port",
    "mlflow_experiment_url",
    "prefect_env",
    "project_prefect_home",
    "start_mlflow",
    "start_model_server",
    "start_prefect",
    "start_prefect_api",
]

LOCALHOST = "127.0.0.1"
PREFECT_UI_PORT = 4200  # where ``maskdiff ui`` serves each UI unless told another port
MLFLOW_UI_PORT = 5000
# The MLflow 3.17 UI takes an experiment's kind from its "workflow type" switch (kept in the
# browser, GenAI by default) before the experiment's tag; this query sets it for the visit, so an
# experiment opens on its runs and charts instead of the GenAI overview.
MLFLOW_UI_QUERY = "?workflowType=machine_learning"


def project_prefect_home(root: Path) -> Path:
    """Prefect's home (and SQLite database) of a run root: what ``maskdiff ui`` serves."""
    return Path(root).resolve() / "prefect"


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """The console script beside this interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


@dataclass
class ServerProcess:
    """A server child process with its URL and log file."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    health_path: str = "/"
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Poll the health URL every ``interval`` s until it answers 200; raise with the log
        tail if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(interval)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def _spawn(
    name: str, cmd: list[str], env: dict[str, str], log_path: Path, url: str, health: str
) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() reaches its workers too
        )
    return ServerProcess(name, url, proc, log_path, health, env)


def prefect_env(
    home: Path, api_url: str | None = None, database_url: str | None = None
) -> dict[str, str]:
    """Environment for a Prefect process with its own home and database (``database_url``,
    e.g. ``postgresql+asyncpg://user:password@host:5432/prefect``; default SQLite in ``home``)."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url
        or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def start_prefect(
    home: Path, port: int | None = None, host: str = LOCALHOST, database_url: str | None = None
) -> ServerProcess:
    """``prefect server start`` with its own PREFECT_HOME and database (SQLite in ``home``
    unless ``database_url`` names another); returns once spawned. A new SQLite database starts
    as a copy of the migrated template when there is one (:mod:`maskdiff.ops.store_templates`).
    The server skips its schema check and block registration when a SQLite database is known to
    need neither (:func:`maskdiff.ops.prefect_store.skips_checks`): about 1 s less to start."""
    from maskdiff.ops.prefect_store import skips_checks

    port = port or free_port(host)
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    env = prefect_env(home, database_url=database_url)
    if database_url is None:
        copied = seed_from_template(home / "prefect.db", "prefect")
        if skips_checks(home, home / "prefect.db", copied):
            env.update(PREFECT_SERVER_DATABASE_MIGRATE_ON_START="false",
                       PREFECT_SERVER_REGISTER_BLOCKS_ON_START="false")  # fmt: skip
    env["PREFECT_UI_API_URL"] = f"{url}/api"
    cmd = [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)]
    return _spawn("prefect server", cmd, env, home / "server.log", url, "/api/health")


# Runs a module as ``python -m`` would, after asking Linux to send the process SIGTERM when its
# parent ends (PR_SET_PDEATHSIG), however the parent ends: a server started for one command in
# its own process group does not outlive a command killed outright (SIGKILL, the OOM killer).
# argv: the parent's PID, the module, its arguments.
_TIED_TO_PARENT = """
import os, runpy, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the request took effect
        sys.exit(0)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def start_prefect_api(env: dict[str, str], log_path: Path) -> ServerProcess:
    """Prefect's API without its UI, as Prefect runs a temporary server itself: ``uvicorn`` on
    the ``create_app`` factory, on a free port of 127.0.0.1, stopped by the system when this
    process ends (on Linux) if nothing stopped it before. ``env`` is the whole environment of
    the server; returns once spawned (:meth:`ServerProcess.wait_ready` waits for it)."""
    port = free_port()
    url = f"http://{LOCALHOST}:{port}"
    app = "prefect.server.api.server:create_app"
    uvicorn = ["uvicorn", "--factory", app, "--host", LOCALHOST, "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    cmd = [sys.executable, "-c", _TIED_TO_PARENT, str(os.getpid()), *uvicorn]
    return _spawn("temporary Prefect server", cmd, env, log_path, url, "/api/health")


def start_mlflow(
    root: Path, port: int | None = None, host: str = LOCALHOST, backend_store_uri: str | None = None
) -> ServerProcess:
    """``mlflow server`` with one worker over ``root/mlflow.db`` (or ``backend_store_uri``, e.g.
    ``postgresql+psycopg2://user:password@host:5432/mlflow``) and artifacts in ``root/mlartifacts``.

    Without job execution: MLflow 3 would otherwise start a job runner and a pool of huey
    consumers for its GenAI jobs (about 2 GB), which maskdiff never submits. A new
    ``root/mlflow.db`` starts as a copy of the migrated template when there is one
    (:mod:`maskdiff.ops.store_templates`).
    """
    port = port or free_port(host)
    root.mkdir(parents=True, exist_ok=True)
    if backend_store_uri is None:
        seed_from_template(root / "mlflow.db", "mlflow")
    url = f"http://{host}:{port}"
    env = dict(
        os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}",
        "--artifacts-destination",
        str((root / "mlartifacts").resolve()),
    ]
    return _spawn("mlflow server", cmd, env, root / "mlflow-server.log", url, "/health")


def start_model_server(
    model_uri: str,
    log_path: Path,
    tracking_uri: str | None = None,
    port: int | None = None,
    host: str = LOCALHOST,
) -> ServerProcess:
    """``mlflow models serve`` of ``model_uri`` (``models:/maskdiff-denoiser@champion``) in this
    environment (``--env-manager local``), one worker; ready when ``/ping`` answers.

    MLflow starts ``uvicorn`` through a shell, by name: this interpreter's folder goes first on
    PATH so that the virtual environment's is found without activating it.
    """
    port = port or free_port(host)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = [_bin("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    return _spawn("mlflow models serve", cmd, env, log_path, f"http://{host}:{port}", "/ping")


def mlflow_experiment_url(server_url: str, name: str) -> str | None:
    """The UI link of experiment ``name`` on a running MLflow server; None if it has none yet."""
    query = urllib.parse.urlencode({"experiment_name": name})
    api = f"{server_url}/api/2.0/mlflow/experiments/get-by-name?{query}"
    try:
        with urllib.request.urlopen(api, timeout=10) as resp:
            experiment_id = json.load(resp)["experiment"]["experiment_id"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return None
    return f"{server_url}/#/experiments/{experiment_id}{MLFLOW_UI_QUERY}"
