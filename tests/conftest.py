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
* the units holding e2e tests are handed out first, then those with slow tests, then those with
  server tests, then the rest (and among them, the most such tests first): a long one does not
  start last while the other workers idle;
* a test that uses a server fixture is marked ``server`` (``make test-fast`` leaves it out).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from maskdiff.ops.servers import ServerProcess

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
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

SERVER_FIXTURES = {"prefect_harness", "prefect_server", "mlflow_server"}
HEAVY_MARKS = ("e2e", "slow", "server")  # the order their units are handed out in
# Files that share a unit of work (one worker): the real servers they use start once. Not
# test_signals.py (prefect_server), nor the files of prefect_harness (test_cli_errors.py,
# test_dask.py, test_flows.py; the harness lives for the session of each worker that uses it):
# they are long enough to balance better alone.
SHARED_UNITS = {
    "test_e2e.py": "real servers",  # prefect_server, mlflow_server
    "test_launch_cancel.py": "real servers",  # prefect_server
    "test_tracking.py": "real servers",  # mlflow_server
}


def work_unit(nodeid: str) -> str:
    """The unit of work of a test under ``--dist loadfile``: its file, or the files' shared
    unit. (``--dist loadgroup`` with ``xdist_group`` marks would say the same, but pytest 9.2's
    structured node ids break it: pytest-dev/pytest-xdist#1386.)"""
    path = nodeid.split("::", 1)[0]
    return SHARED_UNITS.get(Path(path).name, path)


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

    return SharedFileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``server`` the tests using a server fixture; under xdist, order the units of work:
    those with e2e tests first, then slow, then server, then the rest, and within each the one
    with the most such tests first (a long unit must not start last while the other workers
    idle). The workers send this order to the scheduler."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # not under xdist: the order of the files
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(work_unit(item.nodeid), []).append(item)

    def rank(unit: list[pytest.Item]) -> tuple[int, int]:  # then the most heavy tests first
        marks = [{m for m in HEAVY_MARKS if item.get_closest_marker(m)} for item in unit]
        first = min((HEAVY_MARKS.index(m) for found in marks for m in found), default=9)
        return first, -sum(map(bool, marks))

    items[:] = [item for unit in sorted(units.values(), key=rank) for item in unit]


def _started(server: ServerProcess, timeout: float) -> ServerProcess:
    """``server`` once it answers; stopped if it does not."""
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """Prefect's test harness (a temporary API server and SQLite database) for the flows run in
    this process; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


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
