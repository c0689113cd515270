"""The validation curve: a fixed held-out subset scored while training runs.

Every ``train.eval_every`` steps the training loop scores its model on the first
``train.eval_blocks`` blocks of the validation split:

* masked diffusion model: the continuous NELBO (docs/maths.md, section 6) on the corruption
  stage's precomputed validation rows of those blocks (``corruption.eval_draws`` stratified
  draws of t per block). The rows are the same at every point of the curve, so two points differ
  by the model only, never by masking noise;
* autoregressive baseline: the exact NLL of the same blocks, the first token scored by the
  unigram of the training split as in the final evaluation.

Both in nats per token (N counts every position of a block), with one standard error over
blocks. The weights scored are those the final evaluation scores: the EMA weights when
``train.ema > 0`` and ``eval.use_ema``, else the raw ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from maskdiff.checkpoint import TrainState, best_checkpoint_path, save_checkpoint, state_payload
from maskdiff.config import Config
from maskdiff.data.contracts import read_blocks
from maskdiff.data.evalset import Corruptions, load_corruptions
from maskdiff.data.stage import StageError, list_shards
from maskdiff.distributed import all_reduce_mean, barrier
from maskdiff.evaluate import estimate_nelbo, evaluate_ar
from maskdiff.model import Denoiser
from maskdiff.runtime import Runtime
from maskdiff.schedule import make_schedule
from maskdiff.scoring import first_token_model

__all__ = ["HeldOut", "MetricsCallback", "ValidationScorer", "metric_name"]

MetricsCallback = Callable[[int, dict[str, float]], None]


def metric_name(kind: str) -> str:
    """The validation metric of a model kind: ``val.nelbo`` (MDM) or ``val.ar_nll`` (AR)."""
    return "val.nelbo" if kind == "mdm" else "val.ar_nll"


@dataclass
class HeldOut:
    """The fixed validation subset of one training run and how to score a model on it."""

    kind: str
    x0: Tensor  # (n, L) long
    n_bytes: Tensor  # (n,) long
    corruptions: Corruptions | None  # continuous rows of the n blocks (MDM only)
    first_log_probs: Tensor | None  # (m,) unigram of the training split (AR only)
    cfg: Config
    vocab_size: int

    @classmethod
    def load(
        cls, cfg: Config, blocks_dir: str | Path, corruptions_dir: str | Path | None, vocab: int
    ) -> HeldOut | None:
        """The first ``train.eval_blocks`` validation blocks and, for the MDM, their rows.

        None when there is nothing to score: no validation split (``data.val_fraction: 0``, or a
        blocks folder written by hand, without a manifest), or a masked model without a
        corruption stage (training from online masks in a notebook).
        """
        kind = cfg.model.kind
        if kind == "mdm" and corruptions_dir is None:
            return None
        try:
            shards = list_shards(blocks_dir, "validation")
        except StageError:
            return None
        blocks = read_blocks(shards, cfg.data.seq_len, cfg.train.eval_blocks)
        if len(blocks.block_id) == 0:
            return None
        ids = blocks.block_id
        x0, n_bytes = (torch.from_numpy(a).long() for a in (blocks.input_ids, blocks.n_bytes))
        corr = first = None
        if kind == "mdm":
            assert corruptions_dir is not None
            rows = [c for c in load_corruptions(corruptions_dir, "validation", ids) if c.T == 0]
            if not rows:
                raise ValueError(f"{corruptions_dir}: no continuous validation corruptions")
            corr = rows[0]
        else:
            first = first_token_model(blocks_dir, vocab)
        return cls(kind, x0, n_bytes, corr, first, cfg, vocab)

    def score(self, model: Denoiser, device: torch.device) -> dict[str, float]:
        """``{metric: nats per token, metric + "_se": its standard error}`` of ``model``."""
        name, batch = metric_name(self.kind), self.cfg.eval.batch_size
        if self.corruptions is not None:
            est = estimate_nelbo(
                model, self.x0, self.n_bytes, self.corruptions,
                make_schedule(self.cfg.diffusion), self.vocab_size, batch, device=device,
            )  # fmt: skip
            value, se = est.nats_per_token, est.se
        else:
            assert self.first_log_probs is not None
            res = evaluate_ar(
                model, self.x0, self.n_bytes, self.vocab_size, self.first_log_probs, batch,
                device=device,
            )  # fmt: skip
            value, se = res.nats_per_token, res.se
        return {name: float(value), f"{name}_se": float(se)}


class ValidationScorer:
    """Scores the weights the final evaluation will use on the held-out subset, keeps the best."""

    def __init__(self, cfg: Config, rt: Runtime, state: TrainState, held: HeldOut) -> None:
        self.cfg, self.rt, self.held = cfg, rt, held
        self.name = metric_name(cfg.model.kind)
        use_ema = state.ema is not None and cfg.eval.use_ema
        self.shadow = copy.deepcopy(state.model).requires_grad_(False) if use_ema else None

    def point(
        self,
        state: TrainState,
        out_dir: Path,
        fingerprint: dict,
        log_metrics: MetricsCallback | None,
    ) -> None:
        model = state.model
        if self.shadow is not None and state.ema is not None:
            torch._foreach_copy_(list(self.shadow.parameters()), list(state.ema.values()))
            model = self.shadow
        values = self.held.score(model, self.rt.device)
        # every rank scored the same weights on the same rows; the mean keeps them in agreement
        agreed = torch.tensor([values[self.name]], dtype=torch.float64, device=self.rt.device)
        agreed = all_reduce_mean(agreed, self.rt.dist)
        value = values[self.name] = float(agreed.item())
        state.curve.append((state.step, values))
        if log_metrics is not None:
            log_metrics(state.step, dict(values))
        if state.best is None or value < state.best["value"]:
            state.best, state.bad_evals = {"step": state.step, "value": value}, 0
            if self.rt.is_main:
                payload = state_payload(state, self.cfg, fingerprint, self.cfg.train.batch_size)
                save_checkpoint(best_checkpoint_path(out_dir), payload)
            barrier(self.rt.dist)
        else:
            state.bad_evals += 1
            if self.cfg.train.patience is not None and state.bad_evals >= self.cfg.train.patience:
                state.stopped = "patience"
