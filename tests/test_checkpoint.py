"""Checkpoints: exact resume, refusal of foreign checkpoints, atomic self-describing files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_corpus

from maskdiff.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    run_fingerprint,
    save_checkpoint,
    training_identity,
)
from maskdiff.config import Config
from maskdiff.train import train

V, L = 8, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("ckpt"), n_blocks=64, seq_len=L, vocab=V)


def _weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = load_checkpoint(path)
    return {"model": ckpt["model"], "ema": ckpt["ema"]}


def _changed(cfg: Config, section: str, **update: object) -> Config:
    part = getattr(cfg, section).model_copy(update=update)
    return cfg.model_copy(update={section: part})


def test_the_folder_key_and_the_resume_fingerprint_are_cut_from_one_source(tmp_path: Path) -> None:
    blocks, corr = str(tmp_path / "blocks"), str(tmp_path / "corr")
    for stage in (blocks, corr):  # finished stages, as far as the key reads them
        Path(stage).mkdir()
        (Path(stage) / "manifest.json").write_text(json.dumps({"content_hash": stage[-5:]}))
    cfg = tiny_config()
    key, fingerprint = training_identity(cfg, blocks, corr), run_fingerprint(cfg, V, "tok")
    # every setting a resume must match is part of the folder key, with the same value
    settings = {k: v for k, v in fingerprint.items() if k not in ("vocab_size", "tokenizer_hash")}
    assert settings and settings == {k: key["settings"][k] for k in settings}
    # a change of a training setting gives another folder and refuses the old checkpoints
    for changed in (
        tiny_config(lr=5e-3),
        _changed(cfg, "model", d_model=64),
        _changed(cfg, "corruption", seed=cfg.corruption.seed + 1),  # online masks follow it
        _changed(cfg, "data", seq_len=L // 2),
    ):
        assert training_identity(changed, blocks, corr) != key
        assert run_fingerprint(changed, V, "tok") != fingerprint
    # a longer run is another folder, but may resume this run's checkpoints
    longer = tiny_config(max_steps=100)
    assert training_identity(longer, blocks, corr) != key
    assert run_fingerprint(longer, V, "tok") == fingerprint
    # the time budget is neither: a run stopped by it is resumed whatever the next budget
    budget = tiny_config(max_minutes=3.0)
    assert training_identity(budget, blocks, corr) == key
    assert run_fingerprint(budget, V, "tok") == fingerprint


@pytest.mark.parametrize("mode", ["online", "precomputed"])
def test_ten_plus_resume_plus_ten_equals_twenty_straight(
    corpus: tuple[Path, Path], tmp_path: Path, mode: str
) -> None:
    cfg = tiny_config(max_steps=20, warmup_steps=3, grad_accum=2, checkpoint_every=4)
    cfg.corruption.mode = mode  # type: ignore[assignment]
    blocks, corr = corpus
    straight = train(cfg, blocks, tmp_path / "a", vocab_size=V, corruptions_dir=corr)
    first = train(cfg, blocks, tmp_path / "b", vocab_size=V, corruptions_dir=corr, stop_at_step=10)
    assert first.step == 10
    second = train(cfg, blocks, tmp_path / "b", vocab_size=V, corruptions_dir=corr)
    assert second.resumed_from == 10 and second.step == 20
    losses = [m["loss"] for _, m in first.history + second.history]
    assert losses == [m["loss"] for _, m in straight.history]  # bit for bit
    a, b = _weights(straight.checkpoint_path), _weights(second.checkpoint_path)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [  # pruned to 2, no temp files
        "ckpt-00000016.pt",
        "ckpt-00000020.pt",
    ]


def test_a_checkpoint_of_another_config_is_refused_by_name(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    train(tiny_config(max_steps=2), corpus[0], tmp_path, vocab_size=V)
    other = tiny_config(max_steps=4)
    other.model.d_model = 64
    with pytest.raises(CheckpointError) as info:
        train(other, corpus[0], tmp_path, vocab_size=V)
    msg = str(info.value)
    assert "model.d_model: checkpoint 32 vs config 64" in msg and "ckpt-00000002.pt" in msg
    with pytest.raises(CheckpointError, match=r"tokenizer_hash: checkpoint '' vs config 'abc'"):
        train(tiny_config(max_steps=4), corpus[0], tmp_path, vocab_size=V, tokenizer_hash="abc")
    # the length of the run and its logging may change: this resumes
    assert train(tiny_config(max_steps=3, log_every=2), corpus[0], tmp_path, vocab_size=V).step == 3


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "ckpt-00000001.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="ckpt-00000001.pt is not a readable"):
        load_checkpoint(junk)
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(CheckpointError, match="is not a maskdiff checkpoint"):
        load_checkpoint(junk)


def test_checkpoint_is_self_describing_and_loads_the_ema_model(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg = tiny_config(max_steps=3)
    result = train(cfg, corpus[0], tmp_path, vocab_size=V, tokenizer_hash="tok123")
    ckpt = load_checkpoint(result.checkpoint_path)  # weights_only=True inside
    assert ckpt["version"] == FORMAT_VERSION and ckpt["step"] == 3
    assert ckpt["fingerprint"]["tokenizer_hash"] == "tok123" and ckpt["vocab_size"] == V
    assert json.loads(ckpt["config"])["model"]["d_model"] == 32
    assert ckpt["rows_consumed"] == 48
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and "state" in ckpt["optimizer"]
    assert ckpt["num_threads"] == 1  # runtime.num_threads of tiny_config
    model, loaded_cfg = load_model(result.checkpoint_path)
    assert loaded_cfg == cfg and not model.training
    assert all(torch.equal(p, ckpt["ema"][n]) for n, p in model.named_parameters())
    logits = model(torch.full((2, L), V), torch.rand(2))
    assert logits.shape == (2, L, V + 1)


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from maskdiff.config import Config
from maskdiff.train import train
cfg = tiny_config(max_steps=100000, checkpoint_every=5, log_every=50)
train(cfg, {blocks!r}, {out!r}, vocab_size=8)
"""


def test_sigkill_loses_only_the_work_since_the_last_checkpoint(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code = _CHILD.format(tests=str(Path(__file__).parent), blocks=str(corpus[0]), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while latest_checkpoint(out) is None or latest_checkpoint(out).name < "ckpt-00000015.pt":
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    crashed = latest_checkpoint(out)
    assert crashed is not None
    step = load_checkpoint(crashed)["step"]  # the newest file is complete (atomic rename)
    assert step % 5 == 0 and step >= 15
    target = step + 5
    resumed = train(tiny_config(max_steps=100000, checkpoint_every=5), corpus[0], out,
                    vocab_size=V, stop_at_step=target)  # fmt: skip
    assert resumed.resumed_from == step
    straight = train(tiny_config(max_steps=100000, checkpoint_every=5), corpus[0],
                     tmp_path / "straight", vocab_size=V, stop_at_step=target)  # fmt: skip
    assert resumed.history[-1][1]["loss"] == straight.history[-1][1]["loss"]


class _SignalsWhilePickled:
    """Pickles as an empty dict, sending this process SIGTERM while torch.save writes it."""

    def __reduce__(self) -> tuple:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary: inside the save
        return (dict, ())


def test_a_signal_during_a_save_takes_effect_once_the_file_is_written(tmp_path: Path) -> None:
    """Before: the interrupt, raised inside torch's write callback, came out as RuntimeError
    ("unexpected pos ...") and a run stopped by Ctrl-C was recorded as failed."""
    order: list[str] = []

    def interrupt(signum: int, frame: object) -> None:
        order.append("handler")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.ones(3), "x": _SignalsWhilePickled()})
            order.append("returned")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert order == ["handler"]  # raised after the write, before the caller went on
    assert signal.getsignal(signal.SIGTERM) is previous
    # whole and in place (the test's object pickles as a call of dict: not weights_only)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["x"] == {} and torch.equal(ckpt["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*tmp*"))
