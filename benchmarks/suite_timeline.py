"""Where the wall time of a whole ``make test`` went, worker by worker, and the per-file seconds
that order the units of work (tests/unit_seconds.json; see tests/conftest.py).

    MASKDIFF_TEST_TIMELINE=/tmp/timeline.jsonl make test
    .venv/bin/python benchmarks/suite_timeline.py /tmp/timeline.jsonl
    .venv/bin/python benchmarks/suite_timeline.py /tmp/timeline.jsonl \
        --write tests/unit_seconds.json

Prints each worker's files in the order it ran them (start and length, seconds from the first
test), when each worker ran out of work, and the tail: how long the run went on after the first
worker had nothing left (on 2 cores, time the machine is not fully used); then the CPU seconds per
file and per test, the workers' own and their child processes' (commands, servers, ranks).
``--write`` stores the seconds of each file (setup to teardown of its tests, summed) for the next
runs' order.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        raise SystemExit(f"{path}: no test recorded (MASKDIFF_TEST_TIMELINE unset for the run?)")
    return rows


def file_of(test: str) -> str:
    return Path(test.split("::", 1)[0]).name


def print_cpu(rows: list[dict[str, object]], top: int = 25) -> None:
    """CPU seconds per file and the costliest tests: the worker's own, and its child processes'
    (those that ended and were waited for within the test; a server shared by a unit of work
    counts in the test after which it stops, the session's Prefect server in the worker's last
    test)."""

    def cpu(r: dict[str, object]) -> tuple[float, float]:
        return float(r["cpu"]), float(r["children_cpu"])  # type: ignore[arg-type]

    own = sum(cpu(r)[0] for r in rows)
    children = sum(cpu(r)[1] for r in rows)
    print(f"\nCPU within the tests: {own + children:.0f} s ({own:.0f} s in the workers, "
          f"{children:.0f} s in their child processes)")  # fmt: skip
    per_file: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        mine, theirs = cpu(r)
        sums = per_file[file_of(str(r["test"]))]
        sums[0] += mine
        sums[1] += theirs
    print("CPU seconds per file (worker + children):")
    for name, (mine, theirs) in sorted(per_file.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"    {mine + theirs:6.0f}  = {mine:5.0f} + {theirs:5.0f}  {name}")
    print("CPU seconds per test (worker + children):")
    for r in sorted(rows, key=lambda r: -sum(cpu(r)))[:top]:
        print(f"    {sum(cpu(r)):6.1f}  {r['test']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timeline", type=Path)
    parser.add_argument("--write", type=Path, help="write the seconds per file here (JSON)")
    parser.add_argument("--label", help="where the timeline came from (default: its file name)")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="list longer stretches")
    args = parser.parse_args()
    rows = load(args.timeline)
    t0 = min(float(r["start"]) for r in rows)
    per_file: dict[str, float] = defaultdict(float)
    by_worker: dict[str, list[dict[str, object]]] = defaultdict(list)
    for r in rows:
        per_file[file_of(str(r["test"]))] += float(r["end"]) - float(r["start"])
        by_worker[str(r["worker"])].append(r)

    ends = {}
    for worker, tests in sorted(by_worker.items()):
        tests.sort(key=lambda r: float(r["start"]))
        ends[worker] = float(tests[-1]["end"]) - t0
        busy = sum(float(r["end"]) - float(r["start"]) for r in tests)
        print(
            f"{worker}: {len(tests)} tests, busy {busy:.0f} s, out of work at {ends[worker]:.0f} s"
        )
        names: list[str] = []  # consecutive tests of one file, with their first start, last end
        spans: list[list[float]] = []
        for r in tests:
            name, start, end = file_of(str(r["test"])), float(r["start"]), float(r["end"])
            if names and names[-1] == name:
                spans[-1][1] = end
            else:
                names.append(name)
                spans.append([start, end])
        for name, (start, end) in zip(names, spans, strict=True):
            if end - start >= args.min_seconds:
                print(f"    {start - t0:6.0f} {end - start:6.0f} s  {name}")
    makespan = max(ends.values())
    print(f"\n{len(rows)} tests; the last worker ran out of work at {makespan:.0f} s, the first at "
          f"{min(ends.values()):.0f} s (tail {makespan - min(ends.values()):.0f} s)")  # fmt: skip
    print("\nseconds per file (longest first):")
    for name, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])[:25]:
        print(f"    {seconds:6.0f}  {name}")
    if all("cpu" in r for r in rows):
        print_cpu(rows)
    if args.write:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
        body = {
            "measured": f"{args.label or args.timeline.name}: {len(rows)} tests, started {stamp}, "
            f"last worker done at {makespan:.0f} s",
            "seconds": {k: round(v) for k, v in sorted(per_file.items(), key=lambda kv: -kv[1])},
        }
        args.write.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
