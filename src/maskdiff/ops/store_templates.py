"""Migrated, empty SQLite stores kept as templates, so that a new project's Prefect database and
MLflow store are copies instead of full migrations.

Creating a Prefect database runs every Alembic migration and registers the block types: 6 s of CPU
on the workstation (measured with ``flows.stores.prepare_local_prefect_database`` on a new file,
0.4 s on a migrated one); creating an MLflow store runs MLflow's migrations, 1.3 s (its first
``MlflowClient`` call on a new file against 0.04 s on an existing one). Every new ``data.root``
pays both once, its first ``maskdiff run`` and its first ``maskdiff ui`` alike; the test suite
makes dozens of new roots.

A template is made from a store migrated by the installed version of its package (Prefect, MLflow),
right after its migration (before any run is written), and is keyed by that version: a store copied
from it is the store the migration would have written. The Prefect server or command that opens a
copy still checks the schema and registers block types; it finds nothing to do. The MLflow template
leaves out the ``Default`` experiment MLflow creates with its tables: its artifact location is taken
from the folder current at creation, so the first process to open a copy creates it, as it would
have created it in a new store. Copies use SQLite's backup API (a consistent snapshot, whatever the
journal mode) into a temporary file beside the target, linked into place only if the target still
does not exist: two commands racing on a new root never overwrite each other, nor a store a run has
written.

The process that makes a template can record facts about it beside it (``prefect-3.9.1.json``:
for Prefect, the Alembic revision and the installed collections, which bring block types). A
process whose own facts are the same knows a copy needs no check at all; with other facts (a
collection installed since) it checks the copy as usual. The facts name the template file they
describe (inode, size, modification time), so those of a template deleted by hand are not taken
for its successor's. A template kept without facts (by an earlier maskdiff) gets them from the
first process whose check of a copy found nothing to do (:func:`record_facts`).

The folder: ``$MASKDIFF_STORE_TEMPLATES``, else ``$XDG_CACHE_HOME/maskdiff/store-templates``
(``~/.cache/...``). ``MASKDIFF_STORE_TEMPLATES=off`` turns templates off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import tempfile
from importlib import metadata
from pathlib import Path

__all__ = [
    "keep_template",
    "record_facts",
    "seed_from_template",
    "template_facts",
    "template_identity",
    "template_path",
]

log = logging.getLogger(__name__)

_PACKAGES = {"prefect": "prefect", "mlflow": "mlflow"}  # kind -> the package fixing its schema
# What a template of each kind leaves out of the store it is made from (SQL run on the copy).
_SCRUB = {"mlflow": ("DELETE FROM experiment_tags WHERE experiment_id = 0",
                     "DELETE FROM experiments WHERE experiment_id = 0")}  # fmt: skip


def template_path(kind: str) -> Path | None:
    """Where the template of ``kind`` ("prefect") for the installed version lives; None when
    templates are off or the package is not installed."""
    setting = os.environ.get("MASKDIFF_STORE_TEMPLATES", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    if setting:
        folder = Path(setting)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = Path(cache) / "maskdiff" / "store-templates"
    try:
        version = metadata.version(_PACKAGES[kind])
    except metadata.PackageNotFoundError:
        return None
    return folder / f"{kind}-{version}.db"


def _backup(source: Path, target: Path, scrub: tuple[str, ...] = ()) -> None:
    """A consistent copy of the SQLite database ``source`` in the new file ``target``, in
    rollback-journal mode (reading it then writes no ``-wal`` or ``-shm`` beside it; Prefect
    turns WAL on again when it opens the copy), then the statements ``scrub`` run on it."""
    src = contextlib.closing(sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True))
    with src as reader, contextlib.closing(sqlite3.connect(target)) as writer:
        reader.backup(writer)
        writer.execute("PRAGMA journal_mode=DELETE")
        for statement in scrub:
            writer.execute(statement)
        writer.commit()


def _copy_new(source: Path, target: Path, scrub: tuple[str, ...] = ()) -> bool:
    """Copy ``source`` to ``target`` if ``target`` does not exist (never replacing it), less what
    ``scrub`` deletes; True if this call made ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()  # sqlite3 creates the file itself
        _backup(source, tmp, scrub)
        os.link(tmp, target)  # atomic, and fails if another process made target first
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def seed_from_template(database: Path, kind: str) -> bool:
    """Make the missing SQLite store ``database`` a copy of the template of ``kind``; True if it
    did. A store that exists (even empty) is left alone, as is everything when there is no
    template: the caller then migrates as usual."""
    if database.exists():
        return False
    template = template_path(kind)
    if template is None or not template.is_file():
        return False
    try:
        return _copy_new(template, database)
    except (OSError, sqlite3.Error) as exc:  # a template is an optimisation, never a failure
        log.warning("could not copy the %s store template %s: %s", kind, template, exc)
        return False


def keep_template(database: Path, kind: str, facts: dict[str, object] | None = None) -> None:
    """Keep the store ``database``, which this process has just created and migrated (nothing
    else written yet), as the template of ``kind``, unless one is kept already; ``facts`` (JSON)
    are recorded beside it when this call made it (:func:`template_facts`)."""
    template = template_path(kind)
    if template is None or template.exists():
        return
    try:
        if _copy_new(database, template, _SCRUB.get(kind, ())):
            log.info("kept %s as the %s store template %s", database, kind, template)
            if facts is not None:
                _write_facts(template, {"template": _identity(template), **facts})
    except (OSError, sqlite3.Error) as exc:
        log.warning("could not keep a %s store template in %s: %s", kind, template, exc)


def template_facts(kind: str) -> dict[str, object] | None:
    """The facts recorded by the process that made the template of ``kind``; None when there is
    no template or no facts about this very file."""
    template = template_path(kind)
    if template is None:
        return None
    try:
        facts = json.loads(_facts_path(template).read_text(encoding="utf-8"))
        if not isinstance(facts, dict) or facts.pop("template", None) != _identity(template):
            return None
    except (OSError, ValueError):
        return None
    return facts


def template_identity(kind: str) -> list[int] | None:
    """Which file the template of ``kind`` is now (for :func:`record_facts`); None if none."""
    template = template_path(kind)
    try:
        return None if template is None else _identity(template)
    except OSError:
        return None


def record_facts(kind: str, facts: dict[str, object], identity: list[int]) -> bool:
    """Record ``facts`` for the template of ``kind`` if it has none that describe it (a template
    kept by an earlier maskdiff, which recorded none) and it is still the file ``identity`` names
    (:func:`template_identity`, taken before a copy of it was found to need nothing); True if
    written."""
    template = template_path(kind)
    if template is None or template_facts(kind) is not None:
        return False
    try:
        if _identity(template) != identity:
            return False
        _write_facts(template, {"template": identity, **facts})
    except OSError as exc:
        log.warning("could not record facts of the %s store template %s: %s", kind, template, exc)
        return False
    return True


def _facts_path(template: Path) -> Path:
    return template.with_suffix(".json")


def _write_facts(template: Path, facts: dict[str, object]) -> None:
    from maskdiff.data.stage import write_json_atomic  # (pyarrow: only once facts are written)

    write_json_atomic(_facts_path(template), facts)


def _identity(path: Path) -> list[int]:
    """Which file ``path`` is: inode, size and modification time (a file made again after a
    deletion may reuse the inode, not the time)."""
    stat = path.stat()
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]
