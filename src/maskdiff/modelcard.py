"""The model card of a registered version: what it was trained on, how, how good it is (with
standard errors, and paired against the champion it was compared with), what it writes, what it
ran on, and what it cannot do. Markdown, built from the run's summary; the MLflow model version's
description and the run's ``model_card.md`` are this text.
"""

from __future__ import annotations

import json
import platform
from typing import Any

from maskdiff.compare import Verdict
from maskdiff.config import Config, ConfigError, load_config
from maskdiff.data.stage import read_manifest

__all__ = ["config_diff", "model_card"]

LIMITS = [
    "The bounds are upper bounds on the negative log-likelihood (NELBO), not the likelihood "
    "itself; the AR row is an exact NLL. Both count every token of a block (EOS included).",
    "Scores hold for this corpus and tokenizer only; bits per byte compare across tokenizers, "
    "nats per token do not.",
    "Samples are drawn with the run's sampler settings; fewer steps trade quality for speed "
    "(see the run's sampler frontier).",
    "No safety filtering or bias evaluation was done; do not serve it to people as is.",
]


def config_diff(cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, preset value, run value) for every setting where the run differs from its preset
    (``cfg.name``; the built-in defaults when no preset has that name)."""
    try:
        base = load_config(cfg.name)
    except ConfigError:
        base = Config()
    ours, theirs = cfg.flat(), base.flat()
    keys = sorted(set(ours) | set(theirs))
    return [(k, theirs.get(k), ours.get(k)) for k in keys
            if k != "name" and ours.get(k) != theirs.get(k)]  # fmt: skip


def _hardware(summary: dict[str, Any]) -> str:
    metrics = summary.get("models", {}).get("mdm", {}).get("metrics", {})
    device = summary.get("device") or "unknown device"
    parts = [f"{device}", f"{platform.machine()} {platform.system()}",
             f"Python {platform.python_version()}"]  # fmt: skip
    if metrics.get("memory_gb") is not None:
        parts.append(f"peak memory {metrics['memory_gb']:.2f} GB")
    return ", ".join(parts)


def model_card(
    cfg: Config,
    summary: dict[str, Any],
    model: str,
    version: str,
    verdict: Verdict | None,
    champion_version: str | None,
) -> str:
    """The card, in markdown."""
    lines = [f"# {model} version {version}", ""]
    lines += [
        f"Masked diffusion language model ({cfg.model.n_layers} layers x {cfg.model.d_model}, "
        f"{cfg.diffusion.schedule} schedule), trained by the maskdiff pipeline, run "
        f"`{summary.get('run_dir', '?')}`, preset `{cfg.name}`.",
        "",
    ]

    lines += ["## Data", "", "| stage | content hash | facts |", "|---|---|---|"]
    for name in ("documents", "tokenizer", "blocks", "corruptions"):
        path = summary.get("stages", {}).get(name)
        if not isinstance(path, str):
            continue
        try:
            manifest = read_manifest(path)
        except (OSError, ValueError):
            lines.append(f"| {name} | {summary.get('stage_hashes', {}).get(name, '?')} | - |")
            continue
        lines.append(f"| {name} | `{manifest['content_hash']}` | {_facts(name, manifest)} |")
    source = {"builtin": cfg.data.builtin, "hub": cfg.data.hub_name,
              "local": ", ".join(cfg.data.paths)}[cfg.data.source]  # fmt: skip
    lines += ["", f"Corpus: {cfg.data.source} `{source}`; tokenizer: {cfg.tokenizer.kind}; "
              f"blocks of {cfg.data.seq_len} tokens.", ""]  # fmt: skip

    diff = config_diff(cfg)
    lines += ["## Configuration", ""]
    if diff:
        lines += [f"Differs from the preset `{cfg.name}` in:", "", "| key | preset | this run |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| `{k}` | {_show(a)} | {_show(b)} |" for k, a, b in diff]
    else:
        lines.append(f"The preset `{cfg.name}` as it is.")
    lines.append("")

    lines += ["## Scores", ""]
    for split, sc in summary.get("evaluation", {}).get("scores", {}).items():
        mdm, ar = sc.get("mdm") or {}, sc.get("ar") or {}
        key = "nelbo.continuous"
        lines.append(
            f"- `{split}`: NELBO {mdm.get(f'{key}.nats_per_token', float('nan')):.4f} ± "
            f"{mdm.get(f'{key}.nats_per_token_se', float('nan')):.4f} nats/token, "
            f"{mdm.get(f'{key}.bits_per_byte', float('nan')):.4f} ± "
            f"{mdm.get(f'{key}.bits_per_byte_se', float('nan')):.4f} bits/byte"
            + (f"; AR baseline NLL {ar['ar.nats_per_token']:.4f} ± "
               f"{ar['ar.nats_per_token_se']:.4f} nats/token" if ar else "")
        )  # fmt: skip
    if verdict is None:
        lines += ["", "Against the champion: no champion to compare with (or its run kept no "
                  "per-block scores)."]  # fmt: skip
    elif verdict.diff is None:
        lines += ["", f"Against the champion (version {champion_version}): {verdict.reason}."]
    else:
        flag = " **Flagged as a regression.**" if verdict.regressed else ""
        lines += ["", f"Against the champion (version {champion_version}), paired on the same "
                  f"corrupted blocks: {verdict.reason}.{flag}"]  # fmt: skip
    lines.append("")

    samples = summary.get("evaluation", {}).get("samples", {})
    if samples.get("texts") or samples.get("infill"):
        lines += ["## Examples", ""]
        for text in samples.get("texts", [])[:2]:
            lines += ["```", text[:400], "```", ""]
        for ex in samples.get("infill", [])[:2]:
            lines += ["```", f"model:    {ex['filled'][:400]}", f"original: {ex['original'][:400]}",
                      "```", ""]  # fmt: skip

    models = summary.get("models", {})
    lines += ["## Training", ""]
    for kind, info in models.items():
        lines.append(f"- `{kind}`: {info.get('step')} steps, {info.get('seconds', 0):.0f} s")
    wall = summary.get("wall_s")
    lines += ["", f"Hardware: {_hardware(summary)}."
              + (f" Wall time of the run so far: {wall:.0f} s." if wall else ""), ""]  # fmt: skip

    lines += ["## Known limits", ""] + [f"- {item}" for item in LIMITS]
    return "\n".join(lines) + "\n"


def _facts(name: str, manifest: dict[str, Any]) -> str:
    stats = manifest.get("stats", {})
    if name == "blocks":
        splits = stats.get("splits", {})
        return ", ".join(f"{s}: {v.get('blocks')} blocks, {v.get('tokens')} tokens"
                         for s, v in splits.items())  # fmt: skip
    if name == "tokenizer":
        return f"vocabulary {stats.get('vocab_size', '?')}"
    simple = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
    return ", ".join(f"{k} {v}" for k, v in list(simple.items())[:4]) or "-"


def _show(value: Any) -> str:
    return f"`{json.dumps(value)}`"
