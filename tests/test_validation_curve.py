"""The validation curve during training: its steps, its values, the best checkpoint, patience,
the time budget, and resumption of all of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CPU, build_stages, smoke_config

from maskdiff.checkpoint import best_checkpoint_path, load_checkpoint, load_model
from maskdiff.config import Config
from maskdiff.heldout import HeldOut
from maskdiff.train import TrainResult, train


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("curve") / "runs"
    _, _, blocks, corr = build_stages(smoke_config(root, *CPU), root)
    stats = blocks.manifest["stats"]
    return {"root": root, "blocks": blocks.path, "corruptions": corr.path, "stats": stats}


def config(stages: dict, *overrides: str) -> Config:
    base = [*CPU, "corruption.mode=online", "train.eval_every=5", "train.eval_blocks=8"]
    return smoke_config(stages["root"], *base, *overrides)


def fit(cfg: Config, stages: dict, out: Path, logged: list | None = None, **kw) -> TrainResult:
    stats = stages["stats"]
    return train(
        cfg,
        stages["blocks"],
        out,
        vocab_size=stats["vocab_size"],
        tokenizer_hash=stats["tokenizer_hash"],
        validation_dir=stages["corruptions"],
        log_metrics=None if logged is None else (lambda s, m: logged.append((s, m))),
        **kw,
    )


@pytest.fixture(scope="module")
def straight(stages: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, list]:
    logged: list = []
    return fit(config(stages), stages, tmp_path_factory.mktemp("straight"), logged), logged


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_curve_is_logged_at_the_right_steps(stages: dict, tmp_path: Path, kind: str) -> None:
    logged: list = []
    result = fit(config(stages, f"model.kind={kind}"), stages, tmp_path, logged)
    name = "val.nelbo" if kind == "mdm" else "val.ar_nll"
    points = [(s, m) for s, m in logged if name in m]
    assert [s for s, _ in points] == [5, 10, 15, 20]
    assert [s for s, _ in result.curve] == [5, 10, 15, 20]
    for (_, logged_m), (_, kept) in zip(points, result.curve, strict=True):
        assert logged_m == kept and kept[f"{name}_se"] > 0
        assert set(kept) == {name, f"{name}_se"}
    assert all("loss" in m for s, m in logged if name not in m)  # training windows unchanged


def test_curve_is_identical_on_a_rerun(stages: dict, straight: tuple, tmp_path: Path) -> None:
    again = fit(config(stages), stages, tmp_path)
    assert again.curve == straight[0].curve


def test_best_checkpoint_is_the_argmin_of_the_curve(stages: dict, straight: tuple) -> None:
    result: TrainResult = straight[0]
    values = [(m["val.nelbo"], s) for s, m in result.curve]
    best_value, best_step = min(values)
    assert result.best == {"step": best_step, "value": best_value}
    assert result.best_checkpoint == best_checkpoint_path(result.checkpoint_path.parent)
    ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["step"] == best_step
    # the weights in best.pt score exactly the best value on the held-out subset
    cfg = config(stages)
    held = HeldOut.load(cfg, stages["blocks"], stages["corruptions"], stages["stats"]["vocab_size"])
    model, _ = load_model(result.best_checkpoint, use_ema=True)
    assert held is not None
    assert held.score(model, torch.device("cpu"))["val.nelbo"] == pytest.approx(best_value, 1e-12)


def test_resume_keeps_the_curve_and_the_best(stages: dict, straight: tuple, tmp_path: Path) -> None:
    first = fit(config(stages), stages, tmp_path, stop_at_step=10)
    assert [s for s, _ in first.curve] == [5, 10]
    resumed = fit(config(stages), stages, tmp_path)
    assert resumed.resumed_from == 10
    assert resumed.curve == straight[0].curve
    assert resumed.best == straight[0].best


def test_time_budget_stops_at_a_checkpoint_and_the_run_resumes(
    stages: dict, straight: tuple, tmp_path: Path
) -> None:
    # a budget spent at once: the call ends at its first metric window (step 5)
    cut = fit(config(stages, "train.max_minutes=1e-9"), stages, tmp_path)
    assert cut.stopped == "time" and cut.step == 5
    assert cut.checkpoint_path.is_file() and load_checkpoint(cut.checkpoint_path)["step"] == 5
    rest = fit(config(stages), stages, tmp_path)
    assert rest.resumed_from == 5 and rest.step == 20 and rest.stopped is None
    assert rest.curve == straight[0].curve  # the schedule was fixed by max_steps up front
    a = load_checkpoint(rest.checkpoint_path)["model"]
    b = load_checkpoint(straight[0].checkpoint_path)["model"]
    assert all((a[k] == b[k]).all() for k in a)


def test_patience_ends_the_run_for_good(stages: dict, tmp_path: Path) -> None:
    # a learning rate too small to move float32 weights: no point after the first is a new best
    frozen = ["train.lr=1e-20", "train.ema=0", "train.eval_every=2", "train.patience=2"]
    result = fit(config(stages, *frozen), stages, tmp_path)
    assert result.stopped == "patience" and result.step == 6
    assert [s for s, _ in result.curve] == [2, 4, 6] and result.best["step"] == 2
    again = fit(config(stages, *frozen), stages, tmp_path)
    assert again.step == 6 and again.stopped == "patience" and again.resumed_from == 6


def test_masked_model_has_no_curve_without_a_corruption_stage(stages: dict, tmp_path: Path) -> None:
    result = fit(config(stages, "model.kind=mdm"), stages | {"corruptions": None}, tmp_path)
    assert result.curve == [] and result.best is None and result.best_checkpoint is None


def test_eval_checkpoint_best_scores_best_pt(stages: dict, tmp_path: Path) -> None:
    from flows.pipeline import scored_checkpoint
    from tasks import model as model_tasks

    # a learning rate this high makes the EMA weights worse after step 2: best != last
    cfg = config(stages, "train.lr=0.3", "train.ema=0.9", "train.eval_every=2")
    result = fit(cfg, stages, tmp_path)
    assert result.best is not None and result.best["step"] < result.step
    models = {
        "checkpoint": str(result.checkpoint_path),
        "best_checkpoint": str(result.best_checkpoint),
    }
    data = {"blocks": str(stages["blocks"]), "corruptions": str(stages["corruptions"])}
    scores = {}
    for which in ("last", "best"):
        chosen = config(stages, f"eval.checkpoint={which}")
        ckpt = scored_checkpoint(chosen, models)
        assert ckpt == models["checkpoint" if which == "last" else "best_checkpoint"]
        out = model_tasks.evaluate.fn(chosen, data, ckpt, None)
        scores[which] = out["validation"]["mdm"]["nelbo.continuous.nats_per_token"]
    best_weights = load_checkpoint(result.best_checkpoint)["ema"]
    last_weights = load_checkpoint(result.checkpoint_path)["ema"]
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)
    assert scores["best"] < scores["last"]
