"""Score trained checkpoints on the data stages: the MDM bound, the AR baseline, samples.

This composes :mod:`maskdiff.checkpoint`, :mod:`maskdiff.evaluate` and :mod:`maskdiff.sampling`
for the pipeline and the command line; it knows nothing of Prefect or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskdiff.checkpoint import load_model
from maskdiff.config import Config
from maskdiff.data.contracts import read_blocks
from maskdiff.data.stage import list_shards, read_manifest
from maskdiff.data.tokenizer import load_tokenizer
from maskdiff.elbo import unigram_log_probs
from maskdiff.evaluate import (
    ARResult,
    EvalResult,
    comparison_table,
    evaluate_ar,
    evaluate_stage,
)
from maskdiff.runtime import resolve_runtime
from maskdiff.sampling import SampleStats, decode_samples, generate, sample_statistics
from maskdiff.schedule import make_schedule

__all__ = ["SampleOutput", "SplitScores", "first_token_model", "sample_checkpoint", "score"]


@dataclass
class SplitScores:
    """One split: every MDM bound row, the AR row, and the markdown comparison table."""

    mdm: EvalResult
    ar: ARResult | None
    table: str

    def metrics(self) -> dict[str, float]:
        out = {f"{self.mdm.split}.{k}": v for k, v in self.mdm.metrics().items()}
        if self.ar is not None:
            out.update(
                {
                    f"{self.mdm.split}.{k}": float(v)
                    for k, v in self.ar.to_dict().items()
                    if isinstance(v, (int, float))
                }
            )
        return out


@dataclass
class SampleOutput:
    texts: list[str]
    stats: SampleStats
    network_calls: int
    extra: dict[str, Any] = field(default_factory=dict)


def _device(cfg: Config) -> torch.device:
    return resolve_runtime(cfg.runtime).device


def first_token_model(blocks_dir: str | Path, vocab_size: int) -> torch.Tensor:
    """Unigram log-probabilities of the training split: the AR baseline's first-token model."""
    x0 = torch.from_numpy(read_blocks(list_shards(blocks_dir, "train")).input_ids).long()
    return unigram_log_probs(x0, vocab_size)


def score(
    cfg: Config,
    blocks_dir: str | Path,
    corruptions_dir: str | Path,
    mdm_checkpoint: str | Path,
    ar_checkpoint: str | Path | None = None,
) -> dict[str, SplitScores]:
    """Every configured split: MDM NELBO rows (continuous, each T) and the AR exact NLL."""
    device = _device(cfg)
    vocab = int(read_manifest(blocks_dir)["stats"]["vocab_size"])
    mdm, _ = load_model(mdm_checkpoint, use_ema=cfg.eval.use_ema, device=device)
    ar = first = None
    if ar_checkpoint is not None:
        ar, _ = load_model(ar_checkpoint, use_ema=cfg.eval.use_ema, device=device)
        first = first_token_model(blocks_dir, vocab)
    schedule = make_schedule(cfg.diffusion)
    out: dict[str, SplitScores] = {}
    for split in cfg.eval.splits:
        res = evaluate_stage(
            mdm,
            blocks_dir,
            corruptions_dir,
            split,
            cfg.eval,
            schedule=schedule,
            vocab_size=vocab,
            device=device,
        )
        ar_res = None
        if ar is not None and first is not None:
            blocks = read_blocks(list_shards(blocks_dir, split), max_blocks=cfg.eval.max_blocks)
            x0, n_bytes = (torch.from_numpy(a).long() for a in (blocks.input_ids, blocks.n_bytes))
            ar_res = evaluate_ar(ar, x0, n_bytes, vocab, first, cfg.eval.batch_size, device)
        out[split] = SplitScores(res, ar_res, comparison_table(res, ar_res))
    return out


def sample_checkpoint(
    cfg: Config,
    tokenizer_dir: str | Path,
    mdm_checkpoint: str | Path,
    blocks_dir: str | Path | None = None,
    ar_checkpoint: str | Path | None = None,
    prefix: str | None = None,
) -> SampleOutput:
    """Ancestral samples as text, with statistics; the AR baseline judges them if given."""
    device = _device(cfg)
    tok = load_tokenizer(tokenizer_dir)
    model, model_cfg = load_model(mdm_checkpoint, use_ema=cfg.eval.use_ema, device=device)
    prefix = prefix if prefix is not None else cfg.sample.prefix
    prefix_ids = tok.encode([prefix])[0] if prefix else None
    result = generate(
        model,
        make_schedule(cfg.diffusion),
        tok.vocab_size,
        cfg.sample,
        cfg.data.seq_len,
        prefix_ids=prefix_ids,
        time_conditioning=model_cfg.model.time_conditioning,
        device=device,
    )
    ar = first = None
    if ar_checkpoint is not None and blocks_dir is not None:
        ar, _ = load_model(ar_checkpoint, use_ema=cfg.eval.use_ema, device=device)
        first = first_token_model(blocks_dir, tok.vocab_size)
    tokens = result.tokens.cpu()
    stats = sample_statistics(tokens.to(device), tok.vocab_size, ar, first)
    return SampleOutput(decode_samples(tokens, tok.decode), stats, result.network_calls)
