"""Quality benchmark: MDM bound and AR NLL at equal compute, against known answers (figures).

    .venv/bin/python benchmarks/bench_quality.py --corpus default  # the default run's corpus
    .venv/bin/python benchmarks/bench_quality.py --corpus markov   # ~ minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_quality.py --corpus pydoc

For each corpus: build the data stages (documents, tokenizer, blocks, corruptions) with the
library functions, train the MDM denoiser and the AR baseline with the *same* config (backbone,
steps, batch: equal tokens and equal FLOPs per token), evaluate both on the same validation
blocks (N = all L tokens per block; AR's first token scored by the training unigram), draw
samples, and print

* the comparison table (continuous NELBO, each T, AR) with standard errors;
* ``markov``: both per-token numbers against the source's exact floor
  (``documents`` manifest ``stats.markov.nll_floor_nats_per_token``) with the targets
  MDM within 5 %, AR within 2 %, marked PASS/MISS (figures, not tests);
* sample statistics, with the generative perplexity judged by the AR baseline of the run.

Everything (stages, checkpoints, ``bench_quality-<corpus>.json``) goes under ``--root``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from maskdiff.checkpoint import load_model
from maskdiff.config import Config, load_config
from maskdiff.data.blocks import build_blocks
from maskdiff.data.contracts import read_blocks
from maskdiff.data.corrupt import build_corruptions
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.markov import make_chain
from maskdiff.data.stage import list_shards
from maskdiff.data.tokenizer import load_tokenizer, train_tokenizer
from maskdiff.eval_table import comparison_table
from maskdiff.evaluate import evaluate_ar, evaluate_stage
from maskdiff.sampling import decode_samples, generate, sample_statistics
from maskdiff.schedule import make_schedule
from maskdiff.scoring import first_token_model
from maskdiff.train import train

TARGETS = {"mdm": 0.05, "ar": 0.02}  # relative excess over the markov floor


def corpus_config(corpus: str, args: argparse.Namespace) -> Config:
    """The preset (default: ``default``) on ``corpus``; only what the corpus needs is changed."""
    overrides: dict[str, Any] = {
        "data.root": str(Path(args.root) / "data"),
        "corruption.discrete_max_blocks": args.discrete_blocks,
        "eval.max_blocks": args.eval_blocks,
    }
    if corpus != "default":  # default: the preset's own corpus
        overrides["data.builtin"] = corpus
    if corpus == "markov":
        overrides.update({"tokenizer.kind": "char", "tokenizer.vocab_size": 64})
    if args.max_steps:
        overrides["train.max_steps"] = args.max_steps
    for item in args.set:  # last: the command line wins
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)  # as in a YAML preset: 1 is an int
    return load_config(args.preset, overrides)


def build_data(cfg: Config) -> dict[str, Path]:
    root = cfg.data.root
    docs = ingest_documents(cfg.data, root)
    tok = train_tokenizer(cfg.tokenizer, docs.path, root)
    blocks = build_blocks(cfg.data, docs.path, tok.path, root)
    corr = build_corruptions(cfg.corruption, cfg.diffusion, blocks.path, root)
    return {"documents": docs.path, "tokenizer": tok.path, "blocks": blocks.path, "corr": corr.path}


def train_both(cfg: Config, stages: dict[str, Path], out: Path) -> dict[str, Any]:
    stats = json.loads((stages["blocks"] / "manifest.json").read_text())["stats"]
    runs: dict[str, Any] = {}
    for kind in ("mdm", "ar"):
        kcfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": kind})})
        corr = stages["corr"] if kind == "mdm" and cfg.corruption.mode == "precomputed" else None
        start = time.perf_counter()
        result = train(
            kcfg,
            stages["blocks"],
            out / kind,
            vocab_size=int(stats["vocab_size"]),
            corruptions_dir=corr,
            tokenizer_hash=str(stats["tokenizer_hash"]),
            validation_dir=stages["corr"],
        )
        seen = result.step * cfg.train.batch_size * cfg.data.seq_len
        runs[kind] = {
            "checkpoint": str(result.checkpoint_path),
            "steps": result.step,
            "train_s": round(time.perf_counter() - start, 1),
            "final_loss": result.metrics.get("loss"),
            "validation_curve": result.curve,
            "eval_share": result.eval_share,
            "tokens_seen": seen,
            "epochs": seen / stats["splits"]["train"]["tokens"],
        }
    return runs


def run(corpus: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = corpus_config(corpus, args)
    torch.set_num_threads(args.threads)
    stages = build_data(cfg)
    runs = train_both(cfg, stages, Path(args.root) / f"runs-{corpus}")
    mdm, _ = load_model(runs["mdm"]["checkpoint"], use_ema=cfg.eval.use_ema)
    ar, _ = load_model(runs["ar"]["checkpoint"], use_ema=cfg.eval.use_ema)
    m = mdm.vocab_size

    start = time.perf_counter()
    res = evaluate_stage(mdm, stages["blocks"], stages["corr"], "validation", cfg.eval)
    val = read_blocks(list_shards(stages["blocks"], "validation"), max_blocks=cfg.eval.max_blocks)
    x0, n_bytes = torch.from_numpy(val.input_ids).long(), torch.from_numpy(val.n_bytes).long()
    first = first_token_model(stages["blocks"], m)
    ar_res = evaluate_ar(ar, x0, n_bytes, m, first, cfg.eval.batch_size)
    eval_s = time.perf_counter() - start
    table = comparison_table(res, ar_res)
    steps = runs["mdm"]["steps"]
    print(f"\n## {corpus}: validation, preset {args.preset} ({steps} steps each, equal compute)\n")
    print(table)
    for kind, info in runs.items():
        last = info["validation_curve"][-1][1] if info["validation_curve"] else {}
        val = ", ".join(f"{k} {v:.4f}" for k, v in last.items()) or "no curve"
        print(
            f"{kind.upper():3s} last training loss {info['final_loss']:.4f}; validation curve "
            f"at step {info['steps']}: {val}; {info['tokens_seen']} tokens read = "
            f"{info['epochs']:.2f} epochs of the training split (target <= 2); validation "
            f"took {100 * info['eval_share']:.1f}% of training time"
        )

    summary: dict[str, Any] = {"corpus": corpus, "runs": runs, "eval_s": round(eval_s, 1)}
    summary.update(res.to_dict())
    summary.update(ar_res.to_dict())
    summary["curve.continuous"] = res.continuous.curve if res.continuous else None
    if corpus == "markov":
        summary["markov"] = markov_check(stages["documents"], cfg, res, ar_res)

    tok = load_tokenizer(stages["tokenizer"])
    samples = generate(mdm, make_schedule(cfg.diffusion), m, cfg.sample, cfg.data.seq_len)
    st = sample_statistics(samples.tokens, m, ar, first)
    texts = decode_samples(samples.tokens, tok.decode)
    summary.update(st.to_dict())
    summary["samples.network_calls"] = samples.network_calls
    summary["samples.text"] = texts
    print(f"\nsamples ({cfg.sample.steps} steps, cached={cfg.sample.cached}): {st.to_dict()}")
    for text in texts[:2]:
        print("---\n" + text[:400])
    out = Path(args.root) / f"bench_quality-{corpus}.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nwritten {out}")
    return summary


def block_floor(cfg: Config) -> dict[str, float] | None:
    """The best NLL per token any model of one block without left context can reach on the
    markov stream (order 1), nats per token: ``given_phase`` and ``exact``.

    The stream is documents of n symbols each followed by EOS (period P = n + 1), each started
    from the stationary law. Given the phase of a block (where documents start), its tokens
    cost: EOS 0; a document's first symbol, or the block's first token, H(pi) (no left context);
    any other symbol h. Averaged over the P phases, that is ``given_phase``. The phase itself is
    uniform and unseen: ``H(X) = H(phase) + H(X | phase) - H(phase | X)``, where the phase is
    read off any EOS in the block and is independent of the symbols otherwise (a stationary
    segment), so ``H(phase | X) = (P - L)/P log(P - L)`` when L < P, else 0. ``exact`` is H(X)/L.
    """
    if cfg.data.markov.order != 1:
        return None
    chain = make_chain(cfg.data.markov)
    h, h0 = chain.entropy_rate(), chain.initial_entropy()
    n, L = cfg.data.markov.doc_length, cfg.data.seq_len
    period = n + 1
    total = 0.0
    for offset in range(period):
        phase = (offset + np.arange(L)) % period  # n = EOS, 0 = a document's first symbol
        cost = np.where(phase == n, 0.0, np.where(phase == 0, h0, h))
        cost[0] = 0.0 if phase[0] == n else h0
        total += cost.sum()
    given_phase = total / (period * L)
    unseen = max(period - L, 0)
    phase_cost = np.log(period) - (unseen / period) * np.log(max(unseen, 1))  # nats per block
    return {"given_phase": given_phase, "exact": given_phase + phase_cost / L}


def markov_check(documents: Path, cfg: Config, res: Any, ar_res: Any) -> dict[str, Any]:
    """Both per-token numbers against the exact floor of the markov source."""
    stats = json.loads((documents / "manifest.json").read_text())["stats"]["markov"]
    floor = stats["nll_floor_nats_per_token"]
    cont = res.continuous
    blocks = block_floor(cfg)
    out = {
        "floor_nats_per_token": floor,
        "block_floor_nats_per_token": blocks,
        "entropy_rate_nats_per_symbol": stats["entropy_rate_nats_per_symbol"],
    }
    print(f"\nmarkov source: exact floor {floor:.4f} nats/token (EOS counted)")
    print(f"  ({stats['convention']})")
    if blocks is not None:
        excess = 100 * (blocks["exact"] / floor - 1)
        print(
            f"block floor: {blocks['exact']:.4f} nats/token ({excess:+.2f}%), the best a model "
            "of one block without left context can do "
            f"({blocks['given_phase']:.4f} if it were told where documents start)"
        )
    for name, value, se in [
        ("mdm", cont.nats_per_token, cont.se),
        ("ar", ar_res.nats_per_token, ar_res.se),
    ]:
        excess = value / floor - 1.0
        verdict = "PASS" if excess <= TARGETS[name] else "MISS"
        out[name] = {"nats_per_token": value, "se": se, "excess": excess, "verdict": verdict}
        print(
            f"  {name.upper():3s} {value:.4f} ± {se:.4f} nats/token: {100 * excess:+.1f}% "
            f"over the floor (target <= {100 * TARGETS[name]:.0f}%): {verdict}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", choices=["default", "markov", "pydoc", "both"], default="both",
        help="default: the preset's own corpus; both: markov and pydoc",
    )  # fmt: skip
    parser.add_argument("--root", default="runs/bench_quality")
    parser.add_argument("--preset", default="default", help="smoke: a seconds-long dry run")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--eval-blocks", type=int, default=256, help="validation blocks")
    parser.add_argument("--discrete-blocks", type=int, default=32, help="blocks with T grids")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. --set train.seed=1 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    for corpus in ["markov", "pydoc"] if args.corpus == "both" else [args.corpus]:
        run(corpus, args)


if __name__ == "__main__":
    main()
