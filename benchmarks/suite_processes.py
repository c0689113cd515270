"""Every process a command starts, and the CPU each one used: what a whole ``make test`` spends
its CPU on, server and killed processes included (Linux, from /proc).

    .venv/bin/python benchmarks/suite_processes.py --out /tmp/procs.jsonl -- make test
    .venv/bin/python benchmarks/suite_processes.py --report /tmp/procs.jsonl

``--out`` runs the command and, every ``--interval`` seconds while it runs, reads /proc: each
process descended from it (its parent seen as one when first sighted), with its command line, the
test it was started in (``PYTEST_CURRENT_TEST`` in its environment) and its user + system CPU
seconds at the last sighting. The command's exit status is this script's.

benchmarks/suite_timeline.py counts, per test, the CPU of the child processes that ended and were
waited for within the test: a server shared by several tests counts in the one after which it
stops, and a process whose parent was killed outright (reaped by init) in none. This one sees
them all, save what a process does in its last interval and the processes shorter than one. The
report prints the command's own count of its waited-for descendants' CPU beside the sampled
total, a measure of what sampling missed (not the same set: that count leaves out the processes
reaped by init). Reading /proc costs CPU too, which the report prints: 3.9 s over a 6-minute
``make test`` here (2026-12-06), about 1% of one core at the default interval.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def read_proc(pid: int) -> tuple[int, int, float] | None:
    """(parent PID, start time in ticks since boot, user + system CPU seconds) of ``pid``; None
    once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICK


def _argv_and_test(pid: int) -> tuple[list[str], str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return [], ""
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    test = next((e.split(b"=", 1)[1].decode(errors="replace") for e in env
                 if e.startswith(b"PYTEST_CURRENT_TEST=")), "")  # fmt: skip
    return argv, test.rsplit(" (", 1)[0]  # "tests/x.py::test_y (call)": the test alone


def record(command: list[str], out: Path, interval: float) -> int:
    """Run ``command``, sampling its descendants every ``interval`` s; write them to ``out``
    (one JSON line each) and return the command's exit status."""
    proc = subprocess.Popen(command)
    ours: set[int] = {proc.pid}
    seen: dict[tuple[int, int], dict[str, object]] = {}
    started = time.time()

    def sample() -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            info = read_proc(pid)
            if info is None:
                continue
            ppid, start, cpu = info
            key = (pid, start)
            if key not in seen:
                if pid != proc.pid and ppid not in ours:
                    continue
                # a child found before its parent in this listing is caught on the next pass
                argv, test = _argv_and_test(pid)
                seen[key] = {"pid": pid, "ppid": ppid, "argv": argv, "test": test,
                             "first": round(time.time() - started, 2)}  # fmt: skip
                ours.add(pid)
            seen[key]["cpu"] = cpu
            seen[key]["last"] = round(time.time() - started, 2)

    try:
        while proc.poll() is None:
            sample()
            time.sleep(interval)
    except KeyboardInterrupt:  # Ctrl-C reaches the command too: what was seen is still written
        proc.wait()
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"summary": True, "command": command, "returncode": proc.returncode,
               "wall": round(time.time() - started, 1),
               "waited_cpu": round(waited.ru_utime + waited.ru_stime, 1),
               "sampler_cpu": round(mine.ru_utime + mine.ru_stime, 1)}  # fmt: skip
    with open(out, "w", encoding="utf-8") as fh:
        for row in [*seen.values(), summary]:
            fh.write(json.dumps(row) + "\n")
    return proc.returncode


def is_python(argv: list[str]) -> bool:
    return bool(argv) and re.fullmatch(r"python[\d.]*", Path(argv[0]).name) is not None


def kind(argv: list[str]) -> str:
    """A short name for what a process runs: ``python -m flows.cli run``, ``prefect server``,
    ``python gpu_check.py``, ``python -c`` (with the first statement that is not an import),
    or the program's name (``g++``, ``postgres``)."""
    if not argv:
        return "?"
    if not is_python(argv):
        return Path(argv[0]).name
    args = argv[1:]
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
        args = args[2:] if args[0] in ("-X", "-W") else args[1:]  # interpreter flags
    if not args:
        return "python"
    if args[0] == "-m":
        module = args[1] if len(args) > 1 else "?"
        sub = [a for a in args[2:3] if not a.startswith("-")]
        return " ".join(["python -m", module, *sub])
    if args[0] == "-c":
        code = args[1] if len(args) > 1 else ""
        lines = [ln.strip() for ln in code.replace(";", "\n").splitlines() if ln.strip()]
        body = [ln for ln in lines if not ln.startswith(("import ", "from "))]
        return "python -c " + (body[0] if body else lines[0] if lines else "")[:40]
    script = Path(args[0]).name
    sub = [a for a in args[1:2] if not a.startswith("-") and "/" not in a]
    if script in ("prefect", "mlflow", "uvicorn", "torchrun", "pytest"):  # console scripts
        return " ".join([script, *sub])
    return " ".join(["python", script, *sub])


def load(path: Path) -> tuple[list[dict[str, object]], dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    summary = next((r for r in rows if r.get("summary")), {})
    return [r for r in rows if not r.get("summary")], summary


def sums(rows: Iterable[dict[str, object]], key: str) -> list[tuple[str, int, float]]:
    """(name, processes, CPU seconds) per value of ``key`` (``kind`` or ``test``), costliest
    first."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for row in rows:
        name = kind(row["argv"]) if key == "kind" else str(row.get("test") or "(no test)")  # type: ignore[arg-type]
        acc[name][0] += 1
        acc[name][1] += float(row["cpu"])  # type: ignore[arg-type]
    return sorted(((k, int(n), c) for k, (n, c) in acc.items()), key=lambda t: -t[2])


def report(path: Path, top: int) -> None:
    rows, summary = load(path)
    python = [r for r in rows if is_python(r["argv"])]  # type: ignore[arg-type]
    total = sum(float(r["cpu"]) for r in rows)  # type: ignore[arg-type]
    py_cpu = sum(float(r["cpu"]) for r in python)  # type: ignore[arg-type]
    if summary:
        command = " ".join(summary["command"])  # type: ignore[arg-type]
        print(f"{command}: exit {summary['returncode']}, {summary['wall']} s; its waited-for "
              f"processes' CPU {summary['waited_cpu']} s; the sampling's own "
              f"{summary['sampler_cpu']} s")  # fmt: skip
    print(f"{len(rows)} processes sampled, {total:.0f} s of CPU; {len(python)} of them Python, "
          f"{py_cpu:.0f} s ({py_cpu / max(len(python), 1):.1f} s each on average)")  # fmt: skip
    for key in ("kind", "test"):
        print(f"\nCPU seconds per {key} (processes, seconds, mean):")
        for name, n, cpu in sums(rows, key)[:top]:
            print(f"    {n:4d} {cpu:7.1f} {cpu / n:5.1f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="run the command after --, recording here")
    parser.add_argument("--report", type=Path, help="print what a recording holds")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.out:
        if not command:
            parser.error("--out needs a command after --")
        status = record(command, args.out, args.interval)
        report(args.out, args.top)
        return status
    if args.report:
        report(args.report, args.top)
        return 0
    parser.error("give --out PATH -- COMMAND, or --report PATH")
    return 2


if __name__ == "__main__":
    sys.exit(main())
