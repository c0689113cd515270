"""The typed configuration tree, loaded once from ``conf/*.yaml`` plus dotted overrides.

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or an
out-of-range value is a :class:`ConfigError` that names the dotted key and the file (or the
``--set`` override) it came from. The data stages take only their own sections
(``build_blocks(cfg.data, ...)``, ``build_corruptions(cfg.corruption, cfg.diffusion, ...)``);
training, scoring and sampling read several sections at once and take the whole :class:`Config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    ValidationError,
    model_validator,
)

from maskdiff.config_sections import (
    ConfigError,
    CorruptionConfig,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    MarkovConfig,
    ModelConfig,
    NightlyConfig,
    RuntimeConfig,
    SampleConfig,
    SweepConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
    _Section,
)

__all__ = [
    "Config",
    "ConfigError",
    "CorruptionConfig",
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "MarkovConfig",
    "ModelConfig",
    "NightlyConfig",
    "RuntimeConfig",
    "SampleConfig",
    "SweepConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainConfig",
    "available_presets",
    "conf_dir",
    "load_config",
    "resolve_preset",
]


class Config(_Section):
    """The whole run. Field defaults are the embedded default run (``conf/default.yaml``)."""

    name: str = "default"
    ar_baseline: bool = Field(True, description="also train and evaluate the AR baseline")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}: the model cannot take blocks that long"
            )
        if self.train.batch_size % self.train.grad_accum:
            raise ValueError("train.batch_size must be divisible by train.grad_accum")
        return self

    def flat(self) -> dict[str, Any]:
        """The tree as ``{"train.lr": 1e-3, ...}`` (for MLflow params and reports)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


# ----------------------------------------------------------------------------- loading


def conf_dir() -> Path:
    """The folder of presets: ``$MASKDIFF_CONF_DIR``, else ``./conf``, else the repository's."""
    env = os.environ.get("MASKDIFF_CONF_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "conf"
    if (local / "default.yaml").is_file():
        return local
    return Path(__file__).resolve().parents[2] / "conf"


def available_presets() -> list[str]:
    return sorted(p.stem for p in conf_dir().glob("*.yaml"))


def resolve_preset(name_or_path: str | os.PathLike[str]) -> Path:
    """A YAML path as given, or the preset of that name in :func:`conf_dir`."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = conf_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown preset {str(name_or_path)!r}: no {candidate}; "
            f"available: {', '.join(available_presets()) or 'none'}"
        )
    return candidate


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML does not parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: malformed key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} does not parse: {exc}") from exc
    return key, value


def _format_errors(exc: ValidationError, origin: str, override_keys: set[str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        where = "--set" if key in override_keys else origin
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {key}: {msg}")
    return "; ".join(lines)


def load_config(
    preset: str | os.PathLike[str] | None = "default",
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Load a preset or YAML file, apply dotted overrides, validate once.

    ``overrides`` is a list of ``"a.b=value"`` strings or a ``{"a.b": value}`` mapping.
    """
    tree: dict[str, Any] = {}
    origin = "<defaults>"
    if preset is not None:
        path = resolve_preset(preset)
        tree = _read_yaml(path)
        origin = str(path)
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else list((overrides or {}).items())
    )
    for key, value in items:
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, {k for k, _ in items})) from exc
