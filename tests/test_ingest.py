"""Ingestion: built-in corpora, local txt/jsonl/parquet, the offline Hub error, splits, counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskdiff.config import DataConfig
from maskdiff.data.ingest import IngestError, chunk_text, ingest_documents, split_of
from maskdiff.data.markov import symbol_alphabet
from maskdiff.data.stage import list_shards


def _texts(stage_dir: Path, split: str | None = None) -> list[str]:
    splits = [split] if split else ["train", "validation", "test"]
    out: list[str] = []
    for s in splits:
        for shard in list_shards(stage_dir, s):
            out += pq.read_table(shard).column("text").to_pylist()
    return out


def _local(tmp_path: Path, paths: list[str], **kw) -> DataConfig:
    return DataConfig(source="local", paths=paths, root=str(tmp_path / "runs"), **kw)


def test_pydoc_builtin(tmp_path: Path) -> None:
    res = ingest_documents(DataConfig(builtin="pydoc", root=str(tmp_path), text_unit="file"))
    stats = res.manifest["stats"]
    from pydoc_data.topics import topics

    assert sum(stats["documents"].values()) + stats["duplicate_documents"] == len(topics)
    assert 300_000 < sum(stats["bytes"].values()) < 2_000_000
    assert stats["documents"]["train"] > stats["documents"]["validation"]
    assert len(_texts(res.path)) == sum(stats["documents"].values())


def test_stdlib_builtin_capped(tmp_path: Path) -> None:
    res = ingest_documents(DataConfig(builtin="stdlib", max_documents=25, root=str(tmp_path)))
    stats = res.manifest["stats"]
    assert sum(stats["documents"].values()) == 25
    assert stats["capped_at_max_documents"] is True
    sources = pq.read_table(list_shards(res.path, "train")[0]).column("source").to_pylist()
    assert all(s.endswith(".py") for s in sources)


def test_markov_builtin_records_entropy(tmp_path: Path) -> None:
    cfg = DataConfig(builtin="markov", root=str(tmp_path))
    cfg.markov.n_documents, cfg.markov.doc_length, cfg.markov.vocab_size = 50, 40, 6
    res = ingest_documents(cfg)
    markov = res.manifest["stats"]["markov"]
    texts = _texts(res.path)
    assert len(texts) == 50 and all(len(t) == 40 for t in texts)
    assert set("".join(texts)) <= set(symbol_alphabet(6))
    rate = markov["entropy_rate_nats_per_symbol"]
    assert 0 < rate < 1.8  # below log(6)
    assert markov["nll_floor_nats_per_token"] == pytest.approx(markov["doc_entropy_nats"] / 41)
    assert markov["doc_entropy_nats"] == pytest.approx(markov["initial_entropy_nats"] + 39 * rate)


def test_txt_units_and_counts(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("first para\n\n\nsecond para\nline two\n\n   \n\nfirst para\n")
    (folder / "b.txt").write_bytes(b"valid text \xff\xfe here\nmore")
    by_para = ingest_documents(_local(tmp_path, [str(folder)])).manifest["stats"]
    assert sum(by_para["documents"].values()) == 3  # a: 2 distinct (+1 dup), b: 1 paragraph
    assert by_para["duplicate_documents"] == 1
    assert by_para["empty_documents"] == 1
    assert by_para["invalid_utf8_bytes"] == 2
    assert by_para["files_with_invalid_utf8"] == [str(folder / "b.txt")]
    by_line = ingest_documents(_local(tmp_path, [str(folder)], text_unit="line")).manifest["stats"]
    assert sum(by_line["documents"].values()) == 5  # 3 distinct lines of a, 2 of b
    by_file = ingest_documents(_local(tmp_path, [str(folder)], text_unit="file")).manifest["stats"]
    assert sum(by_file["documents"].values()) == 2


def test_jsonl_parquet_and_globs(tmp_path: Path) -> None:
    rows = [{"body": f"document number {i}", "other": i} for i in range(30)]
    (tmp_path / "d1.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:15]) + "\n")
    pq.write_table(pa.table({"body": [r["body"] for r in rows[15:]]}), tmp_path / "d2.parquet")
    res = ingest_documents(_local(tmp_path, [str(tmp_path / "d*")], text_column="body"))
    texts = sorted(_texts(res.path))
    assert texts == sorted(r["body"] for r in rows)
    assert res.manifest["stats"]["files"] == 2


def test_jsonl_missing_key_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(IngestError, match=r"x\.jsonl:2: no key 'text'"):
        ingest_documents(_local(tmp_path, [str(tmp_path / "x.jsonl")]))


def test_parquet_missing_column_and_truncated(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["a b c"] * 5}), tmp_path / "p.parquet")
    with pytest.raises(IngestError, match=r"p\.parquet: no column 'text'"):
        ingest_documents(_local(tmp_path, [str(tmp_path / "p.parquet")]))
    data = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match=r"t\.parquet"):
        ingest_documents(_local(tmp_path, [str(tmp_path / "t.parquet")], text_column="body"))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "no documents"), (b"\n\n  \n\n\n", "no documents"), (b"\xff\xfe\xfa" * 50, "not UTF-8")],
)
def test_bad_corpora_are_errors(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(IngestError, match=message) as info:
        ingest_documents(_local(tmp_path, [str(tmp_path / "bad.txt")], text_unit="line"))
    assert "bad.txt" in str(info.value)
    assert not list((tmp_path / "runs").glob("documents-*"))  # nothing half-written is left


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="nowhere.txt"):
        ingest_documents(_local(tmp_path, [str(tmp_path / "nowhere.txt")]))
    with pytest.raises(IngestError, match="matches no file"):
        ingest_documents(_local(tmp_path, [str(tmp_path / "*.jsonl")]))


def test_split_is_by_content_and_stable(tmp_path: Path) -> None:
    docs = [f"doc {i} " + "x" * (i % 7) for i in range(400)]
    (tmp_path / "a.txt").write_text("\n".join(docs[:200]))
    first = ingest_documents(_local(tmp_path, [str(tmp_path / "a.txt")], text_unit="line"))
    (tmp_path / "b.txt").write_text("\n".join(docs[200:]))
    both = ingest_documents(
        _local(tmp_path, [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], text_unit="line")
    )
    assert first.path != both.path
    for split in ("train", "validation", "test"):
        assert set(_texts(first.path, split)) <= set(_texts(both.path, split))
    counts = both.manifest["stats"]["documents"]
    assert counts["validation"] + counts["test"] > 10  # about 10% of 400
    assert split_of(0, 0.1, 0.1) == "validation" and split_of((1 << 63) - 1, 0.1, 0.1) == "train"


def test_offline_hub_error_says_how_to_use_local_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = DataConfig(source="hub", hub_name="roneneldan/TinyStories", root=str(tmp_path))
    with pytest.raises(IngestError) as info:
        ingest_documents(cfg)
    message = str(info.value)
    assert "roneneldan/TinyStories" in message
    assert "data.source=local" in message and "data.paths" in message


def test_jsonl_invalid_bytes_are_counted(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_bytes(
        b'{"text": "caf\xc3\xa9 ok"}\n{"text": "bad \xff\xfe bytes"}\n'
    )
    stats = ingest_documents(_local(tmp_path, [str(tmp_path / "x.jsonl")])).manifest["stats"]
    assert sum(stats["documents"].values()) == 2
    assert stats["invalid_utf8_bytes"] == 2
    assert stats["files_with_invalid_utf8"] == [str(tmp_path / "x.jsonl")]


def test_rerun_reuses_and_edited_file_makes_new_stage(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("alpha\n\nbeta\n\ngamma\n")
    cfg = _local(tmp_path, [str(corpus)])
    first = ingest_documents(cfg)
    assert ingest_documents(cfg).reused
    corpus.write_text("alpha\n\nbeta\n\ngamma\n\ndelta\n")
    second = ingest_documents(cfg)
    assert second.path != first.path and not second.reused
    assert (first.path / "manifest.json").is_file()  # the old stage is left as it was


def _one_line(n_chars: int, seed: int) -> str:
    """A text8-like line: lowercase words of 1-12 letters joined by single spaces."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(ord("a"), ord("z") + 1, n_chars, dtype=np.uint8)
    spaces = np.cumsum(rng.integers(2, 14, n_chars // 2 + 1)) - 1  # each word + its space
    codes[spaces[spaces < n_chars]] = ord(" ")
    return codes.tobytes().decode("ascii")


def test_chunk_text_cuts_after_whitespace_and_loses_nothing() -> None:
    assert list(chunk_text("ab cd ef", 4)) == ["ab ", "cd ", "ef"]
    assert list(chunk_text("a" * 2500 + " bc", 1000)) == ["a" * 1000, "a" * 1000, "a" * 500 + " bc"]
    assert list(chunk_text("short", None)) == ["short"] == list(chunk_text("short", 5))
    line = _one_line(20_000, seed=1)
    pieces = list(chunk_text(line, 300))
    assert "".join(pieces) == line
    assert all(len(p) <= 300 for p in pieces) and all(p.endswith(" ") for p in pieces[:-1])
    assert min(len(p) for p in pieces[:-1]) >= 300 - 12  # words are at most 12 letters


def test_position_split_of_one_long_line(tmp_path: Path) -> None:
    """text8's convention on a 100k-character line: 90% / 5% / 5% contiguous, exactly."""
    line = _one_line(100_000, seed=0)
    (tmp_path / "text8.txt").write_text(line + "\n")
    paths = [str(tmp_path / "text8.txt")]
    res = ingest_documents(
        _local(tmp_path, paths, text_unit="line", chunk_chars=1000, split_by="position")
    )
    parts = {s: _texts(res.path, s) for s in ("train", "validation", "test")}
    joined = {s: "".join(docs) for s, docs in parts.items()}
    assert {s: len(t) for s, t in joined.items()} == {
        "train": 90_000,
        "validation": 5_000,
        "test": 5_000,
    }
    assert res.manifest["stats"]["chars"] == {"train": 90_000, "validation": 5_000, "test": 5_000}
    assert joined["train"] + joined["validation"] + joined["test"] == line  # nothing lost
    for docs in parts.values():  # whole words, except where a split boundary cuts one
        assert all(len(d) <= 1000 for d in docs) and all(d.endswith(" ") for d in docs[:-1])
    ends = set(np.cumsum([len(c) for c in chunk_text(line, 1000)]).tolist())
    n_chunks, cut = len(ends), sum(b not in ends for b in (90_000, 95_000))
    assert sum(res.manifest["stats"]["documents"].values()) == n_chunks + cut
    # adding text at the end moves only the tail: the old train split is a prefix of the new one
    (tmp_path / "more.txt").write_text(_one_line(10_000, seed=2) + "\n")
    more = _local(
        tmp_path,
        [*paths, str(tmp_path / "more.txt")],
        text_unit="line",
        chunk_chars=1000,
        split_by="position",
    )
    grown = "".join(_texts(ingest_documents(more).path, "train"))
    assert len(grown) == 99_000 and grown.startswith(joined["train"])


def test_chunks_are_hash_split_by_default(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text(_one_line(100_000, seed=0) + "\n")
    paths = [str(tmp_path / "one.txt")]
    whole = ingest_documents(_local(tmp_path, paths, text_unit="line")).manifest["stats"]
    assert whole["documents"] == {"train": 1, "validation": 0, "test": 0}
    chunked = ingest_documents(_local(tmp_path, paths, text_unit="line", chunk_chars=1000))
    docs = chunked.manifest["stats"]["documents"]
    n_chunks = len(list(chunk_text(_one_line(100_000, seed=0), 1000)))
    assert sum(docs.values()) == n_chunks and docs["validation"] > 0 and docs["test"] > 0
