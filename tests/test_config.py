"""The typed config: presets load, overrides apply, bad keys/types/ranges name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONF

from maskdiff.config import Config, ConfigError, available_presets, load_config


@pytest.mark.parametrize(
    "preset", ["smoke", "default", "text8", "wikitext103", "openwebtext", "lm1b"]
)
def test_every_preset_loads(preset, monkeypatch) -> None:
    monkeypatch.setenv("MASKDIFF_CONF_DIR", str(CONF))
    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_gpu_recipes_use_paper_sizes(monkeypatch) -> None:
    monkeypatch.setenv("MASKDIFF_CONF_DIR", str(CONF))
    owt = load_config("openwebtext")
    assert (owt.model.n_layers, owt.model.d_model, owt.model.n_heads) == (12, 768, 12)
    assert owt.data.seq_len == 1024 and owt.train.batch_size == 512
    assert load_config("text8").data.seq_len == 256
    assert load_config("lm1b").data.seq_len == 128
    assert set(available_presets()) >= {"smoke", "default", "text8"}


def test_model_preset_fills_sizes_but_explicit_wins() -> None:
    cfg = Config.model_validate({"model": {"preset": "medium"}})
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (24, 1024, 16)
    cfg = Config.model_validate({"model": {"preset": "small", "n_layers": 6}})
    assert (cfg.model.n_layers, cfg.model.d_model) == (6, 768)


def test_overrides_apply_with_types(monkeypatch) -> None:
    monkeypatch.setenv("MASKDIFF_CONF_DIR", str(CONF))
    cfg = load_config("smoke", ["train.lr=1e-3", "diffusion.T=[5, 50]", "model.kind=ar"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.diffusion.T == [5, 50]
    assert cfg.model.kind == "ar"
    cfg = load_config("smoke", {"train.max_steps": 7})
    assert cfg.train.max_steps == 7


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_file(tmp_path) -> None:
    path = _write(tmp_path, "train:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.lrr" in str(info.value) and str(path) in str(info.value)
    assert "unknown key" in str(info.value)


def test_unknown_override_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"--set: model\.widht: unknown key"):
        load_config(None, ["model.widht=3"])


def test_wrong_type_and_range(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(_write(tmp_path, "train:\n  batch_size: many\n"))
    with pytest.raises(ConfigError, match=r"data\.seq_len.*greater than 1"):
        load_config(_write(tmp_path, "data:\n  seq_len: 0\n"))
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        load_config(None, ["model.n_layers=-2"])


def test_cross_field_errors() -> None:
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        load_config(None, ["data.seq_len=4096", "model.max_seq_len=1024"])
    with pytest.raises(ConfigError, match="not divisible by n_heads"):
        load_config(None, ["model.preset=custom", "model.d_model=100", "model.n_heads=3"])
    with pytest.raises(ConfigError, match="data.paths is empty"):
        load_config(None, ["data.source=local"])


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])


def test_yaml_is_loaded_safely(tmp_path) -> None:
    path = _write(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(path)


def test_flat_view() -> None:
    flat = Config().flat()
    assert flat["train.lr"] == Config().train.lr
    assert flat["data.markov.order"] == 1
    assert all(not isinstance(v, dict) for v in flat.values())
