"""The Prefect server and the MLflow server on PostgreSQL, as docs/team-setup.md configures them.

A throwaway cluster (``initdb`` + ``pg_ctl`` in a temporary folder, trust auth on 127.0.0.1),
one database per server; two ``maskdiff run`` at once against both servers (what SQLite serves
badly), then the rows read back from PostgreSQL itself. Skipped only where the PostgreSQL server
binaries are not installed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import spawn, train_yaml

from maskdiff.ops.servers import ServerProcess, free_port, prefect_env, start_mlflow, start_prefect

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest versioned one."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts)
    return versions[-1].parent if versions else None


PG_BIN = postgres_bin()


def _as_owner() -> tuple[list[str], str | None]:
    """``initdb`` refuses root: as root, run the cluster as ``postgres`` (or ``nobody``)."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"], user
    pytest.fail("running as root with neither a postgres nor a nobody user to own the cluster")


@pytest.fixture
def postgres() -> Iterator[str]:
    """A cluster on a free port; yields ``host:port``. Stopped (fast) and removed at the end."""
    if PG_BIN is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    prefix, user = _as_owner()
    folder = Path(tempfile.mkdtemp(prefix="maskdiff-pg-"))
    if user:
        shutil.chown(folder, user)
    data, port = folder / "data", free_port()

    def pg(*cmd: str) -> None:
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{cmd}:\n{done.stdout}\n{done.stderr}"

    started = False
    try:
        pg(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
           "-E", "UTF8", "--no-sync")  # fmt: skip
        options = f"-k {folder} -p {port} -h 127.0.0.1"
        pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "pg.log"),
           "-o", options, "-w", "start")  # fmt: skip
        started = True
        for name in ("prefect", "mlflow"):
            pg(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        yield f"127.0.0.1:{port}"
    finally:
        if started:
            subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def psql(address: str, database: str, query: str) -> list[str]:
    host, port = address.split(":")
    cmd = [str(PG_BIN / "psql"), "-h", host, "-p", port, "-U", "postgres", "-d", database,
           "-At", "-c", query]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_both_servers_on_postgresql_with_two_concurrent_runs(postgres: str, tmp_path: Path) -> None:
    servers: list[ServerProcess] = []
    runs: list[subprocess.Popen[bytes]] = []
    try:
        servers.append(start_prefect(
            tmp_path / "prefect", database_url=f"postgresql+asyncpg://postgres@{postgres}/prefect"
        ))  # fmt: skip
        servers.append(start_mlflow(
            tmp_path / "mlflow", backend_store_uri=f"postgresql+psycopg2://postgres@{postgres}/mlflow"
        ))  # fmt: skip
        for server in servers:
            server.wait_ready(180)
        prefect, mlflow = servers
        env = prefect_env(tmp_path / "client", api_url=f"{prefect.url}/api")
        env["MLFLOW_TRACKING_URI"] = mlflow.url
        for name in ("pg-a", "pg-b"):
            config = tmp_path / f"{name}.yaml"
            config.write_text(train_yaml(tmp_path / name, name=name, max_steps=20))
            cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config),
                   "--stage", "data", "--no-progress"]  # fmt: skip
            runs.append(spawn(cmd, tmp_path / f"{name}.log", env))
        for name, run in zip(("pg-a", "pg-b"), runs, strict=True):
            assert run.wait(300) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, 9)
                run.wait(30)
        for server in reversed(servers):
            server.stop()

    # the rows are in PostgreSQL: two completed pipelines, two finished MLflow runs
    pipelines = psql(postgres, "prefect", "SELECT r.state_type FROM flow_run r JOIN flow f ON "
                     "f.id = r.flow_id WHERE f.name = 'maskdiff-pipeline'")  # fmt: skip
    assert pipelines == ["COMPLETED", "COMPLETED"]
    statuses = psql(postgres, "mlflow", "SELECT status FROM runs")
    assert statuses == ["FINISHED", "FINISHED"]
    steps = psql(postgres, "mlflow", "SELECT value FROM params WHERE key = 'train.max_steps'")
    assert steps == ["20", "20"]
