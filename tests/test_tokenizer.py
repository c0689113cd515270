"""Tokenizer stage: byte-level BPE on the train split, characters, tokenizer.json files."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskdiff.config import DataConfig, TokenizerConfig
from maskdiff.data.ingest import doc_hash, ingest_documents, split_of
from maskdiff.data.tokenizer import (
    EOS_TOKEN,
    MASK_TOKEN,
    TOKENIZER_FILE,
    TokenizerError,
    document_key,
    load_tokenizer,
    sample_cutoff,
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


# ----------------------------------------------------------------------------- train_max_mb


def _texts(n: int = 400) -> list[str]:
    """Documents of varied lengths (12 to 400 bytes), all distinct."""
    return [f"document {i} " + "abcdefghij"[i % 10] * (i % 389) for i in range(n)]


def test_sample_is_bounded_uniform_and_ignores_order() -> None:
    """The kept documents fit the limit, are the same whatever the order the documents come in
    (and however they are batched), and are spread over the corpus, not its head."""
    texts = _texts()
    total = sum(len(t.encode()) for t in texts)
    limit = total // 3
    cutoff, stats = sample_cutoff([texts], limit)
    assert cutoff is not None
    kept = [t for t in texts if document_key(t) < cutoff]
    assert stats["bytes"] == sum(len(t.encode()) for t in kept) <= limit
    assert stats["documents"] == len(kept) and stats["of_bytes"] == total
    # nearly full: the next document in key order would not have fit
    assert stats["bytes"] > limit - max(len(t.encode()) for t in texts)
    shuffled = texts[::-1][::2] + texts[::-1][1::2]
    assert sample_cutoff([shuffled[:7], shuffled[7:]], limit)[0] == cutoff
    first_half = sum(1 for t in kept if texts.index(t) < len(texts) // 2)
    assert 0.3 < first_half / len(kept) < 0.7  # uniform over the corpus, not its first documents


def test_corpus_under_the_limit_trains_on_everything(pydoc_docs: Path, tmp_path: Path) -> None:
    """A limit above the split's size changes nothing in the tokenizer: every document is used."""
    cfg = TokenizerConfig(vocab_size=500, train_max_mb=None)
    whole = train_tokenizer(cfg, pydoc_docs, tmp_path)
    roomy = train_tokenizer(cfg.model_copy(update={"train_max_mb": 1e4}), pydoc_docs, tmp_path)
    sample = roomy.manifest["stats"]["train_sample"]
    assert sample["bytes"] == sample["of_bytes"] and sample["documents"] == sample["of_documents"]
    assert "train_sample" not in whole.manifest["stats"]
    assert (whole.path / TOKENIZER_FILE).read_bytes() == (roomy.path / TOKENIZER_FILE).read_bytes()


def test_train_max_mb_bounds_the_stage_and_keys_it(pydoc_docs: Path, tmp_path: Path) -> None:
    """A limit below the split trains on a sample under it, the same one each time; each limit
    is its own stage (the setting is part of the stage's hash)."""
    cfg = TokenizerConfig(vocab_size=500, train_max_mb=0.3)
    a = train_tokenizer(cfg, pydoc_docs, tmp_path / "a")
    b = train_tokenizer(cfg, pydoc_docs, tmp_path / "b")
    sample = a.manifest["stats"]["train_sample"]
    assert 0.2e6 < sample["bytes"] <= 0.3e6 < sample["of_bytes"]
    assert a.content_hash == b.content_hash and a.path.name == b.path.name
    more = cfg.model_copy(update={"train_max_mb": 0.4})
    other = train_tokenizer(more, pydoc_docs, tmp_path / "a")
    assert other.path.name != a.path.name and not other.reused
    assert other.manifest["stats"]["train_sample"]["bytes"] > sample["bytes"]
    whole = train_tokenizer(cfg.model_copy(update={"train_max_mb": None}), pydoc_docs, tmp_path)
    assert (whole.path / TOKENIZER_FILE).read_bytes() != (a.path / TOKENIZER_FILE).read_bytes()
