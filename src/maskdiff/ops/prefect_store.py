"""Whether a local SQLite Prefect database can be opened without Prefect's start-up checks.

A Prefect server (or a command's temporary one) checks its database's schema against Alembic
and registers the block types every time it starts: about 1 s of CPU and of wall time for
``prefect server start`` on a database that needs nothing (measured 2026-12-06). Two records say
when there is nothing to do, and neither needs Prefect imported:

* ``PREFECT_HOME/.prepared.json``, written once a database was migrated and its block types
  registered (``flows.stores.prepare_local_prefect_database``): its path, Alembic revision,
  Prefect version and the installed Prefect collections (which bring block types). While all
  four still hold, the database is as a check would leave it.
* the facts recorded beside a store template (:mod:`maskdiff.ops.store_templates`): a copy made
  from a template whose facts are this installation's is as a check would leave it too.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from importlib import metadata
from pathlib import Path

from maskdiff.ops.store_templates import record_facts, template_facts

__all__ = [
    "MARKER",
    "contents",
    "database_state",
    "mark_prepared",
    "record_template_facts",
    "skips_checks",
    "template_part",
]

MARKER = ".prepared.json"  # in PREFECT_HOME


def database_state(database: Path) -> dict[str, object] | None:
    """What marks ``database`` as migrated and holding block types for the installed Prefect:
    its path, its Alembic revision, Prefect's version and the installed Prefect collections.
    None if it is not a migrated database with block types (or not a database at all)."""
    try:
        uri = f"{database.resolve().as_uri()}?mode=rw"  # an existing file only: never creates one
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
            (blocks,) = db.execute("SELECT count(*) FROM block_type").fetchone()
    except (sqlite3.Error, TypeError, ValueError):
        return None
    if not blocks:
        return None
    collections = sorted(
        f"{ep.dist.name if ep.dist else ep.value}=={ep.dist.version if ep.dist else ''}"
        for ep in metadata.entry_points(group="prefect.collections")
    )
    return {
        "database": str(database.resolve()),
        "revision": revision,
        "prefect": metadata.version("prefect"),
        "collections": collections,
    }


def contents(database: Path) -> tuple[object, ...] | None:
    """What a schema check and block registration could change in ``database``: its Alembic
    revision, its block types and the checksums of their schemas. The same before and after a
    check: the check found nothing to do. None if it cannot be read."""
    try:
        uri = f"{database.resolve().as_uri()}?mode=rw"  # never creates a file
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            return (
                db.execute("SELECT version_num FROM alembic_version").fetchall(),
                sorted(db.execute("SELECT slug FROM block_type").fetchall()),
                sorted(db.execute("SELECT checksum, version FROM block_schema").fetchall()),
            )
    except (sqlite3.Error, ValueError):
        return None


def template_part(state: dict[str, object]) -> dict[str, object]:
    """What a database's :func:`database_state` says of any copy of it: all but its path."""
    return {key: value for key, value in state.items() if key != "database"}


def record_template_facts(
    database: Path,
    state: dict[str, object] | None,
    before: tuple[object, ...] | None,
    identity: list[int] | None,
) -> bool:
    """After a check of ``database``, a copy of the Prefect template (``state``: its
    :func:`database_state` after the check; ``before``: its :func:`contents` before it;
    ``identity``: the template's, taken before the copy), record this installation's facts for
    a template that has none (kept by an earlier maskdiff), if the check found nothing to do. A
    check that added anything (block types of a collection installed since) leaves the template
    without facts: its copies are then checked as before. True if recorded."""
    if before is None or identity is None or state is None or contents(database) != before:
        return False
    return record_facts("prefect", template_part(state), identity)


def mark_prepared(home: Path, state: dict[str, object]) -> None:
    """Record ``state`` (:func:`database_state`, taken after a check) as ``home``'s marker."""
    from maskdiff.data.stage import write_json_atomic  # (pyarrow: not for a server start alone)

    write_json_atomic(home / MARKER, state)


def skips_checks(home: Path, database: Path, copied: bool) -> bool:
    """True when ``database`` (in Prefect home ``home``) needs no schema check or block
    registration: the marker names its present state, or it is a copy (``copied``: made from the
    template just now) of a template whose recorded facts are this installation's, in which
    case the marker is written for it."""
    state = database_state(database)
    if state is None:
        return False
    if _read_json(home / MARKER) == state:
        return True
    if copied and template_facts("prefect") == template_part(state):
        mark_prepared(home, state)
        return True
    return False


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
