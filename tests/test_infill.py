"""Infill templates (maskdiff.infill) and the loaded model (maskdiff.textgen): syntax, in-context
tokenization, the one-line errors, rendering, held-out examples, and every sampler through
``TextModel`` on a real (untrained) denoiser and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskdiff.checkpoint import load_checkpoint, save_checkpoint
from maskdiff.config import Config, DataConfig, TokenizerConfig
from maskdiff.data.ingest import ingest_documents
from maskdiff.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from maskdiff.infill import (
    TemplateError,
    continuation_template,
    encode_template,
    gap_texts,
    parse_template,
    render,
)
from maskdiff.model import build_model
from maskdiff.textgen import TextModel, heldout_templates


@pytest.fixture(scope="module")
def bpe_stage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bpe")
    docs = ingest_documents(DataConfig(builtin="pydoc", root=str(root))).path
    return train_tokenizer(TokenizerConfig(vocab_size=600), docs, root).path


@pytest.fixture(scope="module")
def bpe(bpe_stage: Path) -> Tokenizer:
    return load_tokenizer(bpe_stage)


@pytest.fixture(scope="module")
def char_stage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("char")
    docs = ingest_documents(DataConfig(builtin="markov", root=str(root))).path
    return train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), docs, root).path


def test_parse_template_segments_and_errors() -> None:
    assert parse_template("a[MASK]b[MASK:3][MASK: 2]") == ["a", 1, "b", 3, 2]
    assert parse_template("[MASK:12]") == [12]
    for bad, words in [
        ("x = [MASK:0] + 1", "'[MASK:0]' at character 4 is a gap of 0 tokens"),
        ("x[MASK:two]", "'[MASK:two]' at character 1: write [MASK] or [MASK:N]"),
        ("[MASK:-1]", "'[MASK:-1]' at character 0"),
        ("no gap here", "has no gap"),
        ("[mask] is not a gap", "has no gap"),
    ]:
        with pytest.raises(TemplateError) as err:
            parse_template(bad)
        assert words in str(err.value) and "\n" not in str(err.value)


def test_known_text_is_tokenized_as_in_context(bpe: Tokenizer) -> None:
    tpl = encode_template("def f(x):[MASK:5] return y", bpe, block_length=64)
    head, tail = bpe.encode(["def f(x):"])[0], bpe.encode([" return y"])[0]
    whole = bpe.encode(["def f(x): return y"])[0]
    assert whole[-len(tail) :] == tail  # the segment alone = the same words in the whole text
    assert tpl.ids == head + [bpe.mask_id] * 5 + tail
    assert tpl.spans == [(False, 0, len(head)), (True, len(head), len(head) + 5),
                         (False, len(head) + 5, len(tpl))]  # fmt: skip
    assert tpl.n_gap_tokens == 5
    # "[MASK]" written inside known text is the gap syntax; the ids never contain a known [MASK]
    assert bpe.mask_id not in bpe.encode(["a [MASK] b"])[0]
    with pytest.raises(TemplateError, match=r"is \d+ tokens, longer than the model's block "
                       r"length 8"):  # fmt: skip
        encode_template("def f(x):[MASK:5] return y", bpe, block_length=8)


def test_unencodable_text_is_named(char_stage: Path) -> None:
    tok = load_tokenizer(char_stage)
    with pytest.raises(TemplateError, match=r"cannot encode 'é', 'ü' in '!é\"ü'"):
        encode_template('!é"ü[MASK:2]', tok, block_length=32)
    with pytest.raises(TemplateError, match="leaves nothing to generate in 3"):
        continuation_template('!"#$', tok, 3)


def test_render_and_continuation(char_stage: Path) -> None:
    tok = load_tokenizer(char_stage)
    tpl = encode_template('!"[MASK:2]#', tok, block_length=16)
    filled = list(tpl.ids)
    filled[2:4] = tok.encode(["$%"])[0]
    assert render(filled, tpl, tok) == '!"[[$%]]#'
    assert render(filled, tpl, tok, "plain") == '!"$%#'
    assert render(filled, tpl, tok, "ansi") == '!"\x1b[1;4;32m$%\x1b[0m#'
    assert gap_texts(filled, tpl, tok) == ["$%"]
    cont = continuation_template("!!", tok, 40)  # longer than a block: semi-AR, allowed
    assert len(cont) == 40 and cont.n_gap_tokens == 38 and cont.ids[:2] == tok.encode(["!!"])[0]


def test_heldout_templates_cut_a_middle_gap(char_stage: Path) -> None:
    tok = load_tokenizer(char_stage)
    blocks = [tok.encode(['!"#$%&()*+'])[0], tok.encode(['+*)(&%$#"!'])[0]]
    pairs = heldout_templates(blocks, tok, n=2, gap=4)
    assert [orig for _, orig in pairs] == blocks
    tpl, orig = pairs[0]
    assert tpl.ids == orig[:3] + [tok.mask_id] * 4 + orig[7:]
    assert tpl.text == '!"#[MASK:4])*+'
    assert encode_template(tpl.text, tok, 10).ids == tpl.ids  # the text parses back to it
    assert render(orig, tpl, tok) == '!"#[[$%&(]])*+'


def _model(char_stage: Path, **model: object) -> TextModel:
    tok = load_tokenizer(char_stage)
    cfg = Config.model_validate(
        {"data": {"seq_len": 24}, "model": {"preset": "custom", "n_layers": 1, "d_model": 16,
                                            "n_heads": 2, "max_seq_len": 32, **model}}
    )  # fmt: skip
    torch.manual_seed(0)
    return TextModel(build_model(cfg.model, tok.vocab_size), cfg, tok, torch.device("cpu"))


@pytest.mark.parametrize("sampler", ["ancestral", "confidence", "remask"])
def test_every_sampler_keeps_the_known_text(char_stage: Path, sampler: str) -> None:
    model = _model(char_stage)
    texts = ['!"[MASK:4]#$[MASK]%', "&&[MASK:6]"]
    out = model.infill(texts, sampler=sampler, steps=3, seed=1)
    assert out.sampler == sampler and out.network_calls == 3  # 3 < the 6 gap tokens of row 2
    first, second = out.filled
    assert first.text.startswith('!"') and first.text[6:8] == "#$" and first.text.endswith("%")
    assert [len(g) for g in first.gaps] == [4, 1] and len(second.gaps[0]) == 6
    assert first.marked == f'!"[[{first.gaps[0]}]]#$[[{first.gaps[1]}]]%'
    assert all(t < model.tokenizer.vocab_size for t in first.tokens + second.tokens)
    again = model.infill(texts, sampler=sampler, steps=3, seed=1)
    assert [f.tokens for f in again.filled] == [f.tokens for f in out.filled]
    # a shorter row is padded with free context, not gaps: 4 steps cover the 2 gap tokens of
    # the first row, so the ancestral sampler runs one call per gap token (first hitting)
    short = model.infill(['!"[MASK:2]', "&&&&&&[MASK]"], sampler=sampler, steps=4)
    assert short.network_calls == 2 if sampler != "remask" else 4
    long = model.continuation(["!!"], length=50, sampler=sampler, steps=2)
    assert len(long.filled[0].tokens) == 50 and long.filled[0].text.startswith("!!")


def test_settings_validate_overrides(char_stage: Path) -> None:
    model = _model(char_stage)
    assert model.settings(steps=None).steps == model.cfg.sample.steps
    with pytest.raises(ValueError, match="sampler"):
        model.settings(sampler="greedy")
    with pytest.raises(ValueError, match="top_p"):
        model.settings(top_p=0)


def test_load_refuses_another_tokenizer(char_stage: Path, tmp_path: Path, bpe_stage: Path) -> None:
    model = _model(char_stage)
    ckpt = tmp_path / "m.pt"
    fingerprint = {"tokenizer_hash": json.loads((char_stage / "manifest.json").read_text())
                   ["content_hash"]}  # fmt: skip
    save_checkpoint(ckpt, {"config": model.cfg.model_dump_json(), "fingerprint": fingerprint,
                           "vocab_size": model.tokenizer.vocab_size,
                           "model": model.model.state_dict(), "ema": None})  # fmt: skip
    assert load_checkpoint(ckpt)["vocab_size"] == model.tokenizer.vocab_size
    loaded = TextModel.load(ckpt, char_stage, device="cpu")
    assert loaded.block_length == 24
    with pytest.raises(ValueError, match=f"{bpe_stage} is not the tokenizer {ckpt} was trained"):
        TextModel.load(ckpt, bpe_stage, device="cpu")
