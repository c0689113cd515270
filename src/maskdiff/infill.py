"""Infilling templates: known text with gaps, as token ids, and the filled result as text.

Syntax: ``[MASK]`` is one unknown token, ``[MASK:N]`` is N unknown tokens; everything else is
known text. Each known segment is tokenized on its own, with its whitespace, which is how it
is tokenized in context whenever a gap borders on a pre-token boundary (the byte-level BPE
splits before a space, so ``"def f(x):[MASK:12] return y"`` keeps `` return`` as in the whole
text; the character tokenizer is context-free). Known tokens never change; only the gaps are
sampled (:func:`maskdiff.samplers.fill`).

Every problem with a template is a :class:`TemplateError` whose message is one line naming it:
a gap of 0 tokens, a malformed gap, no gap at all, text the tokenizer cannot encode, or a
template longer than the model's block length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maskdiff.data.tokenizer import Tokenizer

__all__ = [
    "GAP_CLOSE",
    "GAP_OPEN",
    "Template",
    "TemplateError",
    "continuation_template",
    "encode_template",
    "gap_texts",
    "parse_template",
    "render",
    "show_gaps",
]

_GAP = re.compile(r"\[MASK(?::([^\]]*))?\]")
GAP_OPEN, GAP_CLOSE = "[[", "]]"  # how a filled gap is shown outside a terminal
_ANSI_OPEN, _ANSI_CLOSE = "\x1b[1;4;32m", "\x1b[0m"  # bold, underlined, green


class TemplateError(ValueError):
    """A template that cannot be filled; the message names the problem in one line."""


def parse_template(text: str) -> list[str | int]:
    """``text`` as segments: known text (str) and gaps (int, the number of tokens)."""
    parts: list[str | int] = []
    pos = 0
    for match in _GAP.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        count = match.group(1)
        if count is None:
            n = 1
        elif count.strip().isdigit():
            n = int(count)
        else:
            raise TemplateError(
                f"{match.group(0)!r} at character {match.start()}: write [MASK] or [MASK:N] "
                "with N a whole number of tokens"
            )
        if n == 0:
            raise TemplateError(
                f"{match.group(0)!r} at character {match.start()} is a gap of 0 tokens; "
                "a gap needs N >= 1"
            )
        parts.append(n)
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    if not any(isinstance(p, int) for p in parts):
        raise TemplateError(
            f"the template {_short(text)} has no gap: mark unknown tokens with [MASK] or [MASK:N]"
        )
    return parts


@dataclass(frozen=True)
class Template:
    """A template as ids: ``ids`` holds ``mask_id`` at the gaps; ``spans`` lists each segment
    as (is_gap, start, end) token positions, in order; ``known_text`` the known segments."""

    text: str
    ids: list[int]
    spans: list[tuple[bool, int, int]]
    known_text: list[str]
    mask_id: int

    @property
    def n_gap_tokens(self) -> int:
        return sum(end - start for gap, start, end in self.spans if gap)

    def __len__(self) -> int:
        return len(self.ids)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _encode_known(tok: Tokenizer, segment: str) -> list[int]:
    ids = tok.encode([segment])[0]
    if tok.unk_id is not None and tok.unk_id in ids:
        bad = sorted({ch for ch in segment if tok.unk_id in tok.encode([ch])[0]})
        shown = ", ".join(repr(ch) for ch in bad) or "part of it"
        raise TemplateError(
            f"the tokenizer cannot encode {shown} in {_short(segment)} (not in its vocabulary)"
        )
    return ids


def encode_template(text: str, tok: Tokenizer, block_length: int) -> Template:
    """Parse and tokenize ``text``; at most ``block_length`` tokens (the model's L)."""
    ids: list[int] = []
    spans: list[tuple[bool, int, int]] = []
    known: list[str] = []
    for part in parse_template(text):
        start = len(ids)
        if isinstance(part, int):
            ids.extend([tok.mask_id] * part)
        else:
            ids.extend(_encode_known(tok, part))
            known.append(part)
        spans.append((isinstance(part, int), start, len(ids)))
    if len(ids) > block_length:
        raise TemplateError(
            f"the template {_short(text)} is {len(ids)} tokens, longer than the model's block "
            f"length {block_length}"
        )
    return Template(text, ids, spans, known, tok.mask_id)


def continuation_template(prefix: str, tok: Tokenizer, length: int) -> Template:
    """``prefix`` known, then a gap to ``length`` tokens (which may exceed the block length:
    the samplers then decode semi-autoregressively)."""
    ids = _encode_known(tok, prefix) if prefix else []
    if len(ids) >= length:
        raise TemplateError(
            f"the prefix {_short(prefix)} is {len(ids)} tokens and leaves nothing to generate "
            f"in {length}"
        )
    spans = ([(False, 0, len(ids))] if ids else []) + [(True, len(ids), length)]
    return Template(
        prefix, ids + [tok.mask_id] * (length - len(ids)), spans, [prefix] if ids else [],
        tok.mask_id,
    )  # fmt: skip


def render(tokens: list[int], template: Template, tok: Tokenizer, style: str = "brackets") -> str:
    """The filled text with the gaps visible: ``brackets`` (``[[gap]]``), ``ansi`` (highlighted
    in a terminal) or ``plain`` (the text alone). Known segments are shown as written."""
    if style == "plain":
        return tok.decode(tokens)
    known = iter(template.known_text)
    pieces = [
        (gap, tok.decode(tokens[start:end]) if gap else next(known))
        for gap, start, end in template.spans
    ]
    return show_gaps(pieces, style)


def show_gaps(pieces: list[tuple[bool, str]], style: str = "brackets") -> str:
    """Join (is_gap, text) pieces, each gap shown as ``style`` says (as :func:`render`): for
    filled texts that come back as known text and gap texts (the MLflow model's answer)."""
    if style not in ("brackets", "ansi", "plain"):
        raise ValueError(f"unknown style {style!r}")
    opening, closing = {"brackets": (GAP_OPEN, GAP_CLOSE), "ansi": (_ANSI_OPEN, _ANSI_CLOSE),
                        "plain": ("", "")}[style]  # fmt: skip
    return "".join(f"{opening}{text}{closing}" if gap else text for gap, text in pieces)


def gap_texts(tokens: list[int], template: Template, tok: Tokenizer) -> list[str]:
    """The text of each filled gap, in order."""
    return [tok.decode(tokens[start:end]) for gap, start, end in template.spans if gap]
