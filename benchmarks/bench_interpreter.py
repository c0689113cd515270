"""The same work under two Python 3.11 interpreters: CPU seconds of a fresh process each way.

Each interpreter is the ``python`` of a venv with this project installed (``make setup
VENV=... PYTHON=...``). The three workloads:

1. imports: ``flows.pipeline``, Prefect's server application and MLflow's server, what a command,
   a temporary Prefect server and an MLflow server load as they start (bytecode written by a
   first, uncounted run, as the suite has it after its first processes);
2. Python: JSON, regular expressions, sorting and small objects, the kind of work the servers and
   Prefect's engine do per request and per task;
3. torch: 60 training steps of a small transformer on one thread, most of it in torch's C++
   kernels, where the interpreter should matter little.

The two sides are alternated ``--repeats`` times; the lowest of each side counts (a shared machine
only ever adds), the median is printed beside it. Prints figures and the candidate's share of the
baseline's CPU; asserts nothing.

    .venv/bin/python benchmarks/bench_interpreter.py --baseline /tmp/pyenv-venv/bin/python \\
        [--candidate .venv/bin/python] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_startup import REPO, cpu_seconds  # this folder: sys.path[0]

IMPORTS = "import flows.pipeline, prefect.server.api.server, mlflow.server"
PYTHON_WORK = """
import json, re
doc = {"runs": [{"id": i, "name": f"run-{i}", "tags": {"k": str(i) * 3}} for i in range(2000)]}
class Row:
    def __init__(self, value):
        self.value = value
for _ in range(160):
    text = json.dumps(doc)
    assert len(json.loads(text)["runs"]) == 2000
    re.findall(r"run-(\\d+)", text)
    sorted(str(i) for i in range(20000))
    sum(Row(i).value for i in range(30000))
"""
TORCH_WORK = """
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
x = torch.randn(16, 64, 64)
for _ in range(60):
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    opt.step()
"""
WORKLOADS = {"imports": IMPORTS, "python": PYTHON_WORK, "torch": TORCH_WORK}


def env_for(python: str) -> dict[str, str]:
    """Bytecode under the venv's prefix, as tests/conftest.py writes it; this checkout's code."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    env["PYTHONPYCACHEPREFIX"] = str(Path(prefix) / "pycache")
    return env


def version(python: str) -> str:
    code = "import sys; print(sys.version.split()[0], sys.base_prefix)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", required=True, help="the python of the baseline venv")
    parser.add_argument("--candidate", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sides = {"baseline": args.baseline, "candidate": args.candidate}
    envs = {side: env_for(python) for side, python in sides.items()}
    for side, python in sides.items():
        print(f"{side:9s} {python}: Python {version(python)}")
        cpu_seconds(IMPORTS, env=envs[side], python=python)  # writes the bytecode; not counted
    print(f"\n{'workload':8s} {'baseline s':>18s} {'candidate s':>18s} {'share':>6s}")
    for name, code in WORKLOADS.items():
        seen: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, python in sides.items():
                seen[side].append(cpu_seconds(code, env=envs[side], python=python)[0])
        low = {side: min(v) for side, v in seen.items()}
        med = {side: statistics.median(v) for side, v in seen.items()}
        print(f"{name:8s} {low['baseline']:8.2f} (med {med['baseline']:5.2f}) "
              f"{low['candidate']:8.2f} (med {med['candidate']:5.2f}) "
              f"{low['candidate'] / low['baseline']:6.3f}")  # fmt: skip
    print("\nshare: the candidate's lowest CPU over the baseline's (below 1: cheaper)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
