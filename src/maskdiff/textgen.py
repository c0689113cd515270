"""A trained model ready to use: load a checkpoint and its tokenizer once, then fill templates.

    from maskdiff.textgen import TextModel
    model = TextModel.load("runs/.../mdm/last.pt", "runs/tokenizer-...")
    out = model.infill(["def add(a, b):[MASK:8] return c"], sampler="ancestral", steps=64)
    print(out.filled[0].marked)   # the known text with the gaps [[bracketed]]

    model.continuation(["import os"], length=256)   # a prefix, a gap to the end (semi-AR > L)

The command line (``maskdiff sample``), the MLflow pyfunc and the pipeline's report all go
through this class. Each call takes the ``sample`` section of the checkpoint's config as its
defaults; keyword arguments override them (``sampler``, ``steps``, ``seed``, ``top_p``, ...).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from maskdiff.checkpoint import load_checkpoint, model_from_checkpoint
from maskdiff.config import Config, SampleConfig
from maskdiff.data.contracts import read_blocks
from maskdiff.data.stage import list_shards, read_manifest
from maskdiff.data.tokenizer import Tokenizer, load_tokenizer
from maskdiff.infill import Template, continuation_template, encode_template, gap_texts, render
from maskdiff.runtime import resolve_runtime
from maskdiff.samplers import fill
from maskdiff.schedule import make_schedule

__all__ = ["FillOutput", "Filled", "SettingsError", "TextModel", "heldout_templates"]


class SettingsError(ValueError):
    """A sampling setting that is unknown or out of range; one line naming each one."""


@dataclass(frozen=True)
class Filled:
    """One filled template: the whole text, the text with gaps bracketed, each gap's text."""

    template: str
    text: str
    marked: str
    gaps: list[str]
    tokens: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "text": self.text, "marked": self.marked,
                "gaps": self.gaps}  # fmt: skip


@dataclass(frozen=True)
class FillOutput:
    filled: list[Filled]
    network_calls: int
    seconds: float
    sampler: str
    steps: int

    @property
    def tokens_per_second(self) -> float:
        n = sum(len(f.tokens) for f in self.filled)
        return n / self.seconds if self.seconds > 0 else float("nan")


class TextModel:
    """A denoiser, its tokenizer and its config, loaded once."""

    def __init__(
        self, model: torch.nn.Module, cfg: Config, tokenizer: Tokenizer, device: torch.device
    ) -> None:
        self.model, self.cfg, self.tokenizer, self.device = model, cfg, tokenizer, device
        self.schedule = make_schedule(cfg.diffusion)
        self.block_length = cfg.data.seq_len

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        tokenizer_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        use_ema: bool = True,
    ) -> TextModel:
        """``device`` None: the checkpoint config's ``runtime.device`` (auto: CUDA if any)."""
        ckpt = load_checkpoint(checkpoint)
        cfg = Config.model_validate(json.loads(ckpt["config"]))
        if cfg.model.kind != "mdm":
            raise ValueError(f"{checkpoint}: a {cfg.model.kind} checkpoint cannot fill gaps")
        tok = load_tokenizer(tokenizer_dir)
        expected = (ckpt.get("fingerprint") or {}).get("tokenizer_hash")
        manifest = read_manifest(tokenizer_dir, missing_ok=True) or {}
        found = manifest.get("content_hash")
        if int(ckpt["vocab_size"]) != tok.vocab_size or (expected and found and expected != found):
            raise ValueError(
                f"{tokenizer_dir} is not the tokenizer {checkpoint} was trained with (vocabulary "
                f"{tok.vocab_size} vs {int(ckpt['vocab_size'])}, stage {found} vs {expected})"
            )
        dev = torch.device(device) if device is not None else resolve_runtime(cfg.runtime).device
        model, _ = model_from_checkpoint(ckpt, use_ema=use_ema, device=dev)
        return cls(model, cfg, tok, dev)

    def settings(self, **overrides: Any) -> SampleConfig:
        """The checkpoint's ``sample`` section with ``overrides`` (None values ignored),
        validated (an unknown sampler or a bad value is a :class:`SettingsError` naming it)."""
        update = {k: v for k, v in overrides.items() if v is not None}
        try:
            return SampleConfig.model_validate(self.cfg.sample.model_dump() | update)
        except ValidationError as exc:
            raise SettingsError("; ".join(_setting_problem(e) for e in exc.errors())) from None

    def templates(self, texts: Sequence[str]) -> list[Template]:
        """Each text as a template (:func:`maskdiff.infill.encode_template`)."""
        return [encode_template(t, self.tokenizer, self.block_length) for t in texts]

    def infill(self, texts: Sequence[str], **overrides: Any) -> FillOutput:
        """Fill the gaps of every template text; ``overrides`` as :meth:`settings`."""
        return self.fill_templates(self.templates(texts), self.settings(**overrides))

    def continuation(
        self, prefixes: Sequence[str], length: int | None = None, **overrides: Any
    ) -> FillOutput:
        """Continue each prefix ("" for none) to ``length`` tokens (default: the sample
        section's length, else the block length); longer than L is decoded semi-AR."""
        cfg = self.settings(length=length, **overrides)
        n = cfg.length or self.block_length
        return self.fill_templates(
            [continuation_template(p, self.tokenizer, n) for p in prefixes], cfg
        )

    def fill_templates(self, templates: Sequence[Template], cfg: SampleConfig) -> FillOutput:
        """Fill ``templates`` in one batch: rows padded with free context to the longest."""
        if not templates:
            return FillOutput([], 0, 0.0, cfg.sampler, cfg.steps)
        m, P = self.tokenizer.mask_id, max(len(t) for t in templates)
        ids = torch.full((len(templates), P), m, dtype=torch.long)
        free = torch.zeros(len(templates), P, dtype=torch.bool)
        for row, tpl in enumerate(templates):
            ids[row, : len(tpl)] = torch.tensor(tpl.ids, dtype=torch.long)
            free[row, len(tpl) :] = True
        started = time.perf_counter()
        result = fill(
            self.model,
            self.schedule,
            self.tokenizer.vocab_size,
            ids,
            block_length=self.block_length,
            steps=cfg.steps,
            generator=torch.Generator().manual_seed(cfg.seed),
            sampler=cfg.sampler,
            top_p=cfg.top_p,
            cached=cfg.cached and not self.cfg.model.time_conditioning,
            confidence=cfg.confidence,
            remask_eta=cfg.remask_eta,
            context=cfg.context,
            free=free,
            device=self.device,
        )
        seconds = time.perf_counter() - started
        filled = []
        for row, tpl in enumerate(templates):
            tokens = result.tokens[row, : len(tpl)].tolist()
            filled.append(
                Filled(
                    template=tpl.text,
                    text=self.tokenizer.decode(tokens),
                    marked=render(tokens, tpl, self.tokenizer, "brackets"),
                    gaps=gap_texts(tokens, tpl, self.tokenizer),
                    tokens=tokens,
                )
            )
        return FillOutput(filled, result.network_calls, seconds, cfg.sampler, cfg.steps)


def _setting_problem(error: Any) -> str:
    """One pydantic error as ``sampler: Input should be ... (got 'greedy')``."""
    key = ".".join(str(p) for p in error["loc"]) or "sample"
    if error["type"] == "extra_forbidden":
        return f"unknown sample setting {key!r}"
    return f"sample setting {key}: {error['msg']} (got {error['input']!r})"


def heldout_templates(
    blocks: Sequence[Sequence[int]], tok: Tokenizer, n: int, gap: int
) -> list[tuple[Template, list[int]]]:
    """Infill templates cut from held-out blocks: ``n`` blocks spread over ``blocks``, each with
    one gap of ``gap`` tokens in the middle. Returns (template, the block's original ids)."""
    rows = list(blocks)
    if not rows or n <= 0:
        return []
    picks = sorted({round(i * (len(rows) - 1) / max(n - 1, 1)) for i in range(min(n, len(rows)))})
    out = []
    for r in picks:
        ids = [int(v) for v in rows[r]]
        L = len(ids)
        g = max(1, min(gap, L - 2))
        start = (L - g) // 2
        left, right = tok.decode(ids[:start]), tok.decode(ids[start + g :])
        template = Template(
            text=f"{left}[MASK:{g}]{right}",
            ids=ids[:start] + [tok.mask_id] * g + ids[start + g :],
            spans=[(False, 0, start), (True, start, start + g), (False, start + g, L)],
            known_text=[left, right],
            mask_id=tok.mask_id,
        )
        out.append((template, ids))
    return out


def heldout_infill(
    model: TextModel,
    blocks_dir: str | Path,
    split: str = "validation",
    n: int = 3,
    gap: int | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Fill a middle gap (default a quarter of the block) of ``n`` held-out blocks of ``split``:
    per example the template, the filled text and the original, gaps in [[brackets]]."""
    L = model.block_length
    blocks = read_blocks(list_shards(blocks_dir, split), seq_len=L).input_ids
    pairs = heldout_templates(blocks.tolist(), model.tokenizer, n, gap or max(1, L // 4))
    if not pairs:
        return []
    out = model.fill_templates([t for t, _ in pairs], model.settings(**overrides))
    return [
        {
            "template": tpl.text,
            "filled": filled.marked,
            "original": render(original, tpl, model.tokenizer, "brackets"),
            "sampler": out.sampler,
            "steps": out.steps,
        }
        for (tpl, original), filled in zip(pairs, out.filled, strict=True)
    ]
