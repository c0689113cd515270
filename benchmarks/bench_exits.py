"""How often a finished 2-rank gloo launch still fails on its way out, two ways.

Each launch is the two-"node" run of tests/test_launch.py: two torchrun agents on 127.0.0.1 with
one CPU rank each, c10d rendezvous, 6 steps of the tiny model. The worker script is either

* ``plain``: ``sys.exit(main())``, the interpreter's normal teardown (what ``maskdiff.train`` did
  before :func:`maskdiff.distributed.end_worker`), or
* ``end_worker``: ``end_worker(main())``, as ``python -m maskdiff.train`` ends now.

A launch fails when either agent exits non-zero; the script counts the failures of each side and
names the signal a failing rank died of. ``--parallel`` launches run at once (the load a CI run
puts on two cores); the sides alternate so both see the same machine. Prints counts and rates,
asserts nothing.

    .venv/bin/python benchmarks/bench_exits.py [--runs 45] [--parallel 3]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import tiny_config, write_corpus  # noqa: E402

from maskdiff.launch import train_arguments  # noqa: E402
from maskdiff.ops.servers import free_port  # noqa: E402

WORKERS = {
    "plain": "import sys\nfrom maskdiff.train import main\nsys.exit(main())\n",
    "end_worker": "from maskdiff.distributed import end_worker\nfrom maskdiff.train import main\n"
    "end_worker(main())\n",
}
PORTS = threading.Lock()  # free_port then bind: one launch picks its port at a time


def launch(root: Path, side: str, index: int, blocks: Path, conf: Path) -> str | None:
    """One two-node launch; None when both agents exit 0, else what the failing rank died of."""
    out = root / f"{side}-{index}"
    script = root / f"{side}.py"
    with PORTS:
        endpoint = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--max_restarts", "0",
               "--nnodes", "2", "--node_rank", str(node), "--rdzv_backend", "c10d",
               "--rdzv_endpoint", endpoint, "--rdzv_id", f"{side}{index}",
               "--nproc_per_node", "1", str(script),
               *train_arguments(conf, blocks, out / f"node{node}", vocab_size=8)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        logs.append(out / f"node{node}.log")
        logs[-1].parent.mkdir(parents=True, exist_ok=True)
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log))
    # an agent whose peer failed waits out torchrun's exit barrier (300 s): 20 s is plenty here
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 20:
            for p in procs:
                p.kill()
        time.sleep(0.2)
    errors = [log.read_text(errors="replace") for log in logs]
    if all(p.returncode == 0 for p in procs):
        return None
    text = "\n".join(errors)
    signal = re.search(r"exitcode\s*:\s*(-?\d+).*?\((SIG\w+)\)", text, re.S)
    codes = ",".join(str(p.returncode) for p in procs)
    cause = signal.group(2) if signal else f"exit status {codes}"
    if "terminate called without an active exception" in text:
        cause += " (terminate called without an active exception)"
    return cause


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=45, help="launches of each side")
    parser.add_argument("--parallel", type=int, default=3, help="launches at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-exits-") as tmp:
        root = Path(tmp)
        blocks, _ = write_corpus(root / "data", n_blocks=64, seq_len=16, vocab=8, strides=(0, 1))
        conf = root / "tiny.yaml"
        cfg = tiny_config(max_steps=6, grad_accum=2, log_every=2)
        conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        for side, text in WORKERS.items():
            (root / f"{side}.py").write_text(text)
        jobs = [(side, i) for i in range(args.runs) for side in WORKERS]
        start = time.monotonic()
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda job: (job[0], launch(root, *job, blocks, conf)), jobs))
        wall = time.monotonic() - start
    print(f"{len(jobs)} launches of 2 ranks, {args.parallel} at once, {wall:.0f} s")
    print(f"{'worker ends with':<20}{'launches':>10}{'failed':>8}{'rate':>8}   causes")
    for side in WORKERS:
        causes = [c for s, c in results if s == side and c is not None]
        rate = len(causes) / args.runs
        kinds = sorted(set(causes))
        summary = "; ".join(f"{causes.count(k)}x {k}" for k in kinds) or "-"
        print(f"{side:<20}{args.runs:>10}{len(causes):>8}{rate:>8.1%}   {summary}")


if __name__ == "__main__":
    main()
