"""Test-wide isolation: nothing a test does touches the user's ~/.prefect, ~/.cache or ./mlflow.db.

Set before Prefect or MLflow is imported by any test module (pytest imports conftest first). Each
process that imports this file gets its own stores: under pytest-xdist every worker has its own
PREFECT_HOME, Prefect and MLflow SQLite databases and HF cache.

Also the servers the tests share within a process, each started on a free port the first time a
test asks for it: ``prefect_harness`` (stopped at the end of the session), ``prefect_server`` and
``mlflow_server`` (stopped after the last test of the unit of work that started them), and how
``make test`` spreads the suite over xdist workers (``--dist loadfile``):

* every file is one unit of work, run by one worker (its module-scoped fixtures are built once);
  the files that use the same shared servers are one unit (``SHARED_UNITS``), so one worker
  starts those servers once for all of them;
* the units are handed out longest first (``UNIT_SECONDS``, measured; a unit not listed counts
  a second a test), each to the first worker that is down to its last test: a long unit does not
  start last while the other workers idle, and a short unit does not wait behind a long one on a
  busy worker;
* a test that uses a server fixture is marked ``server`` (``make test-fast`` leaves it out).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from maskdiff.ops.servers import ServerProcess

# Bytecode: the suite starts hundreds of Python processes (commands, torchrun agents and ranks,
# servers, workers), each importing torch, Prefect and MLflow. Under PYTHONDONTWRITEBYTECODE
# (set where these tests were measured) nothing is cached, since `make setup` installs with
# --no-compile, and every process compiles what it imports again: half of a `maskdiff sample`
# (5 of 10 s, measured). Here the suite writes it once, under the interpreter's prefix (the
# venv), never beside the sources; every child of this process inherits the setting.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None or sys.dont_write_bytecode:
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(sys.prefix) / "pycache"))
    sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
    sys.dont_write_bytecode = False

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_HOME = Path(tempfile.mkdtemp(prefix=f"maskdiff-tests-{_WORKER}-"))
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = (
    f"sqlite+aiosqlite:///{_HOME / 'prefect' / 'prefect.db'}"
)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_HOME / 'mlflow.db'}"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = str(_HOME / "hf")
# Every Python process the suite starts (commands, temporary and real servers, torchrun agents
# and ranks, Dask and process-pool workers: hundreds) runs SUITE_SITE first, from the
# sitecustomize.py in $MASKDIFF_TEST_SITE on its PYTHONPATH: a larger first-generation threshold
# for the cyclic collector, which otherwise scans the millions of objects torch, Prefect and
# MLflow allocate as they load, over and over. Only how often the collector runs changes; the
# commands themselves pause it while importing (maskdiff.ops.processes.paused_gc).
SUITE_SITE = "import gc\ngc.set_threshold(100_000, 50, 100)\n"
_SITE = _HOME / "site"
_SITE.mkdir(parents=True)
(_SITE / "sitecustomize.py").write_text(SUITE_SITE, encoding="utf-8")
os.environ["MASKDIFF_TEST_SITE"] = str(_SITE)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_SITE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)
# one Prefect store template for every worker and command of the suite, not the user's cache:
# each new data.root's database is then a copy, not 6 s of migrations (maskdiff.ops.store_templates)
os.environ.setdefault(
    "MASKDIFF_STORE_TEMPLATES", str(Path(sys.prefix) / "maskdiff-store-templates")
)
# torch.compile's kernel cache in the venv, not the machine's /tmp/torchinductor_$USER: a clean
# clone compiles its kernels as a new CI machine does (42 s of CPU for one test's 33 kernels,
# against 10 s with them cached), and the timings measured here are the CI's
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(sys.prefix) / "torchinductor"))
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# a command's temporary Prefect server may take minutes to answer on a loaded machine (the
# default, 20 s, failed test_crash and test_concurrency under load)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

SERVER_FIXTURES = {"prefect_harness", "prefect_server", "mlflow_server"}
# Files that share a unit of work (one worker): the real servers they use start once. Not
# test_signals.py (prefect_server), nor test_cli_errors.py and test_flows.py (prefect_harness;
# the harness lives for the session of each worker that uses it): they are long enough to
# balance better alone. The short files of the harness go with test_dask.py.
SHARED_UNITS = {
    "test_e2e.py": "real servers",  # prefect_server, mlflow_server
    "test_launch_cancel.py": "real servers",  # prefect_server
    "test_tracking.py": "real servers",  # mlflow_server
    "test_dask.py": "harness",
    "test_nodes.py": "harness",
    "test_orphans.py": "harness",
}
# Seconds per file in a full run, for the order the units are handed out in (longest first):
# tests/unit_seconds.json, written by benchmarks/suite_timeline.py from the timeline of a whole
# `make test` (MASKDIFF_TEST_TIMELINE, below). Only the order matters: refresh it when a file's
# share changes a lot. A file not in it counts a second a test.
UNIT_SECONDS: dict[str, float] = json.loads(
    (Path(__file__).with_name("unit_seconds.json")).read_text(encoding="utf-8")
)["seconds"]
# MASKDIFF_TEST_TIMELINE=FILE: each worker appends a JSON line per test (worker, test id, start
# and end, wall clock; CPU seconds of the worker and of the child processes that ended and were
# waited for during the test) for benchmarks/suite_timeline.py.
_TIMELINE = os.environ.get("MASKDIFF_TEST_TIMELINE")


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process, and of its waited-for children (a child's
    own waited-for children included)."""
    import resource

    me, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))  # fmt: skip
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def work_unit(nodeid: str) -> str:
    """The unit of work of a test under ``--dist loadfile``: its file, or the files' shared
    unit. (``--dist loadgroup`` with ``xdist_group`` marks would say the same, but pytest 9.2's
    structured node ids break it: pytest-dev/pytest-xdist#1386.)"""
    path = nodeid.split("::", 1)[0]
    return SHARED_UNITS.get(Path(path).name, path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under ``MASKDIFF_TEST_TIMELINE``: the test's place in the run (setup to teardown) and
    its CPU."""
    if not _TIMELINE:
        yield
        return
    start, (cpu, children) = time.time(), _cpu_seconds()
    yield
    cpu_end, children_end = _cpu_seconds()
    record = {
        "worker": _WORKER, "test": item.nodeid, "start": start, "end": time.time(),
        "cpu": round(cpu_end - cpu, 3), "children_cpu": round(children_end - children, 3),
    }  # fmt: skip
    with open(_TIMELINE, "a", encoding="utf-8") as fh:  # one short line: one write
        fh.write(json.dumps(record) + "\n")


def pytest_unconfigure(config: object) -> None:
    """Remove the session's stores (Prefect, MLflow, HF caches) once every test has finished."""
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadfile``: whole files to a worker, the files of ``SHARED_UNITS`` together,
    handed out in the order of the collection (not xdist's default, the most tests first)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # as --no-loadscope-reorder

    class SharedFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _reschedule(self, node: object) -> None:
            """The next unit once the worker is down to its last test (xdist waits for two:
            a unit of one or two long tests would then hold the next unit behind it). A
            worker runs its last test once it has the next one, or is told to shut down."""
            busy = self.workqueue and not node.shutting_down  # type: ignore[attr-defined]
            if busy and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return SharedFileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``server`` the tests using a server fixture; under xdist, order the units of work
    longest first (``UNIT_SECONDS``; a long unit must not start last while the other workers
    idle). The workers send this order to the scheduler."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # not under xdist: the order of the files
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(work_unit(item.nodeid), []).append(item)

    def seconds(unit: list[pytest.Item]) -> float:
        files = {Path(item.nodeid.split("::", 1)[0]).name for item in unit}
        listed = sum(UNIT_SECONDS.get(f, 0) for f in files)
        return listed + sum(UNIT_SECONDS.get(Path(i.nodeid.split("::")[0]).name) is None
                            for i in unit)  # fmt: skip

    items[:] = [item for unit in sorted(units.values(), key=seconds, reverse=True)
                for item in unit]  # fmt: skip


def _started(server: ServerProcess, timeout: float) -> ServerProcess:
    """``server`` once it answers; stopped if it does not."""
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A temporary Prefect API server and SQLite database for the flows run in this process, as
    Prefect's ``prefect_test_harness`` gives; yields its API URL.

    The server is the one a command starts when no server is named
    (:func:`maskdiff.ops.servers.start_prefect_api`), on a database prepared as a command
    prepares its own (:func:`flows.stores.prepare_local_prefect_database`: a copy of the
    migrated template). Prefect's harness has its server migrate a new database and register
    the block types as it starts: 10 s of CPU and 13 s before it answers, against 3.4 s and 6 s
    here (measured, 2026-12-06), once per worker.
    """
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import (
        PREFECT_API_DATABASE_CONNECTION_URL,
        PREFECT_API_URL,
        PREFECT_HOME,
        temporary_settings,
    )
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.stores import prepare_local_prefect_database, temporary_server_env
    from maskdiff.ops.servers import prefect_env, start_prefect_api

    home = tmp_path_factory.mktemp("prefect-harness")
    env = prefect_env(home)  # its home, and a SQLite database in it
    database = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    with temporary_settings({PREFECT_HOME: home, PREFECT_API_DATABASE_CONNECTION_URL: database}):
        prepared = prepare_local_prefect_database()
    server = _started(
        start_prefect_api(temporary_server_env(env, prepared), home / "server.log"), 120
    )

    async def drain() -> None:  # the last logs and events, before their server stops
        with contextlib.suppress(RuntimeError):  # no log worker started
            if inspect.isawaitable(pending := APILogWorker.instance().drain()):
                await pending
        if inspect.isawaitable(pending := EventsWorker.drain_all()):
            await pending

    try:
        with (
            temporary_settings({PREFECT_API_URL: f"{server.url}/api"}),
            # the settings of threads that start without a context (a test's own threads), as
            # prefect_test_harness makes them: else they would start a server of their own
            prefect.context._temporary_global_settings_context(
                prefect.context.get_settings_context()
            ),
        ):
            yield f"{server.url}/api"
            run_coro_as_sync(drain())
    finally:
        server.stop()


_UNIT_SERVERS: dict[str, ServerProcess] = {}  # the real servers of the running unit of work


def _unit_server(name: str, start: Callable[[], ServerProcess], timeout: float) -> ServerProcess:
    """The server ``name`` of the unit of work running in this process, started on first use."""
    server = _UNIT_SERVERS.get(name)
    if server is None or server.process.poll() is not None:
        server = _UNIT_SERVERS[name] = _started(start(), timeout)
    return server


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the real servers of a unit of work after its last test (idle, a Prefect server
    still takes about 5% of a core)."""
    if nextitem is None or work_unit(nextitem.nodeid) != work_unit(item.nodeid):
        while _UNIT_SERVERS:
            _UNIT_SERVERS.popitem()[1].stop()


@pytest.fixture
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """``prefect server start`` on 127.0.0.1 and a free port, its own home and SQLite database
    (``Path(server.env["PREFECT_HOME"]) / "prefect.db"``); a ``ServerProcess``, one for all the
    tests of a unit of work (see ``work_unit``)."""
    from maskdiff.ops.servers import start_prefect

    home = tmp_path_factory.mktemp("prefect-server")
    return _unit_server("prefect", lambda: start_prefect(home), 180)


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """``mlflow server`` on 127.0.0.1 and a free port, over its own SQLite store; a
    ``ServerProcess``, one for all the tests of a unit of work (see ``work_unit``)."""
    from maskdiff.ops.servers import start_mlflow

    return _unit_server("mlflow", lambda: start_mlflow(tmp_path_factory.mktemp("mlflow")), 120)
