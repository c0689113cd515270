"""Sharded evaluation: ``torchrun --nproc_per_node 2 -m maskdiff.scoring`` (gloo, CPU) gives the
one-process numbers (every NELBO row, its SE and curve, the AR NLL) to float64 round-off, and so
does the ``evaluate`` task with ``runtime.nproc_per_node=2``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import CPU, build_stages, child_hook, failure_text, smoke_config

from maskdiff import scoring
from maskdiff.config import Config
from maskdiff.distributed import DistInfo, shard_batches
from tasks import model as model_tasks

# eval.batch_size 12: several batches per rank, and an odd number of batches for some rows
_SET = [*CPU, "train.max_steps=4", "train.log_every=2", "eval.batch_size=12",
        "corruption.mode=online"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Data stages, an MDM and an AR checkpoint (4 steps each), the config as a YAML file."""
    root = tmp_path_factory.mktemp("shard") / "runs"
    cfg = smoke_config(root, *_SET)
    _, _, blocks, corr = build_stages(cfg, root)
    with task_log() as logged:
        ckpts = {
            kind: model_tasks.train.fn(cfg, kind, str(blocks.path), str(corr.path), str(root))[
                "checkpoint"
            ]
            for kind in ("mdm", "ar")
        }
    conf = root / "config.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return {"cfg": cfg, "conf": conf, "blocks": str(blocks.path), "corr": str(corr.path),
            "train_log": logged, **ckpts}  # fmt: skip


@contextlib.contextmanager
def task_log() -> Iterator[list[str]]:
    """The messages of the tasks' logger (outside a flow run) at INFO while the block runs."""
    logged: list[str] = []
    catch = logging.Handler(logging.INFO)
    catch.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("maskdiff.tasks")
    level = log.level
    log.addHandler(catch)
    log.setLevel(logging.INFO)
    try:
        yield logged
    finally:
        log.removeHandler(catch)
        log.setLevel(level)


def sharded(setup: dict, out: Path, nproc: int = 2, **env: str) -> dict[str, scoring.SplitScores]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "maskdiff.scoring", "--config", str(setup["conf"]),
           "--blocks", setup["blocks"], "--corruptions", setup["corr"], "--mdm", setup["mdm"],
           "--ar", setup["ar"], "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})  # fmt: skip
    assert proc.returncode == 0, failure_text(proc.stderr)
    return scoring.scores_from_json(json.loads(out.read_text()))


def assert_same(a: dict[str, scoring.SplitScores], b: dict[str, scoring.SplitScores]) -> None:
    """Every number of the report, to float64 round-off."""
    close = {"rel": 1e-12, "abs": 1e-15, "nan_ok": True}
    assert a.keys() == b.keys()
    for split in a:
        x, y = a[split], b[split]
        assert [e.T for e in x.mdm.estimates] == [e.T for e in y.mdm.estimates]
        assert len(x.mdm.estimates) >= 2  # the continuous row and at least one T
        for e, f in zip(x.mdm.estimates, y.mdm.estimates, strict=True):
            assert (e.n_blocks, e.n_tokens, e.n_bytes) == (f.n_blocks, f.n_tokens, f.n_bytes)
            assert e.nats_per_token == pytest.approx(f.nats_per_token, **close), (split, e.T)
            assert e.se == pytest.approx(f.se, **close), (split, e.T)
            assert e.curve == pytest.approx(f.curve, **close)
            assert e.per_block.tolist() == pytest.approx(f.per_block.tolist(), **close)
            assert e.blocks.tolist() == f.blocks.tolist()
        assert x.ar is not None and y.ar is not None
        assert x.ar.nats_per_token == pytest.approx(y.ar.nats_per_token, **close)
        assert x.ar.se == pytest.approx(y.ar.se, **close)
        assert x.ar.conditional_nats_per_token == pytest.approx(
            y.ar.conditional_nats_per_token, **close
        )
        assert x.metrics() == pytest.approx(y.metrics(), **close)


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_two_ranks_give_the_one_process_numbers(setup: dict, tmp_path: Path) -> None:
    cfg: Config = setup["cfg"]
    one = scoring.score(cfg, setup["blocks"], setup["corr"], setup["mdm"], setup["ar"])
    two = sharded(setup, tmp_path / "scores.json")
    assert_same(two, one)
    # the file holds the whole report: the tables are those of the one-process result
    assert {k: v.table for k, v in two.items()} == {k: v.table for k, v in one.items()}


# In each rank of the scoring job: note which corruption rows it unmasks for scoring (every MDM
# row passes through Corruptions.rows_mask once) and how many blocks the AR model scores.
PROBE = """
import os
if os.environ.get("RANK") and os.environ.get("SCORED_DIR"):
    import json, pathlib
    from maskdiff import evaluate
    from maskdiff.data.evalset import Corruptions
    log = pathlib.Path(os.environ["SCORED_DIR"]) / ("rank-" + os.environ["RANK"] + ".jsonl")
    seen = []  # every row set met, in order (kept alive: their ids stay theirs)
    rows_mask, ar_nll = Corruptions.rows_mask, evaluate.ar_token_nll
    def note(record):
        with log.open("a") as f:
            f.write(json.dumps(record) + "\\n")
    def probe(self, rows, length):
        if not any(s is self for s in seen):
            seen.append(self)
        k = next(i for i, s in enumerate(seen) if s is self)
        note({"set": k, "T": self.T, "R": int(self.block_index.numel()), "rows": rows.tolist()})
        return rows_mask(self, rows, length)
    def ar_probe(logits, x, *args, **kwargs):
        note({"ar": int(x.shape[0])})
        return ar_nll(logits, x, *args, **kwargs)
    Corruptions.rows_mask, evaluate.ar_token_nll = probe, ar_probe
"""


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_each_rank_scores_its_own_rows_and_together_every_row(setup: dict, tmp_path: Path):
    """Counted in the ranks themselves: for every (split, T) the two ranks' rows are disjoint,
    both non-empty, and together every row once; the AR blocks are split too."""
    scored = tmp_path / "scored"
    scored.mkdir()
    scores = sharded(setup, tmp_path / "scores.json", SCORED_DIR=str(scored),
                     PYTHONPATH=child_hook(tmp_path / "hook", PROBE))  # fmt: skip
    calls = {r: [json.loads(x) for x in (scored / f"rank-{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)}  # fmt: skip
    row_sets: dict[int, tuple[int, int, dict[int, list[int]]]] = {}
    for rank, records in calls.items():
        for c in (c for c in records if "set" in c):
            row_sets.setdefault(c["set"], (c["T"], c["R"], {0: [], 1: []}))[2][rank] += c["rows"]
    n_rows = sorted(e.T for sc in scores.values() for e in sc.mdm.estimates)
    assert sorted(T for T, _, _ in row_sets.values()) == n_rows  # one row set per split and T
    for T, R, rows in row_sets.values():
        assert rows[0] and rows[1], (T, R)  # both ranks scored
        assert not set(rows[0]) & set(rows[1]), (T, "a row scored by both ranks")
        assert sorted(rows[0] + rows[1]) == list(range(R)), (T, "rows missed or repeated")
    ar = {r: sum(c["ar"] for c in records if "ar" in c) for r, records in calls.items()}
    total = sum(sc.ar.n_blocks for sc in scores.values() if sc.ar is not None)
    assert ar[0] > 0 and ar[1] > 0 and ar[0] + ar[1] == total, (ar, total)


def test_the_result_file_round_trips(setup: dict) -> None:
    cfg: Config = setup["cfg"]
    one = scoring.score(cfg, setup["blocks"], setup["corr"], setup["mdm"], setup["ar"])
    back = scoring.scores_from_json(
        json.loads(json.dumps({k: v.to_json() for k, v in one.items()}))
    )
    assert_same(back, one)
    for split in one:
        assert back[split].mdm.to_dict() == one[split].mdm.to_dict()
        assert back[split].table == one[split].table


@pytest.mark.slow  # torchrun: not in `make test-fast`
def test_evaluate_task_on_two_processes_gives_the_one_process_report(setup: dict) -> None:
    cfg: Config = setup["cfg"]
    data = {"blocks": setup["blocks"], "corruptions": setup["corr"]}
    two_cfg = cfg.model_copy(
        update={"runtime": cfg.runtime.model_copy(update={"nproc_per_node": 2})}
    )
    one = model_tasks.evaluate.fn(cfg, data, setup["mdm"], setup["ar"])
    with task_log() as logged:
        two = model_tasks.evaluate.fn(two_cfg, data, setup["mdm"], setup["ar"])
    assert "evaluated on 2 processes (torchrun)" in logged  # not in this process
    assert one.keys() == two.keys() and len(one) >= 1
    for split in one:
        assert two[split]["table"] == one[split]["table"]
        assert "nelbo.T4.nats_per_token_se" in two[split]["mdm"]
        for part in ("mdm", "ar"):
            a, b = two[split][part], one[split][part]
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15, nan_ok=True), key
                else:
                    assert a[key] == b[key], key


def test_train_task_logs_the_health_of_the_ranks(setup: dict) -> None:
    """The task's progress line: global tokens/s, MFU, memory and the slowest rank's step time
    (one process here: the slowest rank is the only one, the straggler ratio 1)."""
    pattern = (
        r"(mdm|ar) step 4/4 loss [\d.]+ tokens/s \d+ \(all ranks\) MFU [\d.]+% memory [\d.]+ GB "
        r"step ([\d.]+) ms, slowest rank ([\d.]+) ms, straggler ratio 1\.00"
    )
    found = [m for m in (re.fullmatch(pattern, x) for x in setup["train_log"]) if m]
    assert sorted(m.group(1) for m in found) == ["ar", "mdm"], setup["train_log"]
    assert all(m.group(2) == m.group(3) for m in found)


@pytest.mark.parametrize("n", [0, 1, 5, 12, 13, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_batch_belongs_to_exactly_one_rank(n: int, world: int) -> None:
    owned = [s for r in range(world) for s in shard_batches(n, 4, DistInfo(r, world))]
    assert owned == list(range(0, n, 4))  # rank order is batch order: contiguous slices
