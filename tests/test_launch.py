"""The ``train`` task on several processes: torchrun launched by the task (maskdiff.launch), CPU
and gloo. Same losses as one process, metrics in MLflow while training runs, a failed rank's
message in the task's error, two c10d "nodes" on this machine. The served-deployment
cancellation test is in test_launch_cancel.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import smoke_config, tiny_config, write_corpus
from mlflow import MlflowClient

from maskdiff.checkpoint import load_checkpoint
from maskdiff.config import ConfigError, load_config
from maskdiff.launch import (
    LaunchError,
    LaunchSpec,
    _alive,
    _descendants,
    run_training,
    torchrun_command,
    train_arguments,
)
from maskdiff.ops.servers import free_port
from maskdiff.ops.tracking import RunTracker
from maskdiff.train import train
from tasks import data as data_tasks
from tasks import model as model_tasks
from tasks.caching import root_generation

SMALL = ["train.max_steps=8", "train.log_every=2", "train.eval_every=4", "runtime.num_threads=1",
         "runtime.device=cpu", "ar_baseline=false"]  # fmt: skip


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch") / "data"
    cfg = smoke_config(root, *SMALL)
    root_generation(root)
    docs = data_tasks.ingest.fn(cfg.data, str(root))
    tok = data_tasks.tokenizer.fn(cfg.tokenizer, str(docs.path), str(root))
    blocks = data_tasks.build_blocks(cfg.data, str(docs.path), str(tok.path), str(root))
    corr = data_tasks.corrupt(cfg.corruption, cfg.diffusion, str(blocks.path), str(root))
    return cfg, root, str(blocks.path), str(corr.path)


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_two_processes_from_the_task_match_one_and_stream_to_mlflow(stages, tmp_path) -> None:
    cfg, root, blocks, corr = stages
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker.start(cfg.tracking, uri, "launch", artifact_root=tmp_path / "art")
    ref = {"uri": uri, "run_id": tracker.run_id}
    two = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"nproc_per_node": 2})})
    out = model_tasks.train.fn(two, "mdm", blocks, corr, str(root.parent), ref)
    returned_ms = time.time() * 1000
    evaluation = model_tasks.evaluate.fn(two, {"blocks": blocks, "corruptions": corr},
                                         out["checkpoint"], None, ref)  # fmt: skip
    assert out["step"] == 8 and (Path(out["run_dir"]) / "DONE").is_file()
    assert [s for s, _ in json.loads((Path(out["run_dir"]) / "curve.json").read_text())] == [4, 8]

    one = model_tasks.train.fn(cfg, "mdm", blocks, corr, str(root.parent), None)  # in process
    assert one["run_dir"] != out["run_dir"]
    history = [json.loads((Path(r["run_dir"]) / "history.json").read_text()) for r in (out, one)]
    losses = [[m["loss"] for _, m in h] for h in history]
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)

    client = MlflowClient(uri)
    logged = client.get_metric_history(tracker.run_id, "train.loss")
    assert [m.step for m in logged] == [2, 4, 6, 8]
    assert [m.value for m in logged] == pytest.approx(losses[0], rel=1e-6)
    # logged while the ranks trained: the first window before the last checkpoint was written
    last_ckpt_ms = Path(out["checkpoint"]).stat().st_mtime * 1000
    assert logged[0].timestamp < last_ckpt_ms <= returned_ms
    val = client.get_metric_history(tracker.run_id, "val.nelbo")
    assert [m.step for m in val] == [4, 8]
    metrics = client.get_run(tracker.run_id).data.metrics
    assert "validation.nelbo.continuous.nats_per_token" in metrics
    assert evaluation["validation"]["mdm"]


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_a_failing_rank_fails_the_task_with_its_message(stages) -> None:
    _, root, blocks, corr = stages
    bad = smoke_config(root, *SMALL, "train.batch_size=15", "train.grad_accum=1",
                       "runtime.nproc_per_node=2")  # fmt: skip
    with pytest.raises(LaunchError) as info:
        model_tasks.train.fn(bad, "mdm", blocks, corr, str(root.parent), None)
    message = str(info.value)
    # every rank fails the same way; torchrun names whichever it saw first
    assert re.search(r"rank [01] \(local_rank: [01]\): ValueError: train.batch_size=15 is not "
                     r"divisible by world size 2", message), message  # fmt: skip
    assert info.value.returncode == 1


# A rank that dies of a signal in native code: no Python traceback, only what it printed.
ABORTING_RANK = """
import os, sys, time
if os.environ["RANK"] == "1":
    print("rank one's last words: gloo::EnforceNotMet", file=sys.stderr, flush=True)
    os.abort()
time.sleep(60)
"""


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_a_rank_killed_by_a_signal_is_named_with_its_last_words(tmp_path: Path) -> None:
    """torchrun records no traceback for a rank killed by SIGABRT; the error still names the
    rank and the signal, and carries the lines the rank printed last (without the agent's)."""
    script = tmp_path / "abort.py"
    script.write_text(ABORTING_RANK, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--max_restarts", "0", str(script)]  # fmt: skip
    with pytest.raises(LaunchError) as info:
        run_training(cmd, grace=5.0)
    message = str(info.value)
    assert re.search(r"launch failed \(exit status 1\), rank 1 \(local_rank: 1\): traceback : "
                     r"Signal 6 \(SIGABRT\)", message), message  # fmt: skip
    # after the summary, the rank's line alone: not the agent's banner nor its warnings
    tail = message.split("stderr before torchrun's report:\n", 1)[1]
    assert tail == "rank one's last words: gloo::EnforceNotMet", message


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_two_rendezvous_nodes_train_like_two_local_processes(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path / "data", n_blocks=64, seq_len=16, vocab=8, strides=(0, 1))
    cfg = tiny_config(max_steps=6, grad_accum=2, log_every=2)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    endpoint = f"127.0.0.1:{free_port()}"
    results: dict[int, dict] = {}
    losses: dict[int, list[float]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def node(rank: int) -> None:
        spec = LaunchSpec(1, nnodes=2, node_rank=rank, rdzv_endpoint=endpoint, rdzv_id="t2")
        args = train_arguments(conf, blocks, tmp_path / f"node{rank}", vocab_size=8)
        env = {**os.environ, "MASKDIFF_NODE_RANK": str(rank)}
        try:
            results[rank] = run_training(torchrun_command(spec, args),
                                         lambda s, m: losses[rank].append(m["loss"]),
                                         env=env)  # fmt: skip
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert not losses[1] and len(losses[0]) == 3  # node 0 reports, node 1 trains silently
    assert results[0]["out"] == results[1]["out"] == str(tmp_path / "node0")
    assert not (tmp_path / "node1").exists()
    single = train(cfg, blocks, tmp_path / "single", vocab_size=8)
    assert losses[0] == pytest.approx([m["loss"] for _, m in single.history], rel=1e-4)


LAUNCHER = """
import json, sys
from maskdiff.launch import run_training
run_training(json.loads(sys.argv[1]), lambda step, m: print("step", step, flush=True))
"""


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_sigterm_to_the_launching_process_stops_every_rank(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path / "data", n_blocks=64, seq_len=16, vocab=8, strides=(0, 1))
    cfg = tiny_config(max_steps=100000, log_every=5, checkpoint_every=5)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "out"
    cmd = torchrun_command(LaunchSpec(2), train_arguments(conf, blocks, out, vocab_size=8))
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(cmd)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the ranks train: a second window came through
            if line.startswith("step 10"):
                break
        ranks = [p for p in _descendants(proc.pid) if "maskdiff.train" in _cmdline(p)]
        assert len(ranks) >= 3, ranks  # the agent and two ranks
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in ranks if _alive(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for path in sorted(out.glob("ckpt-*.pt")):
        assert load_checkpoint(path)["step"] >= 5


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_rendezvous_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs runtime.rdzv_endpoint=HOST:PORT"):
        load_config("default", ["runtime.nnodes=2"])
    with pytest.raises(ConfigError, match="nproc_per_node must be 'auto' or an integer >= 1"):
        load_config("default", ["runtime.nproc_per_node=0"])
    cfg = load_config("default", ["runtime.nnodes=2", "runtime.rdzv_endpoint=head:29500"])
    cmd = torchrun_command(LaunchSpec.from_runtime(cfg.runtime, "job"), ["--out", "x"])
    assert "--standalone" not in cmd
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "head:29500"
    assert cmd[cmd.index("--rdzv_id") + 1] == "job"
    cpu = load_config("default", ["runtime.device=cpu"])
    assert LaunchSpec.from_runtime(cpu.runtime).in_process  # auto is 1 on a CPU


def test_a_temporary_file_left_by_a_killed_save_is_removed(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path / "data", n_blocks=32, seq_len=16, vocab=8)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".ckpt-00000004.pt.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    result = train(tiny_config(max_steps=2), blocks, out, vocab_size=8)
    assert not stale.exists()
    assert load_checkpoint(result.checkpoint_path)["step"] == 2
