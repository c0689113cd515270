"""What a sweep costs over running its points one by one by hand.

Runs a grid on the smoke preset three ways, each in a fresh data root, and prints the wall
times and their ratios:

* ``maskdiff sweep`` over the grid (one command: shared data stages built once, one Prefect
  server, the points as child flow runs);
* the sum of the points' own wall times inside that sweep (each child's ``wall_s``);
* by hand: ``maskdiff run --stage evaluate`` once per point, one after the other (the later
  runs find the data stages cached, as a user's would).

    .venv/bin/python benchmarks/bench_sweep.py [--grid train.lr=0.001,0.003 --grid ...]

A ratio of the sweep to the sum of its children below 1 is impossible (the children run inside
it); what the sweep adds is that ratio minus 1. Against the by-hand total, below 1 means the
sweep is cheaper than typing the runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "smoke.yaml"


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}  # fmt: skip
    env.update(PREFECT_HOME=str(root / "prefect"), TOKENIZERS_PARALLELISM="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))  # fmt: skip
    return env


def _cli(args: list[str], root: Path) -> float:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=_env(root),
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="append", default=None)
    args = parser.parse_args()
    grid = args.grid or ["train.lr=0.001,0.003", "train.max_steps=20,40"]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        swept, by_hand = Path(tmp) / "sweep", Path(tmp) / "by-hand"
        base = ["--config", str(SMOKE), "--set", f"data.root={swept / 'runs'}", "--no-progress"]
        sweep_s = _cli(["sweep", *base, *[a for g in grid for a in ("--grid", g)]], swept)
        record = next((swept / "runs" / "sweeps").glob("*/sweep.json"))
        entries = json.loads(record.read_text())["points"].values()
        children = [json.loads(Path(e["summary"]).read_text())["wall_s"] for e in entries]

        axes = [(g.split("=", 1)[0], g.split("=", 1)[1].split(",")) for g in grid]
        hand_s = 0.0
        for combo in itertools.product(*(values for _, values in axes)):
            sets = [a for (key, _), v in zip(axes, combo, strict=True)
                    for a in ("--set", f"{key}={v}")]  # fmt: skip
            hand_s += _cli(["run", "--config", str(SMOKE), "--set",
                            f"data.root={by_hand / 'runs'}", "--stage", "evaluate",
                            "--no-progress", *sets], by_hand)  # fmt: skip

    n = len(children)
    print(f"grid {' x '.join(grid)} on the smoke preset: {n} points "
          f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)")  # fmt: skip
    print(f"{'':34}{'seconds':>10}")
    print(f"{'maskdiff sweep (one command)':34}{sweep_s:10.1f}")
    print(f"{'sum of its points (child wall_s)':34}{sum(children):10.1f}")
    print(f"{'by hand: maskdiff run x ' + str(n):34}{hand_s:10.1f}")
    print(
        f"sweep / sum of its points: {sweep_s / sum(children):.2f} "
        "(what the sweep adds: data stages, Prefect server start, comparison)"
    )
    print(f"sweep / by hand:           {sweep_s / hand_s:.2f} (below 1: the sweep is cheaper)")


if __name__ == "__main__":
    main()
