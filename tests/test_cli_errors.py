"""What ``maskdiff run`` prints for each row of the README's "What happens when ..." table.

Every failing input must end the command at once, on one last line ``maskdiff: <message>`` that
names the file, row or key, with exit status 1: no retry wait (no task ran twice, no "Retry"
line), no traceback on screen. A config error is reported before Prefect is imported.

One Prefect server serves the module (the session's ``prefect_harness``); the commands run in
this process through ``flows.cli.main`` and print to the captured terminal. One test runs the
real command line in a subprocess, with Prefect's temporary server as a user gets it.

Rows no command reaches are left to ``test_bad_input.py``: a checkpoint from another config or
with another vocabulary in a training folder (the pipeline keys its training folders by config
and blocks, so it never resumes one of another config).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, SMOKE, code_env, disk_full_after_one_shard
from mlflow import MlflowClient

from maskdiff.checkpoint import FORMAT, FORMAT_VERSION
from maskdiff.data.stage import list_shards, read_manifest

RETRY_DELAY_S = 5.0  # the first retry delay of the data tasks: no failure here may wait it


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def last_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def server(prefect_harness: str) -> str:
    """The API URL of the session's Prefect server (``prefect_harness``)."""
    return prefect_harness


@pytest.fixture
def cli(server: str, capfd: pytest.CaptureFixture[str]):
    """Run ``maskdiff <argv>`` in this process; restore the logging the command changes."""
    import logging

    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level

    def run(*argv: str) -> Outcome:
        from flows.cli import main

        capfd.readouterr()
        started = time.perf_counter()
        message = ""
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # the interpreter prints its message last, on stderr
            code, message = (
                (1, f"{exit_.code}\n") if isinstance(exit_.code, str) else (exit_.code, "")
            )
        seconds = time.perf_counter() - started
        out, err = capfd.readouterr()
        prefect_logger.setLevel(level)
        return Outcome(code, out, err + message, seconds)

    yield run
    prefect_logger.setLevel(level)


def run_args(root: Path, *overrides: str, stage: str = "data") -> list[str]:
    sets = [f"data.root={root}", "runtime.device=cpu", "tracking.system_metrics=false", *overrides]
    return ["run", "--config", str(SMOKE), "--stage", stage, "--no-progress"] + [
        arg for s in sets for arg in ("--set", s)
    ]


def task_runs_since(started: datetime) -> list[tuple[str, int, str]]:
    """(name, run_count, state) of every task run that started after ``started``."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=started))
        )
    return [(r.name, r.run_count, r.state_type.value if r.state_type else "") for r in runs]


def fails_at_once(run, argv: list[str], *named: str) -> Outcome:
    """Run a failing command; it ends on ``maskdiff: ...`` naming ``named``, without retrying."""
    started = datetime.now(timezone.utc)
    result = run(*argv)
    assert result.code == 1, result.err
    assert result.last_line.startswith("maskdiff: "), result.err
    for part in named:
        assert part in result.last_line, f"{part!r} not in the last line: {result.last_line}"
    assert "Traceback" not in result.err + result.out
    assert "Retry" not in result.err, "a data error was retried"
    runs = task_runs_since(started)
    assert all(count <= 1 for _, count, _ in runs), f"a task ran twice: {runs}"
    assert result.seconds < RETRY_DELAY_S * 4, f"took {result.seconds:.1f} s"
    return result


# ----------------------------------------------------------------------------- config


def test_a_config_error_starts_no_prefect(tmp_path: Path) -> None:
    """The real command line: one line, before Prefect is imported (a Prefect API that does not
    answer, and a Prefect home that must stay empty, would show any attempt)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data:\n  root: {tmp_path / 'runs'}\ntrain:\n  max_stepz: 10\n")
    home = tmp_path / "prefect-home"
    env = code_env(PREFECT_HOME=str(home), PREFECT_API_URL="http://127.0.0.1:9/api")
    code = (
        "import sys\nfrom flows.cli import main\ntry:\n    sys.exit(main(sys.argv[1:]))\n"
        "finally:\n    print('prefect imported' if 'prefect' in sys.modules else '', end='')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "run", "--config", str(bad)],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stdout == "", done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"maskdiff: config error: {bad}: train.max_stepz: unknown key"), line
    assert not home.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("edit", "sets", "named"),
    [
        (("  max_steps: 20\n", "  max_steps: 20\n  lr: fast\n"), [], ["train.lr"]),
        (None, ["data.seq_len=0"], ["--set", "data.seq_len"]),
        (None, ["data.seq_len=128"], ["data.seq_len=128", "model.max_seq_len=64"]),
        (None, ["data.root=../x"], ["data.root", "'..'"]),
        (("name: smoke\n", "name: !!python/object/apply:os.system ['true']\n"), [], ["YAML"]),
    ],
    ids=["wrong-type", "zero-size", "blocks-too-long", "root-with-dotdot", "python-yaml-tag"],
)
def test_config_errors_end_on_one_line(
    cli, tmp_path: Path, edit: tuple[str, str] | None, sets: list[str], named: list[str]
) -> None:
    """The smoke preset with one bad value; ``--stage data`` bounds the work if it were run."""
    config = SMOKE
    if edit is not None:
        config = tmp_path / "bad.yaml"
        text = SMOKE.read_text()
        assert edit[0] in text
        config.write_text(text.replace(edit[0], edit[1]))
    argv = run_args(tmp_path / "runs", *sets)
    argv[argv.index("--config") + 1] = str(config)
    result = fails_at_once(cli, argv, "maskdiff: config error: ", *named)
    assert result.err.strip() == result.last_line, "a config error prints one line only"


# ----------------------------------------------------------------------------- corpora


def _local(root: Path, *paths: Path, unit: str = "paragraph") -> list[str]:
    return run_args(
        root, "data.source=local", f"data.paths={[str(p) for p in paths]}", f"data.text_unit={unit}"
    )


@pytest.mark.parametrize(
    ("name", "content", "unit", "says"),
    [
        ("corpus.txt", b"", "paragraph", "no documents"),
        ("corpus.txt", b"\n\n   \n\t\n\n", "line", "no documents"),
        ("corpus.txt", bytes(range(128, 256)) * 4, "paragraph", "not UTF-8"),
    ],
    ids=["empty-corpus", "only-blank-lines", "non-utf8"],
)
def test_unusable_corpus(cli, tmp_path: Path, name: str, content: bytes, unit: str, says: str):
    path = tmp_path / name
    path.write_bytes(content)
    fails_at_once(cli, _local(tmp_path / "runs", path, unit=unit), "IngestError", str(path), says)


def test_missing_local_path(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "corpus.txt"
    fails_at_once(cli, _local(tmp_path / "runs", missing), "IngestError", str(missing), "not exist")


def test_parquet_without_the_text_column(cli, tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["one document", "another"] * 10}), path)
    result = fails_at_once(cli, _local(tmp_path / "runs", path), "IngestError", str(path))
    assert result.last_line == (
        f"maskdiff: IngestError: {path}: no column 'text' (data.text_column); has ['body']"
    )


def test_debug_shows_the_tracebacks_and_still_ends_on_the_message(cli, tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["one document"] * 10}), path)
    argv = _local(tmp_path / "runs", path)
    result = cli(*argv[:1], "--debug", *argv[1:])
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.err  # Prefect's, of the flow runs
    assert ", in cmd_run" in result.err  # the command's own, from flows/cli.py
    assert result.last_line.startswith(f"maskdiff: IngestError: {path}: no column 'text'")


def test_hub_dataset_offline(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, the Hub answers ConnectionError every time: not worth a retry."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    argv = run_args(tmp_path / "runs", "data.source=hub", "data.hub_name=nobody/no-such-corpus")
    fails_at_once(cli, argv, "IngestError", "nobody/no-such-corpus", "data.source=local")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_file_that_does_not_parse(cli, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    argv = run_args(tmp_path / "runs", "tokenizer.kind=file", f"tokenizer.path={path}")
    fails_at_once(cli, argv, "TokenizerError", str(path), "not a valid tokenizer.json")


def test_tokenizer_vocabulary_larger_than_configured(cli, tmp_path: Path) -> None:
    import tokenizers
    from tokenizers import models

    path = tmp_path / "big.json"
    vocab = {f"w{i}": i for i in range(100)} | {"[UNK]": 100}
    tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(path))
    argv = run_args(
        tmp_path / "runs",
        "tokenizer.kind=file",
        f"tokenizer.path={path}",
        "tokenizer.vocab_size=64",
    )
    fails_at_once(cli, argv, "TokenizerError", str(path), "tokenizer.vocab_size=64")


# ----------------------------------------------------------------------------- damaged stages


@pytest.fixture(scope="module")
def built(server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root whose four stages ``maskdiff run --stage data`` finished."""
    from flows.cli import main

    root = tmp_path_factory.mktemp("cli-built") / "runs"
    assert main(run_args(root)) == 0
    return root


def damaged_copy(built: Path, tmp_path: Path, stage: str) -> tuple[Path, Path]:
    """A copy of the built root (its own stages, its own Prefect cache keys), and its ``stage``."""
    root = tmp_path / "runs"
    shutil.copytree(built, root, ignore=shutil.ignore_patterns("*.lock"))
    return root, next((root / "data").glob(f"{stage}-*"))


def test_truncated_blocks_shard(cli, built: Path, tmp_path: Path) -> None:
    root, blocks = damaged_copy(built, tmp_path, "blocks")
    shard = list_shards(blocks, "train")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fails_at_once(cli, run_args(root), "StageValidationError", shard.name, "readable parquet")


def test_token_id_out_of_range(cli, built: Path, tmp_path: Path) -> None:
    root, blocks = damaged_copy(built, tmp_path, "blocks")
    vocab = read_manifest(blocks)["stats"]["vocab_size"]
    shard = list_shards(blocks, "train")[0]
    table = pq.read_table(shard)
    ids = table.column("input_ids").combine_chunks()
    flat, width = ids.flatten().to_numpy().copy(), ids.type.list_size
    flat[3 * width + 5] = vocab  # row 3
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), width)
    pq.write_table(table.set_column(1, "input_ids", column), shard)
    fails_at_once(
        cli, run_args(root), "StageValidationError", f"{shard.name} row 3", f"vocab_size={vocab}"
    )


def test_corruption_shard_with_wrong_masking_rate(cli, built: Path, tmp_path: Path) -> None:
    root, corruptions = damaged_copy(built, tmp_path, "corruptions")
    shard = list_shards(corruptions, "validation")[0]
    table = pq.read_table(shard)
    width = table.schema.field("mask").type.byte_width
    none_masked = pa.array([bytes(width)] * table.num_rows, pa.binary(width))
    index = table.schema.get_field_index("mask")
    pq.write_table(table.set_column(index, "mask", none_masked), shard)
    fails_at_once(cli, run_args(root), "StageValidationError", shard.name, "masked fraction")


def test_truncated_documents_shard_when_blocks_are_rebuilt(
    cli, built: Path, tmp_path: Path
) -> None:
    root, documents = damaged_copy(built, tmp_path, "documents")
    shard = list_shards(documents, "train")[0]
    shard.write_bytes(shard.read_bytes()[:100])
    argv = run_args(root, "data.seq_len=16")  # a blocks stage not built yet
    fails_at_once(cli, argv, "StageError", str(shard), "unreadable documents shard")


def test_disk_full_while_writing_a_stage(
    cli, built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the blocks writer after its first shard (as test_bad_input does where no tmpfs
    can be mounted): the library's StageError, not retried."""
    root, _ = damaged_copy(built, tmp_path, "blocks")
    disk_full_after_one_shard(monkeypatch)
    argv = run_args(root, "data.seq_len=16", "data.shard_rows=8")
    fails_at_once(cli, argv, "StageError", "stage 'blocks'", "no space left")


# ----------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("bytes", "is not a readable maskdiff checkpoint"),
        ("no-header", "'maskdiff-checkpoint' header"),
        ("pickled-code", "weights_only=True"),
    ],
)
def test_checkpoint_that_is_not_a_checkpoint(cli, tmp_path: Path, content: str, says: str):
    path = tmp_path / "ckpt-00000010.pt"
    marker = tmp_path / "code-ran"
    if content == "bytes":
        path.write_bytes(b"these bytes are not a checkpoint")
    elif content == "no-header":
        torch.save({"step": 3, "weights": torch.zeros(2)}, path)
    else:
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, "x": _Payload(marker)}, path)
    argv = ["sample", "--model", str(path), "--tokenizer", str(tmp_path)]
    fails_at_once(cli, argv, "CheckpointError", str(path), says)
    assert not marker.exists()


# ----------------------------------------------------------------------------- the real command


@pytest.mark.slow
def test_the_command_line_as_a_user_runs_it(tmp_path: Path) -> None:
    """``python -m flows.cli run`` on a parquet corpus without its text column, with Prefect's
    temporary server and the project's stores, as a user runs it: the last line is the message,
    the ingest task ran once, and the MLflow run links to the flow run in ``maskdiff ui``."""
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["one document", "another"] * 10}), corpus)
    root = tmp_path / "runs"
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"data:\n  root: {root}\n  source: local\n  paths: [{corpus}]\n"
        "tokenizer:\n  kind: char\ntracking:\n  system_metrics: false\n"
    )
    env = {k: v for k, v in code_env().items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(DO_NOT_TRACK="1")
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    shown = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 1, done.stderr
    assert shown[-1] == (
        f"maskdiff: IngestError: {corpus}: no column 'text' (data.text_column); has ['body']"
    ), done.stderr
    assert "Traceback" not in done.stderr and "Retry" not in done.stderr
    assert len(shown) < 30, done.stderr
    with sqlite3.connect(root / "prefect" / "prefect.db") as db:
        ingest = db.execute("SELECT run_count, state_type FROM task_run WHERE name LIKE 'ingest%'")
        assert ingest.fetchall() == [(1, "FAILED")]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("maskdiff")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    assert run.data.tags["prefect.flow_run_url"] == (
        f"http://127.0.0.1:4200/runs/flow-run/{flow_run_id}"
    )


def test_a_finished_run_links_both_uis(server: str, built: Path) -> None:
    """The run on the module's Prefect server: its MLflow run links to that server's flow-run
    page (never ``None/...``), and the summary gives the experiment page in its runs view."""
    import json

    (path,) = built.glob("pipeline/*/run_summary.json")
    summary = json.loads(path.read_text())
    ui = server.removesuffix("/api")
    assert summary["prefect_flow_run_url"] == (
        f"{ui}/runs/flow-run/{summary['prefect_flow_run_id']}"
    )
    run = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.tags["prefect.flow_run_url"] == summary["prefect_flow_run_url"]
    assert summary["mlflow_experiment_url"] == (
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}"
        "?workflowType=machine_learning"
    )


# ----------------------------------------------------------------------------- the retry policy


def _locked_database_error(tmp_path: Path) -> sqlite3.OperationalError:
    """A real "database is locked": a second writer while the first holds the lock."""
    db = tmp_path / "locked.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        sqlite3.connect(db, timeout=0).execute("INSERT INTO t VALUES (1)")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    raise AssertionError("the second writer was not refused")


def _refused_connection() -> BaseException:
    import urllib.request

    try:
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=5)
    except OSError as exc:
        return exc
    raise AssertionError("port 9 answered")


def test_what_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import email.message
    import errno
    import urllib.error

    from maskdiff.config import ConfigError
    from maskdiff.data.ingest import IngestError
    from maskdiff.data.stage import StageError
    from tasks.retry import is_transient

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    refused = _refused_connection()
    try:
        raise IngestError("could not load the Hub dataset 'x'") from refused
    except IngestError as exc:
        hub_down = exc
    headers = email.message.Message()
    busy = urllib.error.HTTPError("http://hub/x", 503, "Service Unavailable", headers, None)
    missing = urllib.error.HTTPError("http://hub/x", 404, "Not Found", headers, None)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert is_transient(_locked_database_error(tmp_path))
    assert is_transient(refused) and is_transient(hub_down) and is_transient(busy)
    for error in (IngestError("no column 'text'"), ConfigError("x"), ValueError("x"), missing,
                  StageError("no space left"), FileNotFoundError("x"), full):  # fmt: skip
        assert not is_transient(error), error
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, the network never comes back
    assert not is_transient(hub_down) and not is_transient(refused)
    assert is_transient(_locked_database_error(tmp_path))


def test_prefect_retries_a_transient_failure_only(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The condition as Prefect calls it: a connection error is retried (online), a data error
    is not."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    from prefect import flow, task
    from prefect.states import State

    from maskdiff.data.ingest import IngestError
    from tasks.retry import retry_if_transient

    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_if_transient)
    def flaky(kind: str) -> str:
        calls.append(kind)
        if calls.count(kind) == 1:  # each kind fails on its first attempt
            raise ConnectionError("the Hub went away") if kind == "net" else IngestError(kind)
        return "ok"

    @flow
    def both() -> tuple[State, State]:
        return flaky("net", return_state=True), flaky("data", return_state=True)

    net, data = both()
    assert net.is_completed() and net.result() == "ok"
    assert data.is_failed()
    assert calls == ["net", "net", "data"]


@pytest.mark.slow
def test_maskdiff_ui_stops_both_servers_on_sigterm(tmp_path: Path) -> None:
    """`maskdiff ui` under a service manager (SIGTERM): both servers stop with it, and its MLflow
    server runs no job runner."""
    from maskdiff.ops.servers import free_port

    config = tmp_path / "ui.yaml"
    config.write_text(f"data:\n  root: {tmp_path / 'runs'}\n")
    env = code_env()
    ports = [str(free_port()), str(free_port())]
    argv = ["ui", "--config", str(config), "--prefect-port", ports[0], "--mlflow-port", ports[1]]
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        ui = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=tmp_path)  # fmt: skip
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops both" not in log.read_text() and ui.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert ui.poll() is None, log.read_text()
        servers = _children(ui.pid)
        assert len(servers) == 2, servers
        group = [cmd for pid in servers for cmd in _group(pid)]
        assert not [cmd for cmd in group if "huey" in cmd or "_job_runner" in cmd], group
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(60) == 0, log.read_text()
        assert not [pid for pid in servers if _group(pid)], "a server outlived `maskdiff ui`"
    finally:
        if ui.poll() is None:
            ui.kill()
        for pid in servers:  # whatever outlived it (each server leads its own group)
            if _group(pid):
                os.killpg(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _group(leader: int) -> list[str]:
    """Command lines of the live processes in process group ``leader``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(state[2]) == leader and state[0] != "Z":
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return out
