"""Tokenizer stage: byte-level BPE on the train split, characters, tokenizer.json files."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskdiff.config import DataConfig, TokenizerConfig
from maskdiff.data.ingest import doc_hash, ingest_documents, split_of
from maskdiff.data.tokenizer import (
    EOS_TOKEN,
    MASK_TOKEN,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def pydoc_docs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    return ingest_documents(DataConfig(builtin="pydoc", root=str(root))).path


def test_bpe_layout_and_roundtrip(pydoc_docs: Path, tmp_path: Path) -> None:
    res = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=600), pydoc_docs, tmp_path)
    tok = load_tokenizer(res.path)
    assert tok.vocab_size == 600 == res.manifest["stats"]["vocab_size"]
    assert tok.mask_id == tok.vocab_size and tok.eos_id == 0
    assert tok.inner.id_to_token(tok.mask_id) == MASK_TOKEN
    assert tok.inner.id_to_token(tok.eos_id) == EOS_TOKEN
    text = "The for statement iterates — naïve café ☃\n"
    ids = tok.encode([text])[0]
    assert max(ids) < tok.vocab_size and tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode())
    assert MASK_TOKEN not in "".join(tok.inner.id_to_token(i) for i in ids)


def test_bpe_is_trained_on_train_split_only(tmp_path: Path) -> None:
    word = "zqxjvk"
    docs = [f"ordinary words number {i} appear here" for i in range(300)]
    # find a document text that hashes into the validation split and repeat the odd word in it
    held_out = next(
        t
        for i in range(10_000)
        if split_of(doc_hash(t := f"{word} " * 50 + str(i)), 0.1, 0.1) == "validation"
    )
    (tmp_path / "c.txt").write_text("\n".join([*docs, held_out]))
    data = DataConfig(
        source="local",
        paths=[str(tmp_path / "c.txt")],
        text_unit="line",
        val_fraction=0.1,
        test_fraction=0.1,
        root=str(tmp_path / "runs"),
    )
    documents = ingest_documents(data).path
    tok = load_tokenizer(
        train_tokenizer(TokenizerConfig(vocab_size=400, min_frequency=2), documents, data.root).path
    )
    assert len(tok.encode([word])[0]) >= 3  # never merged: it appears only in validation
    assert len(tok.encode(["ordinary"])[0]) == 1


def test_char_tokenizer(tmp_path: Path) -> None:
    data = DataConfig(builtin="markov", root=str(tmp_path))
    documents = ingest_documents(data).path
    res = train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), documents, tmp_path)
    tok = load_tokenizer(res.path)
    assert tok.vocab_size == data.markov.vocab_size + 2  # symbols, EOS, [UNK]
    assert tok.mask_id == tok.vocab_size
    ids = tok.encode(['!"#', "!~"])
    assert ids[0] == [2, 3, 4] and ids[1] == [2, tok.unk_id]
    assert tok.decode(ids[0]) == '!"#'
    with pytest.raises(TokenizerError, match="tokenizer.vocab_size=8"):
        train_tokenizer(TokenizerConfig(kind="char", vocab_size=8), documents, tmp_path)


def test_tokenizer_file_kind(pydoc_docs: Path, tmp_path: Path) -> None:
    bpe = load_tokenizer(
        train_tokenizer(TokenizerConfig(vocab_size=300), pydoc_docs, tmp_path / "a").path
    )
    path = tmp_path / "tok.json"
    bpe.save(path)
    res = train_tokenizer(
        TokenizerConfig(kind="file", path=str(path), vocab_size=300), pydoc_docs, tmp_path / "b"
    )
    tok = load_tokenizer(res.path)
    assert (tok.vocab_size, tok.eos_id, tok.mask_id) == (bpe.vocab_size, 0, 300)
    with pytest.raises(TokenizerError, match="exceed tokenizer.vocab_size=299"):
        train_tokenizer(
            TokenizerConfig(kind="file", path=str(path), vocab_size=299), pydoc_docs, tmp_path / "c"
        )
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": {"type": "BPE", ')
    with pytest.raises(TokenizerError, match="broken.json"):
        train_tokenizer(TokenizerConfig(kind="file", path=str(broken)), pydoc_docs, tmp_path / "d")
    assert not list((tmp_path / "d").glob("tokenizer-*"))


def test_bpe_is_deterministic(pydoc_docs: Path, tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=500)
    a = train_tokenizer(cfg, pydoc_docs, tmp_path / "a")
    b = train_tokenizer(cfg, pydoc_docs, tmp_path / "b")
    assert a.content_hash == b.content_hash and a.path.name == b.path.name
    assert train_tokenizer(cfg, pydoc_docs, tmp_path / "a").reused


def test_bpe_vocab_too_small_is_an_error(pydoc_docs: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="at least 257"):
        train_tokenizer(TokenizerConfig(vocab_size=100), pydoc_docs, tmp_path)


def test_special_token_text_is_never_a_special_id(pydoc_docs: Path, tmp_path: Path) -> None:
    for cfg in (TokenizerConfig(vocab_size=400), TokenizerConfig(kind="char", vocab_size=400)):
        tok = load_tokenizer(train_tokenizer(cfg, pydoc_docs, tmp_path).path)
        text = f"a {MASK_TOKEN} b {EOS_TOKEN} c"
        ids = tok.encode([text])[0]
        assert tok.mask_id not in ids and tok.eos_id not in ids
        assert max(ids) < tok.vocab_size


def test_pretrained_offline_error(pydoc_docs: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TokenizerError, match="tokenizer.kind=file"):
        train_tokenizer(TokenizerConfig(kind="pretrained", name="gpt2"), pydoc_docs, tmp_path)
