"""Helpers shared by several test modules (pytest puts ``tests/`` on ``sys.path``).

* :data:`REPO`, :data:`SMOKE`: the repository and its smoke preset; :func:`smoke_config` and
  :func:`write_preset`: the preset with overrides, as a config and as a YAML file;
  :func:`build_stages`: its four data stages, built as a notebook would;
* :func:`code_env`: the environment of a child process that imports this checkout's code;
  :func:`child_hook`: code every Python child runs at start-up (a fault in one rank, a probe);
  :func:`kill_launches_after`: a guard that ends this process's torchrun jobs if a test hangs;
* :func:`wait_until`: poll until something holds, failing with the logs of the processes watched;
  :func:`failure_text`: what to show of a failed child's stderr (a fatal signal's report kept);
  :func:`task_run_states`: the final state of every task run of some flow runs, as the API has it;
  :func:`serve` and :func:`wait_served`: ``maskdiff serve`` and its deployment, as the UI sees it;
* :func:`write_corpus`: blocks and corruptions of a learnable pattern, written as the contracts say;
* :func:`tiny_config`: a 2-layer model on CPU for the training tests;
* :func:`train_yaml` and :func:`cli_command`: a small ``maskdiff run`` on the markov corpus;
* :func:`markov_block_floor`: the least NLL any model can score on markov blocks, and
  :func:`check_markov_scores`: the evaluator's numbers against it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from maskdiff.config import Config, load_config
from maskdiff.data.blocks import build_blocks
from maskdiff.data.contracts import blocks_schema, corruptions_schema, pack_mask, shard_name
from maskdiff.data.corrupt import build_corruptions
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.stage import StageResult
from maskdiff.data.tokenizer import train_tokenizer
from maskdiff.ops.servers import ServerProcess

L, V = 16, 8  # the block length and real vocabulary of write_corpus and tiny_config
REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SMOKE = CONF / "smoke.yaml"
CPU = ("runtime.device=cpu", "runtime.num_threads=1", "runtime.peak_tflops=0.1")
T = TypeVar("T")


def smoke_config(root: Path, *overrides: str) -> Config:
    """The smoke preset (conf/smoke.yaml) with its data root at ``root``, then ``overrides``."""
    return load_config(SMOKE, [f"data.root={root}", *overrides])


def load_benchmark(name: str) -> Any:
    """The script ``benchmarks/<name>.py`` as a module, to call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_preset(path: Path, cfg: Config) -> Path:
    """``cfg`` as a YAML preset at ``path`` (every key written out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    return path


class Stages(NamedTuple):
    documents: StageResult
    tokenizer: StageResult
    blocks: StageResult
    corruptions: StageResult


def build_stages(cfg: Config, root: Path) -> Stages:
    """The four data stages of ``cfg`` under ``root``, built by the library (no Prefect)."""
    docs = ingest_documents(cfg.data)
    tok = train_tokenizer(cfg.tokenizer, docs.path, root)
    blocks = build_blocks(cfg.data, docs.path, tok.path)
    return Stages(docs, tok, blocks, build_corruptions(cfg.corruption, cfg.diffusion,
                                                      blocks.path, root))  # fmt: skip


def _suite_site() -> list[str]:
    """The suite's ``sitecustomize`` folder (tests/conftest.py), if this process has one."""
    site = os.environ.get("MASKDIFF_TEST_SITE")
    return [site] if site else []


def code_env(**extra: str) -> dict[str, str]:
    """This process's environment, with this checkout's code first on ``PYTHONPATH`` (after
    the suite's ``sitecustomize``)."""
    path = os.pathsep.join([*_suite_site(), str(REPO / "src"), str(REPO)])
    return dict(os.environ, PYTHONPATH=path, **extra)


def child_hook(folder: Path, source: str) -> str:
    """Write ``source`` as ``folder/sitecustomize.py`` and return a ``PYTHONPATH`` with
    ``folder`` first and this checkout's code next: every Python process started with it (a
    torchrun agent, each rank) runs ``source`` before its own code (and, first, what the
    suite's own ``sitecustomize`` runs, which this one shadows)."""
    folder.mkdir(parents=True, exist_ok=True)
    suite = [Path(s, "sitecustomize.py").read_text(encoding="utf-8") for s in _suite_site()]
    (folder / "sitecustomize.py").write_text("".join([*suite, source]), encoding="utf-8")
    return os.pathsep.join([str(folder), str(REPO / "src"), str(REPO)])


@contextlib.contextmanager
def kill_launches_after(seconds: float) -> Iterator[list[int]]:
    """While the block runs, a guard thread SIGKILLs every torchrun agent and rank descending
    from this process once ``seconds`` have passed (a hang then fails the test instead of
    holding the suite). Yields the pids it killed: empty if it never fired."""
    from maskdiff.launch import _descendants

    killed: list[int] = []
    done = threading.Event()

    def guard() -> None:
        if done.wait(seconds):
            return
        for pid in _descendants(os.getpid()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"torch.distributed.run" in cmd or b"maskdiff." in cmd:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    thread = threading.Thread(target=guard, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()


def failure_text(stderr: str, tail: int = 3000) -> str:
    """What to show of a failed child's stderr: its last ``tail`` characters, and before them,
    if Python reported a fatal signal (a rank aborted in native code), that report with its
    thread stacks, which a summary printed after it (torchrun's) would push out of the tail."""
    start = stderr.find("Fatal Python error")
    if start < 0 or start >= len(stderr) - tail:
        return stderr[-tail:]
    return f"{stderr[start : start + 6000]}\n[...]\n{stderr[-tail:]}"


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    procs: Sequence[ServerProcess] = (),
    interval: float = 0.5,
    logs: Sequence[ServerProcess] | None = None,
) -> T:
    """Poll ``predicate`` every ``interval`` s until it returns something true, and return that.
    Fails, with the log tails of ``logs`` (default: ``procs``), if one of ``procs`` ends first
    or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.process.poll() is not None:
                raise AssertionError(
                    f"{proc.name} ended ({proc.process.returncode}) while waiting for {what}:\n"
                    f"{proc.log_tail(80)}"
                )
        if time.monotonic() > deadline:
            tails = "\n\n".join(f"== {p.name}\n{p.log_tail(80)}" for p in (logs or procs))
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(interval)


def task_run_states(flow_run_ids: Sequence[str], timeout: float = 30.0) -> dict[str, str]:
    """Task run name -> state name for every task run of ``flow_run_ids``, read from the Prefect
    API. Task run states reach the server as events, after the flow call has returned, so this
    waits until every task run there has a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def final_states() -> dict[str, str] | None:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids)))
            )
        if not runs or any(r.state is None or not r.state.is_final() for r in runs):
            return None
        return {r.name: r.state.name for r in runs}

    return wait_until(final_states, timeout, f"final task run states of {list(flow_run_ids)}")


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``cmd`` from the repository in its own session and process group (so a kill reaches its
    helpers), its output appended to ``log``; ``env`` defaults to this process's."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def serve(preset: Path, env: dict[str, str], log: Path) -> ServerProcess:
    """``maskdiff serve --config preset`` (see :func:`spawn`)."""
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--config", str(preset)]
    return ServerProcess("maskdiff serve", "", spawn(cmd, log, env), log)


def disk_full_after_one_shard(monkeypatch: Any) -> None:
    """The blocks stage's parquet writer fails with ENOSPC after its first shard (where no
    small tmpfs can be mounted to fill); ``monkeypatch``: pytest's fixture."""
    from maskdiff.data import blocks as blocks_lib

    real, calls = blocks_lib.write_parquet, []

    def full_after_one_shard(table: pa.Table, path: Path) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(table, path)

    monkeypatch.setattr(blocks_lib, "write_parquet", full_after_one_shard)


def wait_served(
    http: Any, api: str, name: str, procs: Sequence[ServerProcess], since: datetime,
    timeout: float = 180,
) -> dict[str, Any]:  # fmt: skip
    """The deployment ``maskdiff-pipeline/<name>`` once served: READY (its runner polling), as
    the UI shows it, and polled since ``since`` (not a READY left by an earlier runner of the
    same name on a shared server). ``http``: an ``httpx.Client``."""

    def served() -> dict[str, Any] | None:
        resp = http.get(f"{api}/deployments/name/maskdiff-pipeline/{name}")
        if resp.status_code != 200 or resp.json().get("status") != "READY":
            return None
        polled = resp.json().get("last_polled")
        return resp.json() if polled and datetime.fromisoformat(polled) >= since else None

    return wait_until(served, timeout, f"the served deployment {name!r}", procs)


def write_corpus(
    root: Path,
    n_blocks: int = 96,
    seq_len: int = L,
    vocab: int = V,
    shard_rows: int = 32,
    draws: int = 2,
    seed: int = 0,
    strides: tuple[int, ...] = (1, 2),
) -> tuple[Path, Path]:
    """Blocks of a learnable pattern (x_{l+1} = x_l + s mod m, one stride s per block, the first
    stride 80% of the time) and continuous-time corruptions (T = 0, ``draws`` draws per block),
    written as the stages' contracts say. Returns (blocks folder, corruptions folder)."""
    rng = np.random.default_rng(seed)
    p = [0.8] + [0.2 / (len(strides) - 1)] * (len(strides) - 1) if len(strides) > 1 else [1.0]
    steps = rng.choice(strides, size=(n_blocks, 1), p=p)
    start = rng.integers(0, vocab, size=(n_blocks, 1))
    ids = ((start + steps * np.arange(seq_len)[None, :]) % vocab).astype(np.int32)
    blocks_dir, corr_dir = root / "blocks", root / "corruptions"
    blocks_dir.mkdir(parents=True, exist_ok=True)
    corr_dir.mkdir(parents=True, exist_ok=True)
    for shard, lo in enumerate(range(0, n_blocks, shard_rows)):
        hi = min(n_blocks, lo + shard_rows)
        bid = np.arange(lo, hi, dtype=np.int64)
        table = pa.table(
            {
                "block_id": bid,
                "input_ids": pa.FixedSizeListArray.from_arrays(
                    pa.array(ids[lo:hi].ravel()), seq_len
                ),
                "n_bytes": np.full(hi - lo, seq_len, dtype=np.int32),
            },
            schema=blocks_schema(seq_len),
        )
        pq.write_table(table, blocks_dir / shard_name("train", shard))
        n = (hi - lo) * draws
        t = rng.uniform(0.01, 1.0, size=n).astype(np.float32)
        mask = rng.random((n, seq_len)) < t[:, None]
        packed = pack_mask(mask)
        corr = pa.table(
            {
                "block_id": np.tile(bid, draws),
                "t": t,
                "T": np.zeros(n, dtype=np.int32),
                "step": np.zeros(n, dtype=np.int32),
                "draw": np.repeat(np.arange(draws, dtype=np.int32), hi - lo),
                "mask": pa.array([bytes(r) for r in packed], type=pa.binary(packed.shape[1])),
            },
            schema=corruptions_schema(seq_len),
        )
        pq.write_table(corr, corr_dir / shard_name("train", shard))
    return blocks_dir, corr_dir


def tiny_config(**train: object) -> Config:
    """A 2-layer, d=32 model on CPU (1 thread) with online masks; ``train`` overrides the
    ``train`` section (defaults: batch 16, 50 steps, lr 1e-2, a log every step)."""
    return Config.model_validate(
        {
            "data": {"seq_len": L},
            "model": {"preset": "custom", "n_layers": 2, "d_model": 32, "n_heads": 2,
                      "max_seq_len": 32},
            "corruption": {"mode": "online"},
            "runtime": {"device": "cpu", "num_threads": 1, "peak_tflops": 0.1},
            "train": {"batch_size": 16, "max_steps": 50, "lr": 1e-2, "warmup_steps": 5,
                      "log_every": 1, "checkpoint_every": 1000, "ema": 0.9, **train},
        }
    )  # fmt: skip


# A pipeline run of a few seconds a stage (the crash and concurrency tests).
TRAIN_YAML = """\
name: {name}
ar_baseline: false
data:
  source: builtin
  builtin: markov
  seq_len: 32
  shard_rows: 64
  val_fraction: 0.1
  test_fraction: 0.1
  root: {root}
  markov: {{vocab_size: 8, order: 1, n_documents: 120, doc_length: 64}}
tokenizer: {{kind: char}}
corruption: {{eval_draws: 2}}
diffusion: {{T: [4, 16]}}
model: {{preset: custom, n_layers: 2, d_model: 32, n_heads: 2, max_seq_len: 64}}
train: {{batch_size: 8, max_steps: {max_steps}, warmup_steps: 2, log_every: 10,
        checkpoint_every: 20}}
runtime: {{device: cpu, num_threads: 1, peak_tflops: 0.1}}
tracking: {{system_metrics: false}}
"""


def train_yaml(root: Path, name: str = "crash-train", max_steps: int = 600) -> str:
    """The small training run's config (YAML text) with its data root at ``root``."""
    return TRAIN_YAML.format(root=root, name=name, max_steps=max_steps)


def cli_command(config: Path) -> list[str]:
    """``maskdiff run`` of the train stage on ``config``, without progress bars."""
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        str(config),
        "--stage",
        "train",
        "--no-progress",
    ]


def markov_block_floor(documents: Path, blocks: Path, split: str, n_blocks: int) -> float:
    """The least expected NLL, in nats per token, that any model scoring each block on its own
    can reach on the first ``n_blocks`` blocks of ``split`` of the builtin markov corpus
    (order 1, whole documents, one symbol one token, an EOS after each document).

    Given where a block's EOS tokens are, its other tokens are runs of the chain, each started
    from the stationary law pi (a document's first symbol, or a block's first token inside a
    document: the chain is stationary). A run of s symbols has entropy h0 + (s - 1) h, with
    h0 = H(pi) and h the entropy rate, both from the documents manifest; an EOS has none. So

        H(block | EOS positions) = h0 * (runs) + h * (symbols - runs),

    and by Gibbs' inequality E[-log q(block)] >= H(block | EOS positions) for every model q;
    an upper bound on -log q (the MDM's NELBO) is at least as large. The floor is the sum over
    the blocks divided by the tokens, n L (EOS counted, as the evaluator counts it).

    For a single block it can lie below the manifest's stream floor
    ``nll_floor_nats_per_token`` = (h0 + (n - 1) h) / (n + 1) (a block holding an EOS pays no
    h0 for the run it cuts short), and averaged over the n + 1 phases it lies above it.
    """
    manifest = json.loads((documents / "manifest.json").read_text())
    source, stats = manifest["config"], manifest["stats"]["markov"]
    assert source["builtin"] == "markov" and source["markov"]["order"] == 1, source
    assert source.get("chunk_chars") is None, "chunked documents do not start from pi"
    h, h0 = stats["entropy_rate_nats_per_symbol"], stats["initial_entropy_nats"]
    n = stats["doc_length"]
    assert np.isclose(stats["doc_entropy_nats"], h0 + (n - 1) * h, rtol=1e-12), stats
    eos = json.loads((blocks / "manifest.json").read_text())["stats"]["eos_id"]
    shards = sorted(blocks.glob(f"{split}-*.parquet"))
    column = pa.concat_tables([pq.read_table(s, columns=["input_ids"]) for s in shards])
    col = column.column("input_ids").combine_chunks()
    ids = col.flatten().to_numpy().reshape(-1, col.type.list_size)[:n_blocks]  # (n_blocks, L)
    assert len(ids) == n_blocks, (len(ids), n_blocks)
    is_eos = ids == eos
    run_start = np.ones_like(is_eos)
    run_start[:, 1:] = is_eos[:, :-1]  # the block's first token, or the token after an EOS
    cost = np.where(is_eos, 0.0, np.where(run_start, h0, h))
    return float(cost.sum() / ids.size)


def check_markov_scores(
    documents: Path, blocks: Path, scores: Mapping[str, float], split: str = "validation"
) -> dict[str, tuple[float, float, float]]:
    """Every MDM bound row and the AR NLL of ``scores`` (keys as the evaluator's ``to_dict``:
    ``nelbo.<row>.nats_per_token``, ``..._se``, ``ar.nats_per_token``...) is at least the
    :func:`markov_block_floor` of the blocks it covers minus 3 standard errors, and below 10.

    Returns ``{row: (value, floor, se)}`` for the rows checked (``nelbo.continuous``, ...,
    ``ar``).
    """
    seq_len = json.loads((blocks / "manifest.json").read_text())["stats"]["seq_len"]
    covered = {
        key.removesuffix(".nats_per_token"): int(scores[key.replace("nats_per_token", "n_blocks")])
        for key in scores
        if key.startswith("nelbo.") and key.endswith(".nats_per_token")
    }
    if "ar.nats_per_token" in scores:
        covered["ar"] = int(scores["ar.n_tokens"]) // seq_len
    out, wrong = {}, []
    for row, n_blocks in covered.items():
        floor = markov_block_floor(documents, blocks, split, n_blocks)
        value, se = scores[f"{row}.nats_per_token"], scores[f"{row}.nats_per_token_se"]
        out[row] = (value, floor, se)
        if not (floor - 3 * se <= value < 10 and math.isfinite(se) and se > 0):
            wrong.append(f"{row}: {value:.4f} ± {se:.4f} nats/token, floor {floor:.4f}")
    assert not wrong, "below the entropy floor (or no SE):\n" + "\n".join(wrong)
    return out


def chi2_pvalue(counts: Any, probs: Any) -> float:
    """Chi-square goodness of fit of ``counts`` (torch, float) to the law ``probs``; outcomes
    with an expected count below 5 pooled into one."""
    from scipy import stats

    expected = counts.sum() * probs
    small = expected < 5
    obs, exp = counts[~small], expected[~small]
    if bool(small.any()):
        obs = obs.new_tensor([*obs.tolist(), float(counts[small].sum())])
        exp = exp.new_tensor([*exp.tolist(), float(expected[small].sum())])
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)
