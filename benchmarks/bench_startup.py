"""What a command costs before it does any work: CPU seconds of a fresh process, two ways each.

1. Imports: ``import flows.pipeline`` (torch, Prefect, MLflow's first pieces, pandera: what
   ``maskdiff run`` loads) with the cyclic collector running, as Python starts, against the same
   import under :func:`maskdiff.ops.processes.paused_gc`, as the commands do it.
2. The Prefect database check: ``flows.stores.prepare_local_prefect_database`` on a migrated
   database without its ``.prepared.json`` marker (the migration check and block registration,
   with the import of Prefect's server modules they need), against the same call once the
   marker is there.

3. A tiny flow on a temporary Prefect server, the database prepared: the server Prefect starts
   itself on its first API call (it imports its server application into the command to do so)
   against the one the command starts (:func:`flows.stores.start_temporary_server`, as
   ``maskdiff run`` does now). CPU here includes the server's, a child of the command; the
   wall time is printed too, since the command's own server boots while the command imports.
4. ``prefect server start`` (:func:`maskdiff.ops.servers.start_prefect`, as ``maskdiff ui``
   starts it) on the prepared database until it answers: without the marker (the server checks
   the schema and registers the block types as it starts) against with it (it skips both).

Each figure is the CPU time (user + system) of its own ``python -c`` process and its children,
the two sides alternated ``--repeats`` times; the lowest of each side counts (a shared machine
only ever adds), the median is printed beside it. Prints figures and ratios, asserts nothing.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT_PLAIN = "import flows.pipeline"
IMPORT_PAUSED = """
from maskdiff.ops.processes import paused_gc
with paused_gc():
    import flows.pipeline
"""
# PREFECT_HOME and the database are set in the environment; argv[1]: "unmarked" removes the
# marker first (the check runs in full), "marked" leaves it (the check is skipped)
PREPARE = """
import sys
from pathlib import Path
import prefect.settings
from flows.stores import prepare_local_prefect_database
marker = Path(prefect.settings.get_current_settings().home) / ".prepared.json"
if sys.argv[1] == "unmarked":
    marker.unlink(missing_ok=True)
prepare_local_prefect_database()
assert marker.is_file()
"""

TINY_FLOW = """
from prefect import flow

@flow(name="tiny")
def tiny():
    return 1

assert tiny() == 1
"""
# the server Prefect starts itself, on the flow's first API call
PREFECT_SERVER = (
    """
from flows.stores import prepare_local_prefect_database
prepare_local_prefect_database()
"""
    + TINY_FLOW
)
# the command's own, as `maskdiff run` starts it
OWN_SERVER = (
    """
from flows.stores import prepare_local_prefect_database, start_temporary_server
from flows.stores import wait_for_temporary_server
server = start_temporary_server(prepare_local_prefect_database())
import prefect
wait_for_temporary_server(server)
"""
    + TINY_FLOW
)
# argv[1]: "unmarked" or "marked" as for PREPARE (the marker put back from the saved copy);
# argv[2]: the Prefect home
SERVER_START = """
import shutil, sys
from pathlib import Path
from maskdiff.ops.servers import start_prefect
home = Path(sys.argv[2])
if sys.argv[1] == "unmarked":
    (home / ".prepared.json").unlink(missing_ok=True)
else:
    shutil.copy(home / "prepared.saved", home / ".prepared.json")
server = start_prefect(home)
try:
    server.wait_ready(300)
finally:
    server.stop()
"""


def cpu_seconds(
    code: str, *args: str, env: dict[str, str], python: str = sys.executable
) -> tuple[float, float]:
    """CPU seconds (user + system, children included) and wall seconds of ``python -c code
    args`` run to completion (its output to ours)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([python, "-c", code, *args], env=env, cwd=REPO, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def compare(
    name: str, slow: tuple, fast: tuple, repeats: int, env: dict[str, str], wall: bool = False
) -> None:
    a, b = [], []
    for _ in range(repeats):
        a.append(cpu_seconds(*slow, env=env))
        b.append(cpu_seconds(*fast, env=env))
    print(f"{name}")
    for i, what in enumerate(("CPU", "wall") if wall else ("CPU",)):
        x, y = [r[i] for r in a], [r[i] for r in b]
        print(f"  before: {min(x):.2f} s {what} (median {statistics.median(x):.2f})")
        print(f"  after:  {min(y):.2f} s {what} (median {statistics.median(y):.2f})")
        medians = statistics.median(y) / statistics.median(x)
        print(f"  after / before, {what}: {min(y) / min(x):.3f} (medians {medians:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        home = Path(tmp) / "prefect"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
                   PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
                   MASKDIFF_STORE_TEMPLATES="off", TOKENIZERS_PARALLELISM="false")  # fmt: skip
        env.pop("PREFECT_API_URL", None)
        cpu_seconds(PREPARE, "unmarked", env=env)  # the database, migrated once, not timed
        compare("imports of `maskdiff run` (import flows.pipeline)",
                (IMPORT_PLAIN,), (IMPORT_PAUSED,), args.repeats, env)  # fmt: skip
        compare("Prefect database check (prepare_local_prefect_database, migrated database)",
                (PREPARE, "unmarked"), (PREPARE, "marked"), args.repeats, env)  # fmt: skip
        compare("a tiny flow on a temporary server: Prefect's own, then the command's own",
                (PREFECT_SERVER,), (OWN_SERVER,), args.repeats, env, wall=True)  # fmt: skip
        shutil.copy(home / ".prepared.json", home / "prepared.saved")
        compare("`prefect server start` until it answers, on the prepared database",
                (SERVER_START, "unmarked", str(home)), (SERVER_START, "marked", str(home)),
                args.repeats, env, wall=True)  # fmt: skip


if __name__ == "__main__":
    main()
