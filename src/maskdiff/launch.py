"""Start ``torchrun -m maskdiff.train`` as a child process group, stream its metrics, stop it.

A training or evaluation job (:mod:`maskdiff.jobs`) uses this when a run wants more than one
process (docs/distributed.md); nothing here imports Prefect. One node with N processes::

    python -m torch.distributed.run --standalone --nproc_per_node N -m maskdiff.train ARGS

K nodes (the same command on each, one launcher per node)::

    python -m torch.distributed.run --nnodes K --node_rank i --nproc_per_node N \
        --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id ID -m maskdiff.train ARGS

Process tree: launcher (this process) -> torchrun agent (its own session, so a signal to the
launcher's group does not reach it by accident) -> one rank per process (torchrun gives each
its own session too). Every child dies with its parent (``PR_SET_PDEATHSIG`` on Linux: the agent
here, the ranks in :func:`maskdiff.train.main`). :meth:`Launcher.stop` sends SIGTERM to the agent's
group and to every descendant found at that moment, waits, then SIGKILLs what is left.

Rank 0 prints one JSON object per metric window on stdout (``{"step": k, "loss": ...}``) and a
last one with the run's result (``{"result": true, ...}``); the launcher hands each metric line to
a callback while training runs and keeps the last lines of stderr (every rank's) for the error.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskdiff.config import RuntimeConfig
from maskdiff.worker_args import TRAIN_FLAGS, arguments

__all__ = [
    "LaunchError",
    "LaunchSpec",
    "Launcher",
    "resolve_nproc",
    "run_training",
    "set_parent_death_signal",
    "torchrun_command",
    "train_arguments",
]

MetricsHandler = Callable[[int, dict[str, float]], None]
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """The launched training failed; the message carries the failing rank's error tail."""

    def __init__(self, message: str, returncode: int | None, tail: Sequence[str]) -> None:
        super().__init__(message)
        self.returncode, self.tail = returncode, list(tail)


@dataclass(frozen=True)
class LaunchSpec:
    """How many processes, on how many nodes, meeting where."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    rdzv_id: str = "maskdiff"

    @property
    def in_process(self) -> bool:
        """One process on one node: the caller trains in its own process, no launcher."""
        return self.nproc_per_node == 1 and self.nnodes == 1

    @classmethod
    def from_runtime(cls, rt: RuntimeConfig, default_id: str = "maskdiff") -> LaunchSpec:
        return cls(resolve_nproc(rt), rt.nnodes, rt.node_rank, rt.rdzv_endpoint,
                   rt.rdzv_id or default_id)  # fmt: skip


def resolve_nproc(rt: RuntimeConfig) -> int:
    """``nproc_per_node``: the integer, or for ``auto`` the visible CUDA devices when the device
    may be cuda (1 on CPU, MPS or without a GPU)."""
    if rt.nproc_per_node != "auto":
        return int(rt.nproc_per_node)
    if rt.device not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def torchrun_command(
    spec: LaunchSpec, train_args: Sequence[str], module: str = "maskdiff.train"
) -> list[str]:
    """The command line that starts ``module`` (``maskdiff.train``; ``maskdiff.scoring`` for the
    sharded evaluation) under torchrun on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max_restarts", "0"]
    if spec.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(spec.nnodes), "--node_rank", str(spec.node_rank),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", spec.rdzv_endpoint,
                "--rdzv_id", spec.rdzv_id]  # fmt: skip
    return [*cmd, "--nproc_per_node", str(spec.nproc_per_node), "-m", module,
            *train_args]  # fmt: skip


def train_arguments(
    config: str | Path,
    blocks: str | Path,
    out: str | Path,
    *,
    vocab_size: int,
    tokenizer_hash: str = "",
    corruptions: str | Path | None = None,
    validation: str | Path | None = None,
) -> list[str]:
    """The arguments of ``python -m maskdiff.train`` for one run."""
    return arguments(TRAIN_FLAGS, config=config, blocks=blocks, out=out, vocab_size=vocab_size,
                     tokenizer_hash=tokenizer_hash, corruptions=corruptions,
                     validation=validation)  # fmt: skip


_LIBC: list[Any] = []


def _prctl() -> Any:
    """libc's ``prctl``, loaded once (before a fork: the child only calls it)."""
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True).prctl)
    return _LIBC[0]


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when the thread that started it exits (no-op
    elsewhere). Exits at once when that parent is already gone (re-parented to init)."""
    if not sys.platform.startswith("linux"):
        return
    if _prctl()(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() == 1:
        os._exit(128 + int(sig))


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").glob("[0-9]*/stat") if Path("/proc").is_dir() else []:
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(entry.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its new parent) counts as gone
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _agent_line(line: str) -> bool:
    """A line torchrun's agent writes on every launch (its banner, its glog-style warnings) or
    an empty one: not a rank's own words."""
    text = line.strip()
    return (
        not text
        or text.startswith(("*****", "Setting OMP_NUM_THREADS"))
        or re.match(r"[IWE]\d{4} \d", text) is not None
    )


class Launcher:
    """One launch: :meth:`start`, then :meth:`wait` (streams metrics), :meth:`stop` any time."""

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        tail_lines: int = 100,
        what: str = "training",
    ) -> None:
        self.command, self.what = list(command), what
        self.env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.stdout_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.result: dict[str, Any] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        linux = sys.platform.startswith("linux")
        if linux:
            _prctl()
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=set_parent_death_signal if linux else None,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(raw.decode(errors="replace").rstrip("\n"))

    def request_stop(self) -> None:
        """Ask :meth:`wait` (in another thread) to stop the launch; safe from any thread."""
        self._stop.set()

    def _handle(self, line: str, on_metrics: MetricsHandler | None) -> None:
        record = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
        if not isinstance(record, dict):
            self.stdout_tail.append(line)
        elif record.get("result") is True:
            self.result = record
        elif "step" in record and on_metrics is not None:
            step = int(record.pop("step"))
            on_metrics(step, {k: float(v) for k, v in record.items()})

    def wait(self, on_metrics: MetricsHandler | None = None) -> dict[str, Any]:
        """Stream stdout until the launch ends; the result line, or :class:`LaunchError`."""
        assert self.proc is not None and self.proc.stdout is not None
        fd, pending, quiet_since = self.proc.stdout.fileno(), b"", None
        while True:
            if self._stop.is_set():
                self.stop()
                raise LaunchError("training launch stopped on request", self.proc.returncode,
                                  self.stderr_tail)  # fmt: skip
            ready, _, _ = select.select([fd], [], [], 0.5)
            chunk = os.read(fd, 1 << 16) if ready else b""
            if ready and not chunk:
                break  # EOF: every writer is gone
            if not chunk and self.proc.poll() is not None:
                # the agent is gone but an orphan may hold the pipe: give it 5 s
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 5.0:
                    break
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                self._handle(raw.decode(errors="replace").strip(), on_metrics)
        if pending.strip():
            self._handle(pending.decode(errors="replace").strip(), on_metrics)
        code = self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        if code != 0:
            raise LaunchError(self._failure(code), code, self.stderr_tail)
        if self.result is None:
            raise LaunchError("training launch exited 0 without a result line:\n"
                              + "\n".join(self.stdout_tail), code, self.stderr_tail)  # fmt: skip
        return self.result

    def _failure(self, code: int) -> str:
        """The failing rank's part of torchrun's summary (its traceback, recorded by
        ``@record``), else the last lines of stderr. A rank killed by a signal (an abort in
        native code, the OOM killer) records no traceback: what was printed last before the
        agent's report follows the summary (a C++ exception's ``what()``, a fatal error)."""
        lines = list(self.stderr_tail)
        marks = [i for i, x in enumerate(lines) if "Root Cause" in x]
        part = lines[marks[-1]:] if marks else lines[-40:]  # fmt: skip
        ranks = [x.split(":", 1)[1].strip() for x in part if x.strip().startswith("rank ")]
        body = [x for x in part if x.strip() and not x.startswith("=")]
        head = f"rank {ranks[0]}: {body[-1].strip()}" if ranks and body else "see below"
        text = "\n".join(part[-60:])
        if marks and any("traceback" in x and "Signal" in x for x in part):
            report = next((i for i, x in enumerate(lines) if "failed (exitcode" in x), marks[-1])
            last = [x for x in lines[max(0, report - 12) : report] if not _agent_line(x)]
            if last:
                text += "\nstderr before torchrun's report:\n" + "\n".join(last)
        return f"{self.what} launch failed (exit status {code}), {head}\n{text}"

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM to the launch's group and every descendant, SIGKILL after ``grace`` s.
        Returns the launcher's exit status."""
        proc = self.proc
        if proc is None:
            return None
        pids = [p for p in _descendants(proc.pid) if p != os.getpid()]
        self._signal(proc, pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not any(_alive(p) for p in pids):
                break
            time.sleep(0.1)
        else:
            self._signal(proc, [*pids, *_descendants(proc.pid)], signal.SIGKILL)
        return proc.wait()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], pids: list[int], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """In the main thread, make a default-handled SIGTERM raise ``SystemExit(143)`` for the
    duration (so the launch is stopped before this process ends). A handler someone else
    installed (Prefect's raises ``TerminationSignal``) is left alone; SIGINT already raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.getsignal(signal.SIGTERM)
    mine = previous == signal.SIG_DFL
    if mine:
        signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGTERM, previous)


def run_training(
    command: Sequence[str],
    on_metrics: MetricsHandler | None = None,
    env: dict[str, str] | None = None,
    grace: float = 20.0,
    on_start: Callable[[Launcher], None] | None = None,
    what: str = "training",
) -> dict[str, Any]:
    """Launch, stream metrics to ``on_metrics`` in this thread, return rank 0's result line.

    Any exception here (a signal's, a callback's, a failed rank's) stops every process of the
    launch before it propagates. ``on_start`` sees the started :class:`Launcher`; ``what`` names
    the job in a failure's message.
    """
    launcher = Launcher(command, env, what=what)
    with _terminate_raises():
        launcher.start()
        try:
            if on_start is not None:
                on_start(launcher)
            return launcher.wait(on_metrics)
        except BaseException:
            launcher.stop(grace)
            raise
