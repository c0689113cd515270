"""The Prefect store template: a new database copied from it is the one a migration writes, a
store that exists is never replaced, and a server and a command both run on a copy."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from maskdiff.ops import store_templates
from maskdiff.ops.servers import start_prefect


def _schema(database: Path) -> dict[str, object]:
    """What a migration leaves: every table, index and trigger with its SQL, the Alembic
    revision and the registered block types."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return {
            "objects": sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()),
            "revision": db.execute("SELECT version_num FROM alembic_version").fetchall(),
            "blocks": sorted(db.execute("SELECT slug FROM block_type").fetchall()),
        }


# In one process, a store per home. After the first, a marker table goes into the template (if
# there is one): a store that has it was copied, not migrated.
_PREPARE = """
import os, sqlite3, sys
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings
from flows.stores import prepare_local_prefect_database
from maskdiff.ops.store_templates import template_path
os.environ["MASKDIFF_STORE_TEMPLATES"] = sys.argv[1]
for home in sys.argv[2:]:
    url = f"sqlite+aiosqlite:///{home}/prefect.db"
    with temporary_settings({PREFECT_HOME: home, PREFECT_API_DATABASE_CONNECTION_URL: url}):
        prepare_local_prefect_database()
    if template_path("prefect").is_file():
        with sqlite3.connect(template_path("prefect")) as db:
            db.execute("CREATE TABLE IF NOT EXISTS copied_marker (x)")
"""
MARKER = ("table", "copied_marker", "CREATE TABLE copied_marker (x)")


def _prepare(templates: Path, *homes: Path) -> None:
    """``prepare_local_prefect_database`` on each home's new SQLite store, in that order, in a
    process of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    argv = [sys.executable, "-c", _PREPARE, str(templates), *map(str, homes)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_copy_is_the_migrated_store_and_a_server_runs_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    templates = tmp_path / "templates"
    _prepare(templates, tmp_path / "first", tmp_path / "second")  # migrated, then a copy
    (template,) = templates.glob("prefect-*.db")
    migrated = _schema(tmp_path / "first" / "prefect.db")
    assert len(migrated["objects"]) > 50 and migrated["revision"] and migrated["blocks"]
    assert MARKER not in migrated["objects"]
    copied = _schema(tmp_path / "second" / "prefect.db")  # the check then found it current
    assert MARKER in copied["objects"]
    copied["objects"].remove(MARKER)
    assert copied == migrated
    assert sorted(templates.iterdir()) == [template]  # no -wal, -shm or temporary file left

    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", str(templates))
    server = start_prefect(tmp_path / "server")  # `prefect server start` on a copy
    try:
        server.wait_ready(180)
        served = _schema(tmp_path / "server" / "prefect.db")
        assert MARKER in served["objects"] and served["revision"] == migrated["revision"]
    finally:
        server.stop()


def test_an_existing_store_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", str(tmp_path / "t"))
    template = store_templates.template_path("prefect")
    assert template is not None and template.parent == tmp_path / "t"
    with contextlib.closing(sqlite3.connect(tmp_path / "made.db")) as db:
        db.execute("CREATE TABLE marker (x)")
        db.commit()
    assert not store_templates.seed_from_template(tmp_path / "none.db", "prefect")  # no template
    store_templates.keep_template(tmp_path / "made.db", "prefect")
    assert template.is_file()

    existing = tmp_path / "project" / "prefect.db"
    existing.parent.mkdir()
    existing.write_bytes(b"")  # even an empty file is somebody's
    assert not store_templates.seed_from_template(existing, "prefect")
    assert existing.read_bytes() == b""
    fresh = tmp_path / "other" / "prefect.db"
    assert store_templates.seed_from_template(fresh, "prefect")
    with contextlib.closing(sqlite3.connect(fresh)) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("marker",)]
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["prefect.db"]

    with contextlib.closing(sqlite3.connect(tmp_path / "later.db")) as db:
        db.execute("CREATE TABLE later (x)")
        db.commit()
    store_templates.keep_template(tmp_path / "later.db", "prefect")  # the first one stays
    with contextlib.closing(sqlite3.connect(template)) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("marker",)]

    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", "off")  # a migration every time
    assert store_templates.template_path("prefect") is None
    assert not store_templates.seed_from_template(tmp_path / "third" / "prefect.db", "prefect")
    store_templates.keep_template(tmp_path / "later.db", "prefect")
    assert not (tmp_path / "off").exists() and sorted(
        p.name for p in template.parent.iterdir()
    ) == [template.name]
