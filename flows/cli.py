"""The ``maskdiff`` command: ``run``, ``sweep``, ``compare``, ``serve``, ``ui`` and ``sample``.

Stores default to the run root (``data.root``, ``runs/``): Prefect's home and SQLite database in
``runs/prefect``, MLflow's in ``runs/mlflow.db`` with artifacts in ``runs/mlartifacts``. They are
set before Prefect is imported, and never override what the environment already says (a
``PREFECT_API_URL`` of a running server, an ``MLFLOW_TRACKING_URI``).

A failure ends on one line, ``maskdiff: <error>``, exit status 1. A config error is reported
before Prefect is imported. A failed run keeps its tracebacks in the Prefect logs (and on screen
with ``--debug``); the terminal shows Prefect's log lines without them.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from flows.stores import (
    TEMPORARY_SERVERS,
    named_prefect_api,
    prepare_local_prefect_database,
    start_temporary_server,
    use_project_stores,
    wait_for_temporary_server,
)
from maskdiff.config import Config, ConfigError, load_config
from maskdiff.ops.processes import (
    SIGNALS,
    Interrupts,
    SignalInterrupt,
    descendants,
    exit_status,
    interrupt_on_signals,
    paused_gc,
    stop_processes,
)
from maskdiff.ops.servers import MLFLOW_UI_PORT, PREFECT_UI_PORT, project_prefect_home

STAGES = ("data", "train", "evaluate", "all")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set or [])


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, leaving out its traceback and stack."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:  # the record goes on to other handlers (the API's) as it came
            record.exc_info, record.exc_text, record.stack_info = saved


@contextmanager
def console_without_tracebacks(debug: bool) -> Iterator[None]:
    """Unless ``debug``, Prefect's console handlers print log lines without their tracebacks.

    The API handler (the flow run's logs in the Prefect UI) still receives them whole.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *map(logging.getLogger, ("prefect", "uvicorn", "fastapi"))]
    handlers = {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}
    saved = {h: h.formatter for h in handlers}
    if not debug:
        for handler in handlers:
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
    try:
        yield
    finally:
        for handler, formatter in saved.items():
            handler.setFormatter(formatter)


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()  # the closing table's total: imports and server start too
    cfg = _load(args)  # before Prefect is imported: a config error starts nothing
    use_project_stores(cfg)
    os.environ["MASKDIFF_PROGRESS"] = "0" if args.no_progress else "1"
    with paused_gc():  # the run's libraries: Prefect, torch, pandera...
        server = start_temporary_server(prepare_local_prefect_database())
        from flows.pipeline import pipeline
    wait_for_temporary_server(server)

    with console_without_tracebacks(args.debug):
        try:
            state = pipeline(config=cfg, stage=args.stage, return_state=True)
            regressed = state.is_failed() and state.name == "Regressed"
            summary = state.result(raise_on_failure=not regressed)
        except Exception:
            # Prefect's "Stopping temporary server", logged at exit, would follow the message
            logging.getLogger("prefect").setLevel(logging.WARNING)
            raise
    elapsed = time.perf_counter() - started
    _print_summary(summary, elapsed, cfg)
    print(summary["summary_path"])
    if regressed:
        logging.getLogger("prefect").setLevel(logging.WARNING)
        raise SystemExit(f"maskdiff: regression: {state.message}")
    return 0


def _print_summary(summary: dict, elapsed: float, cfg: Config) -> None:
    from tasks.overview import models_table, timings_table

    print(f"\nmaskdiff: pipeline finished in {elapsed:.0f} s\n", file=sys.stderr)
    for scores in summary.get("evaluation", {}).get("scores", {}).values():
        print(scores["table"], file=sys.stderr)
    table = models_table(summary)
    if table:
        print(table + "\n", file=sys.stderr)
    print(timings_table(summary, elapsed) + "\n", file=sys.stderr)
    reg = summary.get("registry") or {}
    if reg.get("registered"):
        state = "moved to this version" if reg["champion"] else "kept"
        print(f"model {reg['model']} v{reg['version']}; champion {state}", file=sys.stderr)
    if api := named_prefect_api():
        prefect_where = f"the Prefect server at {api}"
    else:
        prefect_where = f"Prefect's database in {os.environ.get('PREFECT_HOME')}"
    mlflow_where = summary.get("mlflow_tracking_uri", "no MLflow store (tracking.enabled=false)")
    print(
        f"\nThis run is in {prefect_where} and in MLflow at {mlflow_where}.\n"
        "Open both UIs on it:\n"
        f"  .venv/bin/maskdiff ui --config {cfg.name}   "
        f"(Prefect http://127.0.0.1:{PREFECT_UI_PORT}, MLflow http://127.0.0.1:{MLFLOW_UI_PORT})",
        file=sys.stderr,
    )
    for what, key in (("run", "mlflow_run_url"), ("experiment", "mlflow_experiment_url")):
        if summary.get(key):
            print(f"  the MLflow {what}: {summary[key]}", file=sys.stderr)
    if summary.get("prefect_flow_run_url"):
        print(f"  the Prefect flow run: {summary['prefect_flow_run_url']}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    root = use_project_stores(cfg)
    with paused_gc():
        server = start_temporary_server(prepare_local_prefect_database())
        from flows.deploy import serve_deployments
        from flows.orphans import sweep_orphans
    wait_for_temporary_server(server)

    sweep_orphans(cfg, root, logging.getLogger("maskdiff.serve"))
    signum = serve_deployments(args.config, args.set or [], cfg)
    if signum is not None:  # stopped gracefully: flow runs cancelled, schedules paused
        raise SignalInterrupt(signum)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from maskdiff.ops.servers import mlflow_experiment_url, start_mlflow, start_prefect

    cfg = _load(args)
    root = Path(cfg.data.root).resolve()
    prefect = start_prefect(project_prefect_home(root), args.prefect_port, args.host)
    mlflow = start_mlflow(root, args.mlflow_port, args.host)
    try:
        mlflow.wait_ready()
        prefect.wait_ready()
        print(f"Prefect UI: {prefect.url}\nMLflow UI:  {mlflow.url}")
        experiment = mlflow_experiment_url(mlflow.url, cfg.tracking.experiment)
        if experiment:
            print(f"The experiment {cfg.tracking.experiment!r}: {experiment}")
        print(f"To send runs to this Prefect server: export PREFECT_API_URL={prefect.url}/api")
        print("Ctrl-C stops both.", flush=True)
        # Blocked (in this thread, after the servers started: children inherit a mask), so that
        # sigwait takes them: an unblocked SIGTERM would end this process and skip the `finally`,
        # leaving both servers running.
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signum = signal.sigwait(stop)
    finally:  # a signal before the wait (servers starting) interrupts, and lands here too
        prefect.stop()
        mlflow.stop()
    print(f"maskdiff: stopped by {signal.Signals(signum).name}; both servers stopped", flush=True)
    return 0


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of ``module``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(args))

    return run


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--debug", action="store_true", help="print tracebacks (Prefect's and the error's)"
    )


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default", help="preset name in conf/ or a YAML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override")
    _add_debug(p)


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run the pipeline (or one --stage) and write run_summary.json")
    _add_config(run)
    run.add_argument(
        "--stage",
        choices=STAGES,
        default="all",
        help="run up to this stage; 'all' also registers the model (default)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)


def _add_sweep(sub: Any) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="run the pipeline over a grid of settings and compare the points (paired)",
        description="One parent flow run over the cartesian product of the grid: data stages "
        "built once, points as child runs (sweep.max_concurrent at once), a comparison table "
        "with paired standard errors. Started again, it reruns only the points that failed.",
    )
    _add_config(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a grid axis; repeat for more (values as --set parses them)",
    )
    sweep.add_argument(
        "--baseline",
        metavar="KEY=VALUE",
        help="the point the others are compared with (default: the first)",
    )
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.set_defaults(func=_lazy("flows.cli_team", "cmd_sweep"))


def _add_compare(sub: Any) -> None:
    cmp = sub.add_parser(
        "compare",
        help="compare finished MLflow runs: bounds ± SE, paired differences against the first",
    )
    _add_config(cmp)
    cmp.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    cmp.add_argument("--baseline", metavar="RUN_ID", help="default: the first run")
    cmp.add_argument("--split", help="the split to compare (default: the champion metric's)")
    cmp.set_defaults(func=_lazy("flows.cli_team", "cmd_compare"))


def _add_servers(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve the deployments, the nightly schedule included")
    _add_config(serve)
    serve.set_defaults(func=cmd_serve)

    ui = sub.add_parser("ui", help="start the Prefect and MLflow servers on the project stores")
    _add_config(ui)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--prefect-port", type=int, default=PREFECT_UI_PORT)
    ui.add_argument("--mlflow-port", type=int, default=MLFLOW_UI_PORT)
    ui.set_defaults(func=cmd_ui)


def _add_sample(sub: Any) -> None:
    sample = sub.add_parser(
        "sample",
        help="fill infill templates or sample text, from an MLflow model URI or a checkpoint",
        description="Fill the gaps of templates ([MASK] one unknown token, [MASK:N] N of them), "
        "or continue a prefix, or sample unconditionally. Filled gaps are highlighted on a "
        "terminal and [[bracketed]] otherwise; each text ends with a line of dashes.",
    )
    sample.add_argument("--model", required=True, help="models:/name@champion, runs:/..., or .pt")
    sample.add_argument("--tokenizer", help="tokenizer stage folder (with a checkpoint file)")
    sample.add_argument(  # both into one list, in the order given: (is_file, text or path)
        "--infill",
        action="append",
        dest="templates",
        type=lambda text: (False, text),
        metavar="TEMPLATE",
        help="a template to fill; repeat for more",
    )
    sample.add_argument(
        "--infill-file",
        action="append",
        dest="templates",
        type=lambda path: (True, path),
        metavar="FILE",
        help="a UTF-8 file holding one template (it may span lines; its last "
        "line break is dropped); repeat for more",
    )
    sample.add_argument("--prefix", default=None, help="continue this text (no templates)")
    sample.add_argument(
        "--n",
        type=int,
        default=None,
        help="draws of each template or prefix (1 with templates, else 4)",
    )
    sample.add_argument(
        "--length",
        type=int,
        default=None,
        help="tokens of a prefix's continuation (default: the block length; "
        "longer is decoded semi-autoregressively)",
    )
    sample.add_argument("--sampler", choices=("ancestral", "confidence", "remask"), default=None)
    sample.add_argument("--steps", type=int, default=None)
    sample.add_argument("--top-p", type=float, default=None)
    sample.add_argument("--seed", type=int, default=None)
    _add_debug(sample)
    sample.set_defaults(func=_lazy("flows.cli_sample", "cmd_sample"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_sweep, _add_compare, _add_servers, _add_sample):
        add(sub)
    return parser


def one_line(exc: BaseException) -> str:
    """``maskdiff: <error>`` on one line: ``config error: ...`` for a config, the exception's
    type and message otherwise (a message of several lines joined with "; ")."""
    if isinstance(exc, ConfigError):
        text = f"config error: {exc}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return "maskdiff: " + "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _temporary_prefect_servers() -> set[int]:
    """PIDs of the temporary Prefect servers this process started (and their children): its
    own (:func:`flows.stores.start_temporary_server`) and any Prefect started itself.

    They are stopped at exit, after Prefect's last API calls (the flow run's final state and
    logs); the sweep after a signal leaves them to that, and the sweep at exit takes what is left.
    """
    module = sys.modules.get("prefect.server.api.server")
    servers = getattr(getattr(module, "SubprocessASGIServer", None), "_instances", {})
    processes = [getattr(server, "server_process", None) for server in list(servers.values())]
    processes += [server.process for server in TEMPORARY_SERVERS]
    pids = set()
    for process in processes:
        if process is not None:
            pids |= {process.pid, *(p.pid for p in descendants(process.pid))}
    return pids


def _workers() -> list[psutil.Process]:
    """This process's descendants but the temporary Prefect servers."""
    spared = _temporary_prefect_servers()
    return [p for p in descendants() if p.pid not in spared]


def _forward(signum: int) -> None:
    """Pass the first signal on to worker processes (a process pool's, a launcher's), as SIGTERM:
    otherwise the pool's shutdown waits for their tasks before the main thread can stop them."""
    for proc in _workers():
        with suppress(psutil.Error):
            proc.terminate()


def _stopped(signum: int) -> int:
    """After a signal: stop every child left (further signals ignored until done), one line."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    left = stop_processes(_workers())
    # Prefect's "Stopping temporary server", logged at exit, would follow the message
    logging.getLogger("prefect").setLevel(logging.WARNING)
    name = signal.Signals(signum).name
    note = f"; still running: {sorted(p.pid for p in left)}" if left else ""
    sys.stdout.flush()
    print(f"maskdiff: stopped by {name}{note}", file=sys.stderr, flush=True)
    return exit_status(signum)


def _sweep_at_exit(interrupts: Interrupts) -> None:
    """At exit after a signal: what outlived Prefect's own cleanup (its temporary server)."""
    if interrupts.received:
        stop_processes(descendants())


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure exits with :func:`one_line` as the last line on stderr and
    status 1 (``SystemExit`` with the message, which the interpreter prints).

    ``run``, ``serve`` and ``ui`` take SIGINT and SIGTERM alike: the signal interrupts the main
    thread (``finally`` blocks run: the MLflow run is closed KILLED, Prefect marks the flow run),
    every child process still running is stopped, and the command ends with ``maskdiff: stopped
    by SIG...`` and status 128 + the signal's number (``ui``, which only a signal ends, with 0).
    """
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    stoppable = args.command in ("run", "sweep", "serve", "ui")
    with interrupt_on_signals(_forward if stoppable else None) as interrupts:
        if stoppable:  # registered before Prefect's own exit handlers: runs after them
            atexit.register(_sweep_at_exit, interrupts)
        try:
            return int(args.func(args))
        except BaseException as exc:
            if stoppable and (interrupts.received or isinstance(exc, KeyboardInterrupt)):
                signum = interrupts.first or getattr(exc, "signum", signal.SIGINT)
                return _stopped(signum)
            if not isinstance(exc, Exception):
                raise
            ours = type(exc).__module__.split(".")[0] == "maskdiff"  # raised on purpose
            if debug:
                traceback.print_exception(exc)
            elif not ours:
                print("maskdiff: --debug prints the traceback (a failed run keeps it in its "
                      "Prefect logs too)", file=sys.stderr)  # fmt: skip
            sys.stdout.flush()
            sys.stderr.flush()
            raise SystemExit(one_line(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
