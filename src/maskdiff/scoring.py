"""Score trained checkpoints on the data stages: the MDM bound, the AR baseline, samples.

This composes :mod:`maskdiff.checkpoint`, :mod:`maskdiff.evaluate` and :mod:`maskdiff.sampling`
for the pipeline and the command line; it knows nothing of Prefect or MLflow.

Under ``torchrun`` (several ranks) :func:`score` shards the evaluation over the ranks and every
rank gets the one-process numbers (:mod:`maskdiff.evaluate`); the command line::

    torchrun --standalone --nproc_per_node N -m maskdiff.scoring --config CFG [--set K=V] \
        --blocks RUNS/blocks-... --corruptions RUNS/corrupt-... --mdm CKPT [--ar CKPT] --out F.json

writes (rank 0, atomically) ``{split: SplitScores.to_json()}``, read back with
:func:`scores_from_json`, and prints a last line ``{"result": true, "out": F.json,
"world_size": W}`` (what
:func:`maskdiff.launch.run_training` waits for). Sampling is not sharded: it runs in one process.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskdiff.checkpoint import load_model
from maskdiff.config import Config, load_config
from maskdiff.data.contracts import read_blocks
from maskdiff.data.stage import list_shards, read_manifest, write_json_atomic
from maskdiff.data.tokenizer import load_tokenizer
from maskdiff.distributed import DistInfo, end_worker, naming_hung_ranks, shutdown_distributed
from maskdiff.elbo import unigram_log_probs
from maskdiff.eval_table import comparison_table
from maskdiff.evaluate import (
    ARResult,
    EvalResult,
    NelboEstimate,
    evaluate_ar,
    evaluate_stage,
)
from maskdiff.launch import set_parent_death_signal
from maskdiff.runtime import resolve_runtime
from maskdiff.sampling import SampleStats, decode_samples, generate, sample_statistics
from maskdiff.schedule import make_schedule
from maskdiff.textgen import TextModel, heldout_infill
from maskdiff.worker_args import SCORE_FLAGS, arguments
from maskdiff.worker_args import parser as worker_parser

__all__ = [
    "SampleOutput",
    "SplitScores",
    "first_token_model",
    "main",
    "sample_checkpoint",
    "score",
    "score_arguments",
    "scores_from_json",
    "showcase",
]


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

    def to_json(self) -> dict[str, Any]:
        """Everything, per-block values included: :meth:`from_json` rebuilds an equal object
        (floats round-trip exactly through JSON)."""
        estimates = [
            {**{k: v for k, v in asdict(e).items() if k not in ("per_block", "blocks")},
             "per_block": e.per_block.tolist(), "blocks": e.blocks.tolist()}
            for e in self.mdm.estimates
        ]  # fmt: skip
        mdm = {"split": self.mdm.split, "schedule": self.mdm.schedule, "seed": self.mdm.seed,
               "counted": self.mdm.counted, "estimates": estimates}  # fmt: skip
        return {"mdm": mdm, "ar": None if self.ar is None else asdict(self.ar), "table": self.table}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SplitScores:
        mdm = dict(obj["mdm"])
        mdm["estimates"] = [
            NelboEstimate(**{**e, "per_block": torch.tensor(e["per_block"], dtype=torch.float64),
                             "blocks": torch.tensor(e["blocks"], dtype=torch.long)})
            for e in mdm["estimates"]
        ]  # fmt: skip
        ar = None if obj["ar"] is None else ARResult(**obj["ar"])
        return cls(EvalResult(**mdm), ar, obj["table"])


def scores_from_json(obj: dict[str, Any]) -> dict[str, SplitScores]:
    """The result file of ``python -m maskdiff.scoring``, split by split."""
    return {split: SplitScores.from_json(v) for split, v in obj.items()}


@dataclass
class SampleOutput:
    texts: list[str]
    stats: SampleStats
    network_calls: int
    extra: dict[str, Any] = field(default_factory=dict)


def _device(cfg: Config) -> torch.device:
    return resolve_runtime(cfg.runtime).device


def save_scores(
    cfg: Config,
    data: dict[str, Any],
    mdm_checkpoint: str,
    ar_checkpoint: str | None,
    scores: dict[str, SplitScores],
) -> dict[str, Path]:
    """Write each split's scores, per-block terms included (:meth:`SplitScores.to_json`), to
    ``<root>/evaluations/<key>/<split>_scores.json``: the key is what the numbers depend on
    (the checkpoints, the corruption stage, the ``eval`` section). Returns the files by split."""
    from maskdiff.data.stage import config_hash, data_root

    key = config_hash({
        "mdm": str(mdm_checkpoint), "ar": None if ar_checkpoint is None else str(ar_checkpoint),
        "corruptions": read_manifest(data["corruptions"])["content_hash"],
        "eval": cfg.eval.model_dump(mode="json"),
    })  # fmt: skip
    folder = data_root(cfg.data.root) / "evaluations" / key
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, sc in scores.items():
        files[split] = folder / f"{split}_scores.json"
        write_json_atomic(files[split], sc.to_json())
    return files


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
    """Every configured split: MDM NELBO rows (continuous, each T) and the AR exact NLL.

    Under ``torchrun`` each rank scores its share and every rank returns the full result.
    """
    rt = resolve_runtime(cfg.runtime)
    device, dist = rt.device, rt.dist
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
            dist=dist,
        )
        ar_res = None
        if ar is not None and first is not None:
            blocks = read_blocks(list_shards(blocks_dir, split), max_blocks=cfg.eval.max_blocks)
            x0, n_bytes = (torch.from_numpy(a).long() for a in (blocks.input_ids, blocks.n_bytes))
            ar_res = evaluate_ar(
                ar, x0, n_bytes, vocab, first, cfg.eval.batch_size, device, dist=dist
            )
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


def showcase(
    cfg: Config,
    data: dict[str, str],
    mdm_checkpoint: str | Path,
    ar_checkpoint: str | Path | None,
) -> dict[str, Any]:
    """What the run's report shows of the model beyond its samples, from one loaded model:

    * ``infill``: ``sample.infill_examples`` held-out blocks (the first evaluation split) with a
      middle gap filled, next to the original (:func:`maskdiff.textgen.heldout_infill`);
    * ``frontier``: every sampler at ``sample.frontier_steps`` and L steps,
      ``sample.frontier_samples`` samples each, judged exactly on the markov corpus, else by the
      AR baseline (:func:`maskdiff.frontier.sampler_frontier`); {} without a judge.
    """
    out: dict[str, Any] = {"infill": [], "frontier": {}}
    if cfg.sample.infill_examples == 0 and cfg.sample.frontier_samples == 0:
        return out
    device = _device(cfg)
    model = TextModel.load(mdm_checkpoint, data["tokenizer"], device=device,
                           use_ema=cfg.eval.use_ema)  # fmt: skip
    if cfg.sample.infill_examples:
        split = cfg.eval.splits[0] if cfg.eval.splits else "validation"
        settings = cfg.sample.model_dump(include={"sampler", "steps", "seed", "top_p", "cached"})
        out["infill"] = heldout_infill(model, data["blocks"], split, cfg.sample.infill_examples,
                                       **settings)  # fmt: skip
    if cfg.sample.frontier_samples:
        out["frontier"] = _frontier(cfg, model, data, ar_checkpoint, device)
    return out


def _frontier(
    cfg: Config, model: TextModel, data: dict[str, str], ar_checkpoint: str | Path | None,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    # frontier uses this module's first_token_model: imported here, not at module level
    from maskdiff.frontier import frontier_markdown, frontier_metrics, make_judge, sampler_frontier

    judge = make_judge(data["documents"], data["tokenizer"], blocks=data["blocks"],
                       ar_checkpoint=ar_checkpoint, device=device)  # fmt: skip
    if judge is None:
        return {}
    steps = [*cfg.sample.frontier_steps, "L"]
    rows = sampler_frontier(model, judge, steps=steps, n_samples=cfg.sample.frontier_samples,
                            seed=cfg.sample.seed)  # fmt: skip
    return {"markdown": frontier_markdown(rows), "metrics": frontier_metrics(rows),
            "rows": [r.to_dict() for r in rows]}  # fmt: skip


def score_arguments(
    config: str | Path,
    blocks: str | Path,
    corruptions: str | Path,
    mdm_checkpoint: str | Path,
    ar_checkpoint: str | Path | None,
    out: str | Path,
) -> list[str]:
    """The arguments of ``python -m maskdiff.scoring`` for one evaluation."""
    return arguments(SCORE_FLAGS, config=config, blocks=blocks, corruptions=corruptions,
                     mdm=mdm_checkpoint, ar=ar_checkpoint, out=out)  # fmt: skip


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    return worker_parser(
        "python -m maskdiff.scoring",
        "Score checkpoints on the evaluation splits; run under torchrun to shard.",
        SCORE_FLAGS,
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry: rank 0 writes ``{split: SplitScores.to_json()}`` to ``--out``."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        set_parent_death_signal()  # a rank dies with its torchrun agent
    args = _parse_args(argv)
    cfg = load_config(args.config, args.set)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        with naming_hung_ranks(DistInfo(rank, world), cfg.runtime.collective_timeout):
            scores = score(cfg, args.blocks, args.corruptions, args.mdm, args.ar)
        if rank == 0:
            write_json_atomic(Path(args.out), {k: v.to_json() for k, v in scores.items()})
    finally:
        shutdown_distributed(DistInfo(rank, world))
    if rank == 0:
        line = {"result": True, "out": str(args.out), "world_size": world}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    end_worker(main())
