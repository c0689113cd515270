"""The command lines of the two worker entry points, ``python -m maskdiff.train`` and
``python -m maskdiff.scoring``, each defined once.

A worker is started by a launcher (:mod:`maskdiff.launch`, the Prefect tasks, the benchmarks)
that writes its arguments, and it reads them back with argparse. Both sides are built from the
same table of :class:`Flag`, so a flag renamed or added on one side cannot be missed on the other:
:func:`arguments` refuses a value that no flag of the worker takes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SCORE_FLAGS", "TRAIN_FLAGS", "Flag", "arguments", "parser"]


@dataclass(frozen=True)
class Flag:
    """One ``--flag``. ``kind``: ``value`` (one string or int), ``switch`` (store_true) or
    ``repeat`` (append; given once per value)."""

    name: str
    help: str
    required: bool = False
    default: Any = None
    type: type = str
    kind: str = "value"

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


_CONFIG = Flag("--config", "preset name or YAML file", default="default")
_SET = Flag("--set", "override a config key (KEY=VALUE), repeatable", default=[], kind="repeat")

TRAIN_FLAGS: tuple[Flag, ...] = (
    _CONFIG,
    _SET,
    Flag("--blocks", "blocks stage folder (train-*.parquet)", required=True),
    Flag("--corruptions", "corruption stage folder"),
    Flag("--validation", "corruption stage of the validation curve"),
    Flag("--out", "run folder: checkpoints, resumed from", required=True),
    Flag("--vocab-size", "m; default: the blocks manifest's", type=int),
    Flag("--tokenizer-hash", "default: the blocks manifest's", default=""),
    Flag("--no-resume", "start again, whatever the run folder holds", default=False, kind="switch"),
)

SCORE_FLAGS: tuple[Flag, ...] = (
    _CONFIG,
    _SET,
    Flag("--blocks", "blocks stage folder", required=True),
    Flag("--corruptions", "corruption stage folder", required=True),
    Flag("--mdm", "masked diffusion checkpoint", required=True),
    Flag("--ar", "autoregressive checkpoint (the baseline row)"),
    Flag("--out", "result JSON, written by rank 0", required=True),
)


def parser(prog: str, description: str, flags: Sequence[Flag]) -> argparse.ArgumentParser:
    """The argparse parser of a worker."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for f in flags:
        if f.kind == "switch":
            p.add_argument(f.name, action="store_true", help=f.help)
        elif f.kind == "repeat":
            p.add_argument(f.name, action="append", default=list(f.default), metavar="KEY=VALUE",
                           help=f.help)  # fmt: skip
        else:
            p.add_argument(f.name, required=f.required, default=f.default, type=f.type,
                           help=f.help)  # fmt: skip
    return p


def arguments(flags: Sequence[Flag], **values: Any) -> list[str]:
    """The argument list that :func:`parser` reads back as ``values``. A value of None, False, ""
    or an empty list is left out (the worker's default applies); a required flag must be given."""
    by_dest = {f.dest: f for f in flags}
    unknown = sorted(set(values) - set(by_dest))
    if unknown:
        raise TypeError(f"no worker flag for {', '.join(unknown)}; known: {sorted(by_dest)}")
    out: list[str] = []
    for f in flags:
        value = values.get(f.dest)
        if f.required and value is None:
            raise TypeError(f"{f.name} is required")
        if value is None or value is False or value == "" or (f.kind == "repeat" and not value):
            continue
        if f.kind == "switch":
            out.append(f.name)
        elif f.kind == "repeat":
            for item in value:
                out += [f.name, str(item)]
        else:
            out += [f.name, str(value)]
    return out
