"""The training loop on a tiny corpus: it learns, reports, accumulates and resumes; the GPU code
paths run on the CPU; a model left in training mode is scored and sampled in eval mode."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, write_corpus

from maskdiff.checkpoint import load_model
from maskdiff.config import SampleConfig
from maskdiff.elbo import unigram_log_probs
from maskdiff.evaluate import evaluate_ar, evaluate_blocks, stratified_corruptions
from maskdiff.model import build_model
from maskdiff.sampling import generate
from maskdiff.schedule import LinearSchedule
from maskdiff.train import learning_rate, train

V, L = 8, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_corpus(
        tmp_path_factory.mktemp("train"), n_blocks=128, seq_len=L, vocab=V, strides=(0, 1)
    )


@pytest.mark.parametrize(
    ("kind", "mode"), [("mdm", "online"), ("mdm", "precomputed"), ("ar", "online")]
)
def test_loss_is_finite_and_decreases_over_50_steps(
    corpus: tuple[Path, Path], tmp_path: Path, kind: str, mode: str
) -> None:
    cfg = tiny_config()
    cfg.model.kind = kind  # type: ignore[assignment]
    cfg.corruption.mode = mode  # type: ignore[assignment]
    logged: list[tuple[int, dict[str, float]]] = []
    result = train(cfg, corpus[0], tmp_path, vocab_size=V, corruptions_dir=corpus[1],
                   log_metrics=lambda s, m: logged.append((s, m)))  # fmt: skip
    losses = [m["loss"] for _, m in logged]
    assert [s for s, _ in logged] == list(range(1, 51))
    assert all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)
    if kind == "ar":
        assert first > 0.8 * math.log(V)  # starts near uniform over m tokens
    assert result.step == 50 and result.checkpoint_path.is_file()
    metrics = logged[-1][1]
    assert set(metrics) == {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb",
                            "step_time_s", "step_time_max_s", "work_time_s", "work_time_max_s",
                            "straggler_ratio"}  # fmt: skip
    assert metrics["tokens_per_s"] > 0 and 0 < metrics["mfu"] < 1 and metrics["memory_gb"] > 0
    assert metrics["lr"] == pytest.approx(learning_rate(49, cfg.train))


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = tiny_config(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1).train
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.55)
    assert learning_rate(100, cfg) == pytest.approx(0.1)
    cfg.lr_schedule = "constant"
    assert learning_rate(80, cfg) == 1.0


def test_gradient_accumulation_matches_the_full_batch(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    runs = {}
    for accum in (1, 4):
        cfg = tiny_config(max_steps=6, grad_accum=accum)
        runs[accum] = train(cfg, corpus[0], tmp_path / str(accum), vocab_size=V)
    for (_, a), (_, b) in zip(runs[1].history, runs[4].history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_a_finished_run_is_not_trained_again(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = tiny_config(max_steps=4)
    first = train(cfg, corpus[0], tmp_path, vocab_size=V)
    before = torch.load(first.checkpoint_path, weights_only=True)["model"]
    again = train(cfg, corpus[0], tmp_path, vocab_size=V)
    assert again.step == 4 and again.history == [] and again.resumed_from == 4
    assert again.metrics == first.metrics
    after = torch.load(again.checkpoint_path, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@contextmanager
def linear_output_dtypes() -> Iterator[set[torch.dtype]]:
    """The dtypes of every ``nn.Linear`` output computed inside the block (a global hook)."""
    seen: set[torch.dtype] = set()

    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Linear):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("variant", ["compile", "bf16"])
def test_gpu_code_paths_run_on_the_cpu(
    corpus: tuple[Path, Path], tmp_path: Path, variant: str
) -> None:
    """``torch.compile`` and bf16 autocast, the GPU defaults, train the same model as eager
    float32 (compile: same losses to float32 rounding; bf16: to bf16 rounding), and their
    checkpoints load as plain models. bf16 must really run: the matmuls give bf16 outputs, and
    the losses move off the float32 ones by more than float32 rounding (about 1e-7)."""
    runs, dtypes = {}, {}
    for name in ("eager", variant):
        cfg = tiny_config(max_steps=6, compile=name == "compile")
        if name == "bf16":
            cfg.runtime.precision = "bf16"
        watch = linear_output_dtypes() if name != "compile" else nullcontext(set())
        with watch as seen:
            runs[name] = train(cfg, corpus[0], tmp_path / name, vocab_size=V)
        dtypes[name] = seen
    tol = 1e-4 if variant == "compile" else 2e-2
    pairs = list(zip(runs["eager"].history, runs[variant].history, strict=True))
    for (_, a), (_, b) in pairs:
        assert b["loss"] == pytest.approx(a["loss"], rel=tol)
    assert dtypes["eager"] == {torch.float32}
    if variant == "bf16":
        assert dtypes["bf16"] == {torch.bfloat16}
        moved = max(abs(b["loss"] / a["loss"] - 1) for (_, a), (_, b) in pairs)
        assert moved > 1e-5, moved
    eager, _ = load_model(runs["eager"].checkpoint_path)
    other, _ = load_model(runs[variant].checkpoint_path)
    x = torch.randint(0, V, (2, L))
    x[:, ::2] = eager.mask_id  # half the positions masked: those logits are the model's
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.allclose(eager(x, t), other(x, t), atol=tol * 10, rtol=tol * 10)


class ModeRecorder(torch.nn.Module):
    """A model that records ``self.training`` at every forward, then runs ``inner``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        self.modes.append(self.training)
        return self.inner(x, t)


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_a_model_in_training_mode_is_scored_and_sampled_in_eval_mode(kind: str) -> None:
    """The evaluator and the sampler run every forward in eval mode (dropout 0.5 off: the same
    numbers as the model put in eval mode by hand) and leave the model in training mode."""
    torch.manual_seed(0)
    cfg = tiny_config().model.model_copy(update={"kind": kind, "dropout": 0.5})
    model = ModeRecorder(build_model(cfg, V)).train()
    g = torch.Generator().manual_seed(1)
    x0, n_bytes = torch.randint(0, V, (12, L), generator=g), torch.full((12,), L)
    sched = LinearSchedule()
    corr = [stratified_corruptions(x0, 2, sched, g)]

    def score() -> torch.Tensor:
        if kind == "mdm":
            return evaluate_blocks(model, x0, n_bytes, corr, sched, V).estimates[0].per_block
        ar = evaluate_ar(model, x0, n_bytes, V, unigram_log_probs(x0, V))
        return torch.tensor(ar.nats_per_token)

    scored = score()
    assert model.modes and not any(model.modes) and model.training
    model.eval()
    assert torch.equal(scored, score())  # dropout was off
    if kind == "mdm":
        model.train()
        model.modes.clear()
        generate(model, sched, V, SampleConfig(n_samples=2, steps=4), L)
        assert model.modes and not any(model.modes) and model.training
