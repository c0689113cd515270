"""The CUDA path: bf16 training, float32 loss, compile, exact resume, checkpoints that travel to
the CPU, the evaluator and the sampler on the GPU. Marked ``gpu``: skipped without a CUDA device,
run by ``make gpu-check`` (``pytest -m gpu``). Imports nothing of Prefect, MLflow or pandera.

``MASKDIFF_TEST_DEVICE=cpu`` runs the same tests on the CPU (bf16 autocast there too), to check
the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import L, V, tiny_config, write_corpus

from maskdiff.checkpoint import load_model
from maskdiff.config import Config
from maskdiff.data.evalset import stratified_corruptions
from maskdiff.evaluate import evaluate_blocks
from maskdiff.loss import Objective
from maskdiff.model import build_model
from maskdiff.sampling import ancestral_sample
from maskdiff.schedule import make_schedule
from maskdiff.train import TrainResult, train

DEVICE = os.environ.get("MASKDIFF_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason=f"needs a CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})",
    ),
]


def _cfg(**train: object) -> Config:
    cfg = tiny_config(**train)
    cfg.runtime.device, cfg.runtime.precision, cfg.runtime.num_threads = DEVICE, "bf16", 1
    return cfg


def _losses(result: TrainResult) -> list[float]:
    return [m["loss"] for _, m in result.history]


def test_bf16_training_reduces_the_loss(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path)
    losses = _losses(train(_cfg(max_steps=150), blocks, tmp_path / "run", vocab_size=V))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_loss_is_float32_under_autocast() -> None:
    cfg = _cfg()
    model = build_model(cfg.model, V).to(DEVICE)
    objective = Objective(model, make_schedule(cfg.diffusion), cfg.diffusion.t_min)
    x0 = torch.randint(0, V, (4, L), device=DEVICE)
    t = torch.full((4,), 0.5, device=DEVICE)
    x_t = torch.where(torch.rand(4, L, device=DEVICE) < 0.5, model.mask_id, x0)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        logits = model.real_logits(x_t, t)
        loss = objective(x0, x_t, t)
    assert logits.dtype == torch.bfloat16  # the matmuls did run in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_compile_and_eager_losses_agree(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path)
    eager = train(_cfg(max_steps=10), blocks, tmp_path / "eager", vocab_size=V)
    compiled = train(_cfg(max_steps=10, compile=True), blocks, tmp_path / "comp", vocab_size=V)
    # the first steps to bf16 rounding (a model started from other weights is 1% off there),
    # then a looser bound as the two drift apart; both tolerances await a GPU measurement
    assert _losses(compiled)[:3] == pytest.approx(_losses(eager)[:3], rel=3e-3)
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=2e-2)


def test_exact_resume(tmp_path: Path) -> None:
    """10 steps + resume + 10 steps give the losses of 20 straight steps, to 1% (GPU kernels
    with atomics, e.g. the embedding's backward, are not bit-reproducible)."""
    blocks, _ = write_corpus(tmp_path)
    straight = train(_cfg(max_steps=20), blocks, tmp_path / "straight", vocab_size=V)
    train(_cfg(max_steps=20), blocks, tmp_path / "resumed", vocab_size=V, stop_at_step=10)
    resumed = train(_cfg(max_steps=20), blocks, tmp_path / "resumed", vocab_size=V)
    assert resumed.resumed_from == 10
    assert _losses(resumed) == pytest.approx(_losses(straight)[10:], rel=1e-2, abs=1e-3)


def test_gpu_checkpoint_loads_on_cpu(tmp_path: Path) -> None:
    blocks, _ = write_corpus(tmp_path)
    res = train(_cfg(max_steps=5), blocks, tmp_path / "run", vocab_size=V)
    model, _ = load_model(res.checkpoint_path, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    x = torch.randint(0, V, (2, L))
    assert torch.isfinite(model.real_logits(x, torch.full((2,), 0.5))).all()


def test_evaluator_gpu_equals_cpu(tmp_path: Path) -> None:
    """The same weights and the same corruptions give the same bound on both devices."""
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, V)
    sched = make_schedule(cfg.diffusion)
    x0 = torch.randint(0, V, (24, L))
    corr = stratified_corruptions(x0, 4, sched, torch.Generator().manual_seed(0))
    n_bytes = torch.full((24,), L)
    on_cpu = evaluate_blocks(model, x0, n_bytes, [corr], sched, V, device="cpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32  # float32 against float32, not TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_dev = evaluate_blocks(model.to(DEVICE), x0, n_bytes, [corr], sched, V, device=DEVICE)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = on_cpu.estimates[0].nats_per_token, on_dev.estimates[0].nats_per_token
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_sampler_runs_on_the_device() -> None:
    cfg = _cfg()
    model = build_model(cfg.model, V).to(DEVICE).eval()
    out = ancestral_sample(model, make_schedule(cfg.diffusion), V, n_samples=3, length=L, steps=8,
                           generator=torch.Generator().manual_seed(0), device=DEVICE)  # fmt: skip
    assert out.tokens.shape == (3, L)
    assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < V  # no mask token left
