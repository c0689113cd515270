"""Sweeps and comparisons (flows/sweep.py, maskdiff.sweep, maskdiff.compare).

The grid is expanded and validated before anything runs; the comparison's paired SE is
``paired_difference`` on the per-block terms the points stored. The module's sweep (2 x 2 on the
smoke preset, in this process on the session's Prefect server): ``train.lr`` x ``data.seq_len``, so
two corruption stages each shared by two points; one point fails (a training error injected for
that point alone), the other three finish, two points at a time (``sweep.max_concurrent=2``);
started again, the sweep trains only that point.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SMOKE, code_env

from maskdiff.compare import RunFacts, compare, regression
from maskdiff.config import ConfigError
from maskdiff.evaluate import NelboEstimate, paired_difference
from maskdiff.ops.locks import ProcessLockManager
from maskdiff.scoring import SplitScores
from maskdiff.sweep import choose_baseline, expand, parse_grid

# ----------------------------------------------------------------------------- the grid


def test_grid_values_parse_as_set_does_and_lists_keep_their_commas() -> None:
    axes = parse_grid(["train.lr=0.001,3e-3", "sample.frontier_steps=[8,16],[32]", "name=a,b"])
    assert [a.key for a in axes] == ["train.lr", "sample.frontier_steps", "name"]
    assert axes[0].values == (0.001, "3e-3")  # YAML 1.1 reads 3e-3 as text; the config, a float
    assert axes[1].values == ([8, 16], [32])
    assert axes[2].values == ("a", "b")


@pytest.mark.parametrize(
    ("grid", "named"),
    [
        ([], "at least one --grid"),
        (["train.lr"], "expected key=v1,v2"),
        (["train.lr=0.1,"], "an empty value"),
        (["train.lr=0.1", "train.lr=0.2"], "given twice"),
        (["train.lr=0.1,0.1"], "repeated"),
    ],
)
def test_a_malformed_grid_is_named(grid: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_grid(grid)


def test_points_are_the_product_in_grid_order(tmp_path: Path) -> None:
    axes = parse_grid(["train.lr=0.001,3e-3", "train.max_steps=10,20"])
    points = expand(str(SMOKE), [f"data.root={tmp_path}"], axes)
    assert [p.label for p in points] == [
        "train.lr=0.001, train.max_steps=10",
        "train.lr=0.001, train.max_steps=20",
        "train.lr=0.003, train.max_steps=10",
        "train.lr=0.003, train.max_steps=20",
    ]  # the points' values are the validated config's
    assert [(p.config.train.lr, p.config.train.max_steps) for p in points] == [
        (0.001, 10), (0.001, 20), (0.003, 10), (0.003, 20)
    ]  # fmt: skip
    assert len({p.key for p in points}) == 4
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "expanding wrote something"


def test_every_bad_point_is_named_with_its_key(tmp_path: Path) -> None:
    axes = parse_grid(["train.lr=0.001,-1", "train.max_steps=10,0"])
    with pytest.raises(ConfigError) as err:
        expand(str(SMOKE), [f"data.root={tmp_path}"], axes)
    text = str(err.value)
    assert "refused before any work" in text
    # point 1 is fine; 2 (max_steps 0), 3 (lr -1) and 4 (both) are named, each with its key
    assert "point 1 of 4" not in text
    assert "point 2 of 4 (train.lr=0.001, train.max_steps=0)" in text
    assert "point 3 of 4 (train.lr=-1, train.max_steps=10)" in text
    assert "point 4 of 4" in text
    assert "train.max_steps" in text.split("point 3")[0] and "train.lr" in text.split("point 3")[1]


def test_an_unknown_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"point 1 of 2 \(train.lrr=0.1\).*unknown key"):
        expand(str(SMOKE), [f"data.root={tmp_path}"], parse_grid(["train.lrr=0.1,0.2"]))


def test_points_that_differ_only_in_where_they_run_are_one_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="point 1 .* and point 2 .* are the same run"):
        expand(str(SMOKE), [f"data.root={tmp_path}"], parse_grid(["runtime.max_workers=1,2"]))


def test_the_baseline_is_chosen_by_a_grid_value(tmp_path: Path) -> None:
    points = expand(str(SMOKE), [f"data.root={tmp_path}"],
                    parse_grid(["train.lr=0.001,0.003", "train.max_steps=10,20"]))  # fmt: skip
    assert choose_baseline(points, None) is points[0]
    assert choose_baseline(points, "train.lr=0.003") is points[2]
    assert choose_baseline(points, "train.lr=3e-3") is points[2]
    assert choose_baseline(points, "train.max_steps=20") is points[1]
    with pytest.raises(ConfigError, match="no point has train.lr=0.5"):
        choose_baseline(points, "train.lr=0.5")
    with pytest.raises(ConfigError, match="not a grid key"):
        choose_baseline(points, "train.seed=1")


def test_the_command_refuses_a_bad_grid_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "flows.cli", "sweep", "--config", str(SMOKE), "--set",
           f"data.root={root}", "--grid", "train.lr=0.001,abc"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=code_env(), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("maskdiff: config error: the sweep is refused before any work"), last
    assert "point 2 of 2 (train.lr=abc)" in last and "train.lr" in last
    assert not root.exists(), "a refused sweep created its data root"


@pytest.mark.slow
def test_the_command_keeps_prefect_in_the_project_stores(tmp_path: Path) -> None:
    """``maskdiff sweep`` as a user runs it (no PREFECT_HOME, no tracking URI): Prefect's home,
    database, cached results and stage locks all under ``data.root``, nothing in ~/.prefect
    (the sweep once imported Prefect before choosing its stores, so the flow's own settings
    went to ~/.prefect while its temporary server used runs/prefect)."""
    root, home = tmp_path / "runs", tmp_path / "home"
    env = {k: v for k, v in code_env(HOME=str(home)).items()
           if k not in ("PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_URL",
                        "MLFLOW_TRACKING_URI")}  # fmt: skip
    cmd = [sys.executable, "-m", "flows.cli", "sweep", "--config", str(SMOKE), "--set",
           f"data.root={root}", "--set", "train.max_steps=4", "--set", "ar_baseline=false",
           "--grid", "train.seed=0", "--no-progress"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (home / ".prefect").exists(), sorted(p.name for p in (home / ".prefect").iterdir())
    prefect = root / "prefect"
    assert (prefect / "prefect.db").is_file() and (root / "mlflow.db").is_file()
    assert list((prefect / "locks").glob("*.lock")), "the data tasks' locks are the project's"
    assert list((prefect / "storage").iterdir()), "so are their cached results"


# ----------------------------------------------------------------------------- comparisons


def _estimate(per_block: list[float], blocks: list[int] | None = None) -> NelboEstimate:
    values = torch.tensor(per_block, dtype=torch.float64)
    index = torch.arange(len(per_block)) if blocks is None else torch.tensor(blocks)
    n = len(per_block)
    nats = float(values.sum()) / (4 * n)
    return NelboEstimate(0, nats, 0.1, 4 * n, 4 * n, n, 1.0, [0.0, 1.0], [nats], values, index)


def _facts(name: str, per_block: list[float], corruptions: str | None = "c1") -> RunFacts:
    return RunFacts(name, _estimate(per_block), corruptions, "validation")


def test_runs_on_another_corruption_stage_are_not_paired() -> None:
    a, b = _facts("a", [4.0, 5.0, 6.0]), _facts("b", [4.4, 5.5, 6.3])
    c = _facts("c", [4.4, 5.5, 6.3], corruptions="c2")
    table = compare([a, b, c])
    assert table.rows[1].diff == pytest.approx(paired_difference(b.bound, a.bound)[0])
    assert table.rows[2].diff is None and "c2" in table.rows[2].note
    assert not table.paired
    text = table.markdown()
    assert "not paired: corruption stage c2" in text and "cannot be paired" in text


def test_a_regression_is_flagged_only_beyond_the_threshold() -> None:
    champion = _facts("champion", [4.0, 5.0, 6.0, 5.0])
    worse = _facts("new", [4.2, 5.3, 6.1, 5.2])  # worse on every block: a large paired z
    diff, se = paired_difference(worse.bound, champion.bound)
    verdict = regression(worse, champion, 2.0)
    assert verdict.regressed and verdict.diff == pytest.approx(diff)
    assert verdict.z == pytest.approx(diff / se) and verdict.z > 2
    assert not regression(worse, champion, verdict.z + 0.01).regressed
    assert not regression(champion, worse, 2.0).regressed  # an improvement
    other = _facts("new", [4.2, 5.3, 6.1, 5.2], corruptions="c9")
    unpaired = regression(other, champion, 2.0)
    assert not unpaired.regressed and unpaired.diff is None and "not paired" in unpaired.reason


# ----------------------------------------------------------------------------- the sweep

GRID = ["train.lr=0.001,0.003", "data.seq_len=32,16"]
FAILING = "train.lr=0.003, data.seq_len=16"


def _overrides(root: Path) -> list[str]:
    return [f"data.root={root}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
            "ar_baseline=false", "sample.frontier_samples=0", "sample.n_samples=0",
            "sample.infill_examples=0", "sweep.max_concurrent=2"]  # fmt: skip


@pytest.fixture(scope="module")
def sweeps(prefect_harness, tmp_path_factory):
    """The sweep with its fourth point failing in training, then the same sweep again. Fails
    at once if the failed sweep left a data task's lock held (a point's tasks joined the point
    task's transaction, which the failure rolled back): the rerun would wait for ever."""
    from flows.pipeline import pipeline
    from maskdiff import train as train_lib

    root = tmp_path_factory.mktemp("sweep") / "runs"
    real = train_lib.train

    def failing(cfg, *args, **kwargs):
        if cfg.train.lr == 0.003 and cfg.data.seq_len == 16:
            raise RuntimeError("injected training failure")
        return real(cfg, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_lib, "train", failing)
    try:
        first = pipeline(preset=str(SMOKE), overrides=_overrides(root), grid=GRID,
                         return_state=True)  # fmt: skip
    finally:
        mp.undo()
    from prefect.settings import PREFECT_HOME

    held = ProcessLockManager(Path(PREFECT_HOME.value()) / "locks")
    locks = [p.name for p in held.lock_files_directory.glob("*.lock") if held.is_locked(p.stem)]
    if locks:  # the rerun would wait for them for ever (this process holds them)
        pytest.fail(f"the failed sweep left data task locks held: {locks}")
    folders_after_first = sorted(p.name for p in (root / "train").iterdir())
    second = pipeline(preset=str(SMOKE), overrides=_overrides(root), grid=GRID,
                      return_state=True)  # fmt: skip
    return {"root": root, "first": first, "second": second, "folders": folders_after_first}


def test_a_failed_point_leaves_the_others_finished(sweeps) -> None:
    first = sweeps["first"]
    assert first.is_failed() and first.name == "Failed points", first
    assert "1 of 4 points failed: point 4 (" + FAILING + ")" in first.message
    assert "injected training failure" in first.message
    result = first.result(raise_on_failure=False)
    assert [f["label"] for f in result["failed"]] == [FAILING]
    assert len(result["ran"]) == 4 and not result["reused"]
    assert [r["run"] for r in result["comparison"]] == [
        "train.lr=0.001, data.seq_len=32", "train.lr=0.001, data.seq_len=16",
        "train.lr=0.003, data.seq_len=32",
    ]  # fmt: skip
    report = result["report"]
    assert "## Failed points" in report and "injected training failure" in report


def test_started_again_the_sweep_trains_only_the_failed_point(sweeps) -> None:
    second = sweeps["second"]
    assert second.is_completed(), second
    result = second.result()
    assert result["ran"] == [FAILING]
    assert len(result["reused"]) == 3 and not result["failed"]
    assert len(result["comparison"]) == 4
    # the three finished training folders were not touched again; one more run of training
    train = sorted(p.name for p in (sweeps["root"] / "train").iterdir())
    assert set(sweeps["folders"]) <= set(train)
    record = json.loads(Path(result["record"]).read_text())
    assert sorted(e["status"] for e in record["points"].values()) == ["finished"] * 4


def test_data_stages_are_built_once_per_data_config(sweeps) -> None:
    data = sweeps["root"] / "data"
    corruptions = sorted(p.name for p in data.glob("corruptions-*"))
    blocks = sorted(p.name for p in data.glob("blocks-*"))
    assert len(corruptions) == 2 and len(blocks) == 2, (corruptions, blocks)
    assert len(list(data.glob("documents-*"))) == 1  # seq_len does not change the documents
    first = sweeps["first"].result(raise_on_failure=False)
    assert sorted(Path(p).name for p in first["data_stages"].values()) == corruptions


def test_the_points_are_children_of_one_mlflow_run(sweeps) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{sweeps['root']}/mlflow.db")
    experiment = client.get_experiment_by_name("maskdiff")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert parent.data.tags["maskdiff.sweep"] == sweeps["second"].result()["sweep"]
    assert parent.info.status == "FINISHED"  # reopened by the second start, closed again
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = [r for r in children if r.info.status == "FINISHED"]
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(finished) == 4 and len(failed) == 1
    values = {(r.data.params["train.lr"], r.data.params["data.seq_len"]) for r in finished}
    assert values == {("0.001", "32"), ("0.001", "16"), ("0.003", "32"), ("0.003", "16")}
    assert failed[0].data.tags["maskdiff.sweep_point"] == FAILING
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/bound_by_train.lr.png", "plots/bound_by_data.seq_len.png",
                     "plots/validation_curves.png"}  # fmt: skip


def test_the_paired_se_is_paired_difference_on_the_stored_terms(sweeps) -> None:
    result = sweeps["second"].result()
    rows = {r["run"]: r for r in result["comparison"]}
    record = json.loads(Path(result["record"]).read_text())
    bounds, stages = {}, {}
    for entry in record["points"].values():
        summary = json.loads(Path(entry["summary"]).read_text())
        scores = summary["evaluation"]["scores"]["validation"]
        stored = SplitScores.from_json(json.loads(Path(scores["scores_file"]).read_text()))
        bounds[entry["label"]] = stored.mdm.continuous
        stages[entry["label"]] = summary["stage_hashes"]["corruptions"]
    base = "train.lr=0.001, data.seq_len=32"
    assert rows[base]["baseline"]
    paired = [k for k in rows if k != base and stages[k] == stages[base]]
    assert paired == ["train.lr=0.003, data.seq_len=32"]
    for label in paired:
        diff, se = paired_difference(bounds[label], bounds[base])
        assert rows[label]["diff"] == pytest.approx(diff, rel=1e-12)
        assert rows[label]["diff_se"] == pytest.approx(se, rel=1e-12)
        assert rows[label]["z"] == pytest.approx(diff / se, rel=1e-12)
        # the paired SE is far below either bound's own SE (the blocks' variation cancels)
        assert se < 0.5 * rows[label]["bound_se"]
    for label in set(rows) - {base, *paired}:  # another corruption stage: not paired
        assert rows[label]["diff"] is None and "corruption stage" in rows[label]["note"]
    assert all(math.isfinite(r["bound_nats_per_token"]) for r in rows.values())
