"""Sweeps: a grid of config overrides expanded into validated points, and the record that lets a
sweep started again rerun only the points that did not finish.

A grid is a list of ``key=v1,v2,...`` strings (the values parsed as ``--set`` parses them; commas
inside brackets belong to a list value, ``sample.frontier_steps=[8,16],[32]``). The points are
the cartesian product, in grid order (the last axis varies fastest). Every point is validated
before anything runs: one bad value anywhere refuses the whole sweep with every problem named.

A point's identity (:func:`point_key`) is the hash of everything its results depend on: the
config without ``runtime``, ``tracking``, ``nightly``, ``sweep`` and ``name`` (where and how it
runs, not what it computes). Two points of one grid with the same identity are refused. The
data stages a point needs depend on fewer sections (:func:`data_key`); points with the same data
key share every stage folder, and the sweep builds each once before training anything.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskdiff.config import Config, ConfigError, load_config, parse_override
from maskdiff.data.stage import config_hash, write_json_atomic

__all__ = [
    "Axis",
    "Point",
    "SweepRecord",
    "choose_baseline",
    "data_key",
    "expand",
    "parse_grid",
    "point_key",
    "sweep_key",
]

# Sections that say where and how a run executes, never what it computes.
NOT_RESULTS = {"runtime", "tracking", "nightly", "sweep", "name"}
# Sections the data stages (documents, tokenizer, blocks, corruptions) are built from.
DATA_SECTIONS = ("data", "tokenizer", "corruption", "diffusion")


@dataclass(frozen=True)
class Axis:
    """One ``--grid`` entry: a dotted key and its values (parsed, and as written)."""

    key: str
    values: tuple[Any, ...]
    raw: tuple[str, ...]


@dataclass(frozen=True)
class Point:
    """One configuration of a sweep."""

    index: int  # 0-based, in grid order
    values: dict[str, Any]  # grid key -> value
    overrides: tuple[str, ...]  # the sweep's overrides, then this point's
    config: Config
    key: str  # point_key(config)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.values.items())

    @property
    def number(self) -> str:
        return f"point {self.index + 1}"


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and braces: ``8,[1,2],x`` -> ``8``, ``[1,2]``, ``x``."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_grid(items: Sequence[str]) -> list[Axis]:
    """``["train.lr=1e-3,3e-3", ...]`` -> axes. A malformed entry, an empty value, a key given
    twice or a value repeated within an axis is a :class:`ConfigError` naming the entry."""
    if not items:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    axes: list[Axis] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        key, _, rest = item.partition("=")
        key = key.strip()
        raw = _split_values(rest)
        if not rest.strip() or any(not r for r in raw):
            raise ConfigError(f"--grid {item!r}: an empty value (give key=v1,v2,...)")
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid {key}: the key is given twice; list all its values once")
        values = tuple(parse_override(f"{key}={r}")[1] for r in raw)
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        parse_override(f"{key}={raw[0]}")  # a malformed key is named here
        axes.append(Axis(key, values, tuple(raw)))
    return axes


def point_key(cfg: Config) -> str:
    """The identity of a point: what its results depend on (see the module docstring)."""
    return config_hash(cfg.model_dump(mode="json", exclude=NOT_RESULTS))


def data_key(cfg: Config) -> str:
    """The identity of the data stages a config needs: points sharing it share every stage."""
    dump = cfg.model_dump(mode="json")
    return config_hash({s: dump[s] for s in DATA_SECTIONS})


def sweep_key(points: Sequence[Point]) -> str:
    """The identity of a sweep: its points' identities in order. Started again with the same
    preset and grid (whatever its runtime settings), a sweep finds its own record."""
    return config_hash([p.key for p in points])


def expand(preset: str, overrides: Sequence[str], axes: Sequence[Axis]) -> list[Point]:
    """Every point of the grid, validated. Each problem (a bad value, an unknown key, two points
    that are the same run) is listed in one :class:`ConfigError`, naming the point and key."""
    combos = list(itertools.product(*(range(len(a.values)) for a in axes)))
    points, problems = [], []
    for index, combo in enumerate(combos):
        values = {a.key: a.values[i] for a, i in zip(axes, combo, strict=True)}
        own = [f"{a.key}={a.raw[i]}" for a, i in zip(axes, combo, strict=True)]
        label = ", ".join(own)
        try:
            cfg = load_config(preset, [*overrides, *own])
        except ConfigError as err:
            problems.append(f"point {index + 1} of {len(combos)} ({label}): {err}")
            continue
        flat = cfg.flat()  # the validated values: "1e-3" (a string to YAML) is 0.001 here
        values = {k: flat.get(k, v) for k, v in values.items()}
        points.append(Point(index, values, (*overrides, *own), cfg, point_key(cfg)))
    if problems:
        raise ConfigError("the sweep is refused before any work: " + "; ".join(problems))
    first: dict[str, Point] = {}
    for point in points:
        other = first.setdefault(point.key, point)
        if other is not point:
            problems.append(
                f"{other.number} ({other.label}) and {point.number} ({point.label}) are the same "
                "run: they differ only in runtime, tracking or nightly settings"
            )
    if problems:
        raise ConfigError("the sweep is refused before any work: " + "; ".join(problems))
    return points


def choose_baseline(points: Sequence[Point], spec: str | None) -> Point:
    """The point the others are compared with: the first, or the first whose grid value of
    ``key`` equals ``value`` for ``spec`` = ``key=value``."""
    if not spec:
        return points[0]
    key, value = parse_override(spec)
    if key not in points[0].values:
        keys = ", ".join(points[0].values)
        raise ConfigError(f"--baseline {spec}: {key} is not a grid key (the grid has {keys})")
    for point in points:
        if _same(point.values[key], value):
            return point
    choices = ", ".join(sorted({_show(p.values[key]) for p in points}))
    raise ConfigError(f"--baseline {spec}: no point has {key}={_show(value)} (it takes {choices})")


def _same(value: Any, given: Any) -> bool:
    """A grid value equals a ``--baseline`` value, numbers compared as numbers (``1e-3``)."""
    if value == given or _show(value) == str(given):
        return True
    try:
        return float(value) == float(given)
    except (TypeError, ValueError):
        return False


@dataclass
class SweepRecord:
    """What a sweep has done, kept in ``<root>/sweeps/<sweep key>/sweep.json`` (written through a
    temporary file): the MLflow parent run, and per point (by identity) its outcome."""

    path: Path
    key: str
    parent_run_id: str | None = None
    points: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, points: Sequence[Point]) -> SweepRecord:
        key = sweep_key(points)
        path = root / "sweeps" / key / "sweep.json"
        if not path.is_file():
            return cls(path, key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: the sweep record does not read ({exc}); move it away to "
                              "start the sweep afresh") from exc  # fmt: skip
        return cls(path, key, data.get("parent_run_id"), dict(data.get("points", {})))

    @property
    def folder(self) -> Path:
        return self.path.parent

    def finished(self, point: Point) -> dict[str, Any] | None:
        """The record of ``point`` if it finished and its run summary is still there."""
        entry = self.points.get(point.key)
        if entry and entry.get("status") == "finished" and Path(entry["summary"]).is_file():
            return entry
        return None

    def update(self, point: Point, **entry: Any) -> None:
        self.points[point.key] = {"label": point.label, "values": point.values,
                                  "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}  # fmt: skip
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"key": self.key, "parent_run_id": self.parent_run_id,
                                      "points": self.points})  # fmt: skip
