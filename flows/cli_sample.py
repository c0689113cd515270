"""``maskdiff sample``: fill infill templates or continue prefixes with a checkpoint or an MLflow
model URI, and print the texts with their gaps visible."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maskdiff.ops.processes import paused_gc


def cmd_sample(args: argparse.Namespace) -> int:
    """Fill templates (``--infill``, ``--infill-file``) or continue a prefix (``--prefix``; none:
    unconditional samples), ``--n`` draws each; print each filled text with its gaps visible,
    then a line of dashes."""
    templates = [_read_template(v) if is_file else v for is_file, v in args.templates or []]
    if templates and args.prefix is not None:
        raise SystemExit("maskdiff: give templates (--infill, --infill-file) or --prefix, not both")
    if templates and args.length is not None:
        raise SystemExit(
            "maskdiff: --length is for --prefix and unconditional samples; a template's gaps "
            "say how long it is"
        )
    n = args.n if args.n is not None else (1 if templates else 4)
    if n < 1:
        raise SystemExit(f"maskdiff: --n must be at least 1, got {n}")
    settings = dict(sampler=args.sampler, steps=args.steps, seed=args.seed, top_p=args.top_p)
    style = "ansi" if sys.stdout.isatty() else "brackets"
    rows = [t for t in templates for _ in range(n)] if templates else [args.prefix or ""] * n
    model = args.model
    if model.endswith((".pt", ".ckpt")) or Path(model).is_file():
        if not args.tokenizer:
            raise SystemExit("maskdiff: a checkpoint needs --tokenizer <tokenizer stage folder>")
        texts = _sample_checkpoint(model, args.tokenizer, rows, bool(templates), args.length,
                                   settings, style)  # fmt: skip
    else:
        texts = _sample_model_uri(model, rows, bool(templates), args.length, settings, style)
    for text in texts:
        print(text)
        print("-" * 40)
    return 0


def _read_template(path: str) -> str:
    """The whole file as one template (templates of code span lines), less its last line
    break; a missing, unreadable or non-UTF-8 file ends the command on one line."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"maskdiff: --infill-file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SystemExit(
            f"maskdiff: --infill-file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start})"
        ) from None
    return text.removesuffix("\n").removesuffix("\r")


def _sample_checkpoint(
    checkpoint: str, tokenizer: str, rows: list[str], infill: bool, length: int | None,
    settings: dict, style: str,
) -> list[str]:  # fmt: skip
    """Fill ``rows`` (templates, or prefixes when not ``infill``) with the checkpoint's model."""
    with paused_gc():
        from maskdiff.infill import continuation_template, render
        from maskdiff.textgen import TextModel

    model = TextModel.load(checkpoint, tokenizer)
    cfg = model.settings(length=length, **settings)
    if infill:
        templates = model.templates(rows)
    else:
        n = cfg.length or model.block_length
        templates = [continuation_template(p, model.tokenizer, n) for p in rows]
    out = model.fill_templates(templates, cfg)
    return [
        render(f.tokens, t, model.tokenizer, style)
        for t, f in zip(templates, out.filled, strict=True)
    ]


def _sample_model_uri(
    uri: str, rows: list[str], infill: bool, length: int | None, settings: dict, style: str
) -> list[str]:
    """Fill ``rows`` through the MLflow model ``uri`` (its pyfunc: what ``mlflow models serve``
    answers); a request it refuses ends the command on the refusal's cause, in one line."""
    with paused_gc():
        import mlflow.pyfunc
        import pandas as pd
        from mlflow.exceptions import MlflowException

        from maskdiff.infill import parse_template, show_gaps

    loaded = mlflow.pyfunc.load_model(uri)
    params = {k: v for k, v in (settings | {"length": length}).items() if v is not None}
    frame = pd.DataFrame({"template" if infill else "prefix": rows})
    try:
        out = loaded.predict(frame, params)
    except MlflowException as exc:
        if isinstance(exc.__cause__, ValueError):  # a TemplateError or SettingsError
            raise exc.__cause__ from None
        raise
    if not isinstance(out, pd.DataFrame):  # a version logged before templates: texts alone
        return [str(text) for text in out]
    texts = []
    for row, gaps in zip(rows, out["gaps"], strict=True):
        gaps = iter(gaps)
        if infill:
            parts = [(isinstance(p, int), next(gaps) if isinstance(p, int) else p)
                     for p in parse_template(row)]  # fmt: skip
        else:
            parts = ([(False, row)] if row else []) + [(True, next(gaps))]
        texts.append(show_gaps(parts, style))
    return texts
