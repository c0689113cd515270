"""The CUDA path: bf16 training, float32 loss, compile, exact resume, checkpoints that travel to
the CPU, the evaluator and the sampler on the device. Marked ``gpu`` (``make gpu-check`` runs
them with ``pytest -m gpu``). Imports nothing of Prefect, MLflow or pandera.

The device is ``MASKDIFF_TEST_DEVICE`` (``cuda`` or ``cpu``), by default CUDA where there is one,
else the CPU: the whole suite runs these tests on the CPU (bf16 autocast there too), so their
assertions run on every change, and on a GPU the same tests run on CUDA. Asking for ``cuda``
where there is none skips them, with the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import L, V, tiny_config, write_corpus

from maskdiff.checkpoint import load_model
from maskdiff.config import Config
from maskdiff.data.evalset import grid_corruptions, stratified_corruptions
from maskdiff.evaluate import evaluate_blocks
from maskdiff.loss import Objective
from maskdiff.model import build_model
from maskdiff.sampling import ancestral_sample
from maskdiff.schedule import make_schedule
from maskdiff.train import TrainResult, train

DEVICE = os.environ.get("MASKDIFF_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        CUDA and not torch.cuda.is_available(),
        reason=f"MASKDIFF_TEST_DEVICE=cuda but torch {torch.__version__} sees no CUDA device",
    ),
]


def _cfg(**train: object) -> Config:
    cfg = tiny_config(**train)
    cfg.runtime.device, cfg.runtime.precision, cfg.runtime.num_threads = DEVICE, "bf16", 1
    return cfg


def _losses(result: TrainResult) -> list[float]:
    return [m["loss"] for _, m in result.history]


def _pattern_blocks(n: int, seed: int) -> torch.Tensor:
    """(n, L) blocks of write_corpus's pattern (x_{l+1} = x_l + s mod V), drawn afresh."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    stride = torch.where(torch.rand(n, 1, generator=g) < 0.8, 1, 2)
    return (start + stride * torch.arange(L)) % V


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """150 bf16 steps on the device (about 4 s on a CPU): the model the tests below judge."""
    root = tmp_path_factory.mktemp("trained")
    blocks, _ = write_corpus(root)
    return train(_cfg(max_steps=150), blocks, root / "run", vocab_size=V)


def test_bf16_training_reduces_the_loss(trained: TrainResult) -> None:
    losses = _losses(trained)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # the pattern is learnable to far below its start (mean of 5 steps against step noise);
    # a step that does not update the weights, or bf16 gradients lost to underflow, stays near
    # first: 20% is what the 150 steps reach with room to spare on CPU and GPU alike
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
    # Same weights, same batches: the only difference is the order compiled kernels round in
    # (fused ops, bf16). First 3 steps: 0.3%, bf16 rounding of one step's loss (a model started
    # from other weights is already 1% off there). All 10 steps: 2%, as the two runs' rounding
    # compounds through the updates. A compiled graph that drops or repeats an update, or
    # computes another loss, is off by more than 2% within the first steps.
    assert _losses(compiled)[:3] == pytest.approx(_losses(eager)[:3], rel=3e-3)
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=2e-2)


def test_exact_resume(tmp_path: Path) -> None:
    """10 steps + resume + 10 steps give the losses of 20 straight steps."""
    blocks, _ = write_corpus(tmp_path)
    straight = train(_cfg(max_steps=20), blocks, tmp_path / "straight", vocab_size=V)
    train(_cfg(max_steps=20), blocks, tmp_path / "resumed", vocab_size=V, stop_at_step=10)
    resumed = train(_cfg(max_steps=20), blocks, tmp_path / "resumed", vocab_size=V)
    assert resumed.resumed_from == 10
    # CPU kernels are deterministic: the resumed run is the straight one to float rounding.
    # GPU kernels with atomics (the embedding's backward) are not bit-reproducible: 1%, which a
    # resume that loses the optimizer state, the EMA or the data position exceeds.
    rel = 1e-2 if CUDA else 1e-6
    assert _losses(resumed) == pytest.approx(_losses(straight)[10:], rel=rel, abs=1e-3 * rel)


def test_gpu_checkpoint_loads_on_cpu(trained: TrainResult) -> None:
    """The device's checkpoint loads on the CPU and gives the device's logits there."""
    on_cpu, _ = load_model(trained.checkpoint_path, device="cpu")
    on_dev, _ = load_model(trained.checkpoint_path, device=DEVICE)
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    x = _pattern_blocks(4, seed=1)
    t = torch.full((4,), 0.5)
    with torch.no_grad(), _no_tf32():
        a = on_cpu.real_logits(x, t)
        b = on_dev.real_logits(x.to(DEVICE), t.to(DEVICE)).cpu()
    # float32 on both sides (TF32 off): only the order of the sums differs across devices
    assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@contextmanager
def _no_tf32() -> Iterator[None]:
    """float32 matmuls in float32 on the GPU (TF32 rounds to 10 bits: 1e-3, not a device gap)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_evaluator_on_the_device_equals_the_cpu_reference(trained: TrainResult) -> None:
    """The trained checkpoint's every NELBO row (continuous, T = 8, T = 32) on the device, in
    float32, equals the CPU evaluator's in float64 on the same weights and corruptions: the
    value, its SE, each block's term and the curve over t."""
    model, cfg = load_model(trained.checkpoint_path, device=DEVICE)
    reference, _ = load_model(trained.checkpoint_path, device="cpu")
    reference = reference.double()  # float64 on the CPU: the reference to float32 rounding
    sched = make_schedule(cfg.diffusion)
    x0 = _pattern_blocks(32, seed=2)  # fresh blocks of the training pattern
    g = torch.Generator().manual_seed(0)
    corr = [stratified_corruptions(x0, 4, sched, g), grid_corruptions(x0, 8, sched, g),
            grid_corruptions(x0, 32, sched, g)]  # fmt: skip
    n_bytes = torch.full((32,), L)
    ref = evaluate_blocks(reference, x0, n_bytes, corr, sched, V, device="cpu")
    with _no_tf32():
        got = evaluate_blocks(model, x0, n_bytes, corr, sched, V, device=DEVICE)
    assert [e.T for e in got.estimates] == [e.T for e in ref.estimates] == [0, 8, 32]
    # trained, not uniform: the bound is well below log V (1.56 against 2.08 nats after the
    # 150 steps), so the device's logits matter (a uniform model scores log V whatever the
    # device computes)
    assert ref.estimates[0].nats_per_token < 0.85 * math.log(V)
    for a, b in zip(got.estimates, ref.estimates, strict=True):
        # float32 against float64 through 2 layers and a log-softmax over V: measured on the
        # CPU 2e-8 relative on each value and at most 5e-7 on a block's term. The value's 1e-5
        # leaves room for the GPU's summation order and still catches bf16 logits (3e-5 here,
        # tests/test_gpu_check.py); a block's term and the curve, sums of fewer rows, 1e-4
        assert a.nats_per_token == pytest.approx(b.nats_per_token, rel=1e-5), a.label
        assert a.se == pytest.approx(b.se, rel=1e-3, abs=1e-6), a.label
        assert torch.allclose(a.per_block, b.per_block, rtol=1e-4, atol=1e-5), a.label
        assert a.curve == pytest.approx(b.curve, rel=1e-4, abs=1e-6), a.label


def test_sampler_runs_on_the_device(trained: TrainResult) -> None:
    model, cfg = load_model(trained.checkpoint_path, device=DEVICE)
    out = ancestral_sample(model, make_schedule(cfg.diffusion), V, n_samples=3, length=L, steps=8,
                           generator=torch.Generator().manual_seed(0), device=DEVICE)  # fmt: skip
    assert out.tokens.shape == (3, L)
    assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < V  # no mask token left
