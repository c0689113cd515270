"""Stage folders: keyed by content, reused, atomic, locked, never read unfinished."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
from helpers import smoke_config

from maskdiff.data.contracts import MANIFEST
from maskdiff.data.stage import (
    StageError,
    build_stage,
    list_shards,
    read_manifest,
    stage_result,
)


def _writer(log: Path, delay: float = 0.0):
    def build(folder: Path) -> dict:
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(delay)
        (folder / "train-00000.parquet").write_bytes(b"payload")
        return {"rows": 1}

    return build


def test_reuse_and_new_folder_on_change(tmp_path: Path) -> None:
    log = tmp_path / "log"
    a = build_stage("demo", tmp_path / "root", {"x": 1}, {"in": "h1"}, _writer(log))
    b = build_stage("demo", tmp_path / "root", {"x": 1}, {"in": "h1"}, _writer(log))
    assert b.reused and b.path == a.path and b.content_hash == a.content_hash
    assert log.read_text().count("built") == 1
    c = build_stage("demo", tmp_path / "root", {"x": 2}, {"in": "h1"}, _writer(log))
    d = build_stage("demo", tmp_path / "root", {"x": 1}, {"in": "h2"}, _writer(log))
    assert len({a.path, c.path, d.path}) == 3
    assert a.content_hash == c.content_hash  # same bytes written
    manifest = read_manifest(a.path)
    assert manifest["stats"] == {"rows": 1} and manifest["inputs"] == {"in": "h1"}
    assert {"numpy", "pyarrow", "tokenizers", "pandera", "python"} <= set(manifest["versions"])
    assert manifest["timings"]["build_s"] >= 0
    assert stage_result(a.path).content_hash == a.content_hash
    assert list_shards(a.path, "train") == [a.path / "train-00000.parquet"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(folder: Path) -> dict:
        (folder / "train-00000.parquet").write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        build_stage("demo", tmp_path, {}, {}, broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_unfinished_folder_is_never_read(tmp_path: Path) -> None:
    log = tmp_path / "log"
    done = build_stage("demo", tmp_path / "r", {}, {}, _writer(log))
    (done.path / MANIFEST).unlink()  # as if the manifest had never been written
    with pytest.raises(StageError, match="unfinished"):
        read_manifest(done.path)
    with pytest.raises(StageError, match="unfinished"):
        list_shards(done.path, "train")
    with pytest.raises(StageError, match="unfinished"):
        stage_result(done.path)
    again = build_stage("demo", tmp_path / "r", {}, {}, _writer(log))
    assert not again.reused and log.read_text().count("built") == 2  # built anew, not trusted
    assert again.path == done.path and read_manifest(again.path)["stats"] == {"rows": 1}


def test_a_stage_on_an_unfinished_input_is_refused_and_publishes_nothing(tmp_path: Path) -> None:
    """The corruption stage given a blocks folder without its manifest (a crash before
    publishing) refuses it by name, and neither publishes nor leaves a corruptions folder."""
    from maskdiff.data.blocks import build_blocks
    from maskdiff.data.corrupt import build_corruptions
    from maskdiff.data.ingest import ingest_documents
    from maskdiff.data.tokenizer import train_tokenizer

    root = tmp_path / "r"
    cfg = smoke_config(root)
    docs = ingest_documents(cfg.data)
    blocks = build_blocks(cfg.data, docs.path, train_tokenizer(cfg.tokenizer, docs.path, root).path)
    (blocks.path / MANIFEST).unlink()
    with pytest.raises(StageError, match="unfinished") as info:
        build_corruptions(cfg.corruption, cfg.diffusion, blocks.path, root)
    assert str(blocks.path) in str(info.value)
    assert not list(root.glob("corruptions-*")) and not list(root.glob(".corruptions-*"))


def _build_in_process(root: str, log: str) -> str:
    return str(build_stage("demo", root, {"k": 1}, {}, _writer(Path(log), delay=0.5)).path)


def test_two_processes_build_once(tmp_path: Path) -> None:
    log = tmp_path / "log"
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_build_in_process, [(str(tmp_path / "r"), str(log))] * 2)
    assert paths[0] == paths[1]
    assert log.read_text().count("built") == 1


def test_root_with_dotdot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"'\.\.'"):
        build_stage("demo", str(tmp_path / "a" / ".." / ".." / "x"), {}, {}, _writer(tmp_path))


def test_same_config_gives_same_hashes_end_to_end(tmp_path: Path) -> None:
    from maskdiff.data.blocks import build_blocks
    from maskdiff.data.corrupt import build_corruptions
    from maskdiff.data.ingest import ingest_documents
    from maskdiff.data.tokenizer import train_tokenizer

    hashes = []
    for run in ("a", "b"):
        cfg = smoke_config(tmp_path / run)
        docs = ingest_documents(cfg.data)
        tok = train_tokenizer(cfg.tokenizer, docs.path, cfg.data.root)
        blocks = build_blocks(cfg.data, docs.path, tok.path)
        corr = build_corruptions(cfg.corruption, cfg.diffusion, blocks.path, cfg.data.root)
        hashes.append([(r.path.name, r.content_hash) for r in (docs, tok, blocks, corr)])
        assert json.loads((corr.path / MANIFEST).read_text())["inputs"] == {
            "blocks": blocks.content_hash
        }
    assert hashes[0] == hashes[1]
