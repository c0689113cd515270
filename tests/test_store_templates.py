"""The Prefect store template: a new database copied from it is the one a migration writes, a
store that exists is never replaced, and a server and a command both run on a copy. A prepared
database is checked again only when it or the installed Prefect changes."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
from helpers import REPO

from maskdiff.config import TrackingConfig
from maskdiff.ops import prefect_store, store_templates
from maskdiff.ops.servers import start_mlflow, start_prefect
from maskdiff.ops.tracking import RunTracker


def _schema(database: Path) -> dict[str, object]:
    """What a migration leaves: every table, index and trigger with its SQL, the Alembic
    revision and the registered block types."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return {
            "objects": sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()),
            "revision": db.execute("SELECT version_num FROM alembic_version").fetchall(),
            "blocks": sorted(db.execute("SELECT slug FROM block_type").fetchall()),
        }


# In one process, a store per home; prints, per home, whether its store was checked (migration
# and block registration run). After the second home, a marker table goes into the template (if
# there is one): a store that has it was copied, not migrated, and the template is then another
# file than its facts describe. Before the fourth, the facts are made this file's again, but with
# a collection more (one installed since the template was made, bringing block types). Before
# the fifth they are removed, as in a template kept by a maskdiff that recorded none: that check
# finds nothing to do, so the facts are recorded (a check that does find something records none:
# test_facts_are_recorded_only_when_a_check_found_nothing).
_PREPARE = """
import json, os, sqlite3, sys
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings
import flows.stores
from maskdiff.ops import store_templates
os.environ["MASKDIFF_STORE_TEMPLATES"] = sys.argv[1]
template = store_templates.template_path("prefect")
migrate, calls = flows.stores._migrate_and_register_blocks, []
async def counted():
    calls.append(1)
    await migrate()
flows.stores._migrate_and_register_blocks = counted
checked = []
for i, home in enumerate(sys.argv[2:]):
    if i == 2 and template.is_file():
        with sqlite3.connect(template) as db:
            db.execute("CREATE TABLE copied_marker (x)")
    if i == 3 and template.with_suffix(".json").is_file():
        facts = json.loads(template.with_suffix(".json").read_text())
        facts["template"] = store_templates._identity(template)
        facts["collections"].append("prefect-other==1.0")
        template.with_suffix(".json").write_text(json.dumps(facts))
    if i == 4:
        template.with_suffix(".json").unlink()
    url = f"sqlite+aiosqlite:///{home}/prefect.db"
    calls.clear()
    with temporary_settings({PREFECT_HOME: home, PREFECT_API_DATABASE_CONNECTION_URL: url}):
        flows.stores.prepare_local_prefect_database()
    checked.append(bool(calls))
print(json.dumps(checked))
"""
MARKER = ("table", "copied_marker", "CREATE TABLE copied_marker (x)")


def _prepare(templates: Path, *homes: Path) -> list[bool]:
    """``prepare_local_prefect_database`` on each home's new SQLite store, in that order, in a
    process of its own (Prefect's server code keeps the engine of the first database a process
    migrates, so the checks after it are counted, not their effect); whether each was checked."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    argv = [sys.executable, "-c", _PREPARE, str(templates), *map(str, homes)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_copy_is_the_migrated_store_and_a_server_runs_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first store is migrated and becomes the template, with its facts; a copy of it is not
    checked; a copy of a template that is another file than its facts describe, or whose facts
    name other collections than the installed ones, is checked (and found current); so is one
    of a template without facts, whose facts are then recorded: the next copy is not checked."""
    templates = tmp_path / "templates"
    names = ("first", "second", "third", "fourth", "fifth", "sixth")
    homes = [tmp_path / name for name in names]
    assert _prepare(templates, *homes) == [True, False, True, True, True, False]
    (template,) = templates.glob("prefect-*.db")
    migrated = _schema(tmp_path / "first" / "prefect.db")
    assert len(migrated["objects"]) > 50 and migrated["revision"] and migrated["blocks"]
    assert MARKER not in migrated["objects"]
    facts = json.loads(template.with_suffix(".json").read_text())
    state = json.loads((tmp_path / "first" / ".prepared.json").read_text())
    expected = {k: v for k, v in state.items() if k != "database"}  # as the fifth recorded them
    assert facts == {"template": store_templates._identity(template), **expected}
    assert _schema(tmp_path / "second" / "prefect.db") == migrated  # a copy, trusted unchecked
    second = json.loads((tmp_path / "second" / ".prepared.json").read_text())
    assert second == state | {"database": str((tmp_path / "second" / "prefect.db").resolve())}
    copied = _schema(tmp_path / "third" / "prefect.db")  # the check then found it current
    assert MARKER in copied["objects"]
    copied["objects"].remove(MARKER)
    assert copied == migrated
    # the template and its facts; no -wal, -shm or temporary file left
    assert sorted(templates.iterdir()) == [template, template.with_suffix(".json")]

    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", str(templates))
    # what a server start decides (maskdiff.ops.prefect_store): the marker names the first
    # home's database as it is; a copy of the template is trusted only with this installation's
    # facts (not with a collection more)
    first = tmp_path / "first"
    assert prefect_store.skips_checks(first, first / "prefect.db", copied=False)
    other = facts | {"collections": [*state["collections"], "prefect-other==1.0"]}
    template.with_suffix(".json").write_text(json.dumps(other))
    copy = tmp_path / "seventh" / "prefect.db"
    assert store_templates.seed_from_template(copy, "prefect")
    assert not prefect_store.skips_checks(copy.parent, copy, copied=True)
    assert not prefect_store.skips_checks(first, copy, copied=False)  # another database
    template.with_suffix(".json").write_text(json.dumps(facts))

    server = start_prefect(tmp_path / "server")  # `prefect server start` on a trusted copy
    try:
        skipped = {
            key: server.env.get(key)
            for key in (
                "PREFECT_SERVER_DATABASE_MIGRATE_ON_START",
                "PREFECT_SERVER_REGISTER_BLOCKS_ON_START",
            )
        }
        assert set(skipped.values()) == {"false"}, skipped
        assert (tmp_path / "server" / ".prepared.json").is_file()  # the next start: the marker
        server.wait_ready(180)
        request = urllib.request.Request(
            f"{server.url}/api/block_types/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            slugs = sorted((block["slug"],) for block in json.load(response))
        assert slugs == migrated["blocks"]  # the copy serves every block type, unchecked
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

    assert store_templates.template_facts("prefect") is None  # made without facts

    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", "off")  # a migration every time
    assert store_templates.template_path("prefect") is None
    assert not store_templates.seed_from_template(tmp_path / "third" / "prefect.db", "prefect")
    store_templates.keep_template(tmp_path / "later.db", "prefect")
    assert not (tmp_path / "off").exists() and sorted(
        p.name for p in template.parent.iterdir()
    ) == [template.name]


def _fake_prefect_store(path: Path) -> None:
    """A SQLite file with the tables a state and its contents are read from (not a Prefect
    store: the check's logic alone, without Prefect's migration in a process)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(
            "CREATE TABLE alembic_version (version_num TEXT);"
            "INSERT INTO alembic_version VALUES ('rev1');"
            "CREATE TABLE block_type (id TEXT, slug TEXT);"
            "INSERT INTO block_type VALUES ('1', 'secret');"
            "CREATE TABLE block_schema (id TEXT, block_type_id TEXT, checksum TEXT, version TEXT);"
            "INSERT INTO block_schema VALUES ('s1', '1', 'sha256:abc', '1');"
        )
        db.commit()


def test_facts_are_recorded_only_when_a_check_found_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template kept without facts gets this installation's once the check of a copy found
    nothing to do: not after a check that registered a block type, not for a template replaced
    since the copy was made, and never over facts that describe it."""
    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", str(tmp_path / "templates"))
    template = store_templates.template_path("prefect")
    assert template is not None
    template.parent.mkdir()
    _fake_prefect_store(template)
    identity = store_templates.template_identity("prefect")
    copy = tmp_path / "home" / "prefect.db"
    assert store_templates.seed_from_template(copy, "prefect")

    def record(before: tuple[object, ...] | None) -> bool:  # after a check of the copy
        state = prefect_store.database_state(copy)
        return prefect_store.record_template_facts(copy, state, before, identity)

    before = prefect_store.contents(copy)
    with contextlib.closing(sqlite3.connect(copy)) as db:  # the check registered a block type
        db.execute("INSERT INTO block_type VALUES ('2', 'webhook')")
        db.commit()
    assert not record(before)
    assert store_templates.template_facts("prefect") is None
    before = prefect_store.contents(copy)  # a check that found nothing
    assert record(before)
    state = prefect_store.database_state(copy)
    assert state is not None
    assert store_templates.template_facts("prefect") == prefect_store.template_part(state)
    assert not record(before)  # facts it has
    template.with_suffix(".json").unlink()
    os.utime(template, ns=(0, 0))  # another modification time: another file than the copy's
    assert not record(before)
    assert store_templates.template_facts("prefect") is None


def test_facts_describe_the_template_file_they_were_recorded_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Facts are recorded by the call that made the template, never by a later one, and are
    not those of a template made again after the first was deleted."""
    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", str(tmp_path / "t"))
    for name in ("made", "later"):
        with contextlib.closing(sqlite3.connect(tmp_path / f"{name}.db")) as db:
            db.execute(f"CREATE TABLE {name} (x)")
            db.commit()
    store_templates.keep_template(tmp_path / "made.db", "prefect", {"collections": ["a==1"]})
    assert store_templates.template_facts("prefect") == {"collections": ["a==1"]}
    store_templates.keep_template(tmp_path / "later.db", "prefect", {"collections": ["b==2"]})
    assert store_templates.template_facts("prefect") == {"collections": ["a==1"]}

    template = store_templates.template_path("prefect")
    assert template is not None
    template.unlink()  # deleted by hand; its facts left behind
    with contextlib.closing(sqlite3.connect(tmp_path / "third.db")) as db:
        db.execute("CREATE TABLE third (x)")
        db.commit()
    store_templates.keep_template(tmp_path / "third.db", "prefect")
    assert store_templates.template_facts("prefect") is None


def _prepare_once(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """``prepare_local_prefect_database`` on ``home``'s SQLite store (no Prefect server
    configured): whether it migrated (its migration and block registration ran) and the
    database's Alembic revision after it."""
    from prefect.settings import (
        PREFECT_API_DATABASE_CONNECTION_URL,
        PREFECT_API_URL,
        PREFECT_HOME,
        temporary_settings,
    )

    import flows.stores

    calls: list[int] = []
    migrate = flows.stores._migrate_and_register_blocks

    async def counted() -> None:
        calls.append(1)
        await migrate()

    monkeypatch.setattr(flows.stores, "_migrate_and_register_blocks", counted)
    url = f"sqlite+aiosqlite:///{home}/prefect.db"
    with temporary_settings({PREFECT_HOME: home, PREFECT_API_DATABASE_CONNECTION_URL: url},
                            restore_defaults={PREFECT_API_URL}):  # fmt: skip
        flows.stores.prepare_local_prefect_database()
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    return {"migrated": bool(calls), "revision": revision}


@pytest.mark.slow
def test_a_prepared_database_is_checked_once_per_prefect_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first command migrates and leaves ``.prepared.json``; the next skip the migration
    check while database, revision, Prefect and its collections are the marker's, and check
    again when any differs (here: another Prefect version, a database removed: it comes back as
    a copy of the template the first made, and the template's facts spare it the check)."""
    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", str(tmp_path / "templates"))
    home = tmp_path / "home"
    first = _prepare_once(home, monkeypatch)
    marker = home / ".prepared.json"
    state = json.loads(marker.read_text())
    assert first["migrated"] and state["revision"] == first["revision"]
    assert state["database"] == str((home / "prefect.db").resolve())
    assert state["prefect"] == metadata.version("prefect")

    assert _prepare_once(home, monkeypatch) == {"migrated": False, "revision": first["revision"]}

    marker.write_text(json.dumps(state | {"prefect": "0.0.1"}))  # Prefect was upgraded
    assert _prepare_once(home, monkeypatch)["migrated"]
    assert json.loads(marker.read_text()) == state

    (home / "prefect.db").unlink()  # the marker outlives its database
    assert _prepare_once(home, monkeypatch) == {"migrated": False, "revision": first["revision"]}
    assert json.loads(marker.read_text()) == state


def _track(store: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One MLflow run on the new SQLite store ``store``, opened from the folder ``cwd``; the
    artifact locations of the store's experiments."""
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    tracker = RunTracker.start(TrackingConfig(system_metrics=False), f"sqlite:///{store}", "run",
                               artifact_root=store.parent / "mlartifacts")  # fmt: skip
    tracker.end()
    with contextlib.closing(sqlite3.connect(store)) as db:
        return dict(db.execute("SELECT name, artifact_location FROM experiments").fetchall())


def _mlflow_schema(database: Path) -> dict[str, object]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return {
            "objects": sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()),
            "revision": db.execute("SELECT version_num FROM alembic_version").fetchall(),
        }


@pytest.mark.slow
def test_an_mlflow_store_is_a_copy_with_its_own_default_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first new store becomes the template, less the Default experiment (whose artifact
    location MLflow takes from the current folder); a copy gets the schema of a migrated store
    and the Default experiment of the folder it was opened from, as a new store would; so does
    the store of an ``mlflow server`` on a new root."""
    templates = tmp_path / "templates"
    monkeypatch.setenv("MASKDIFF_STORE_TEMPLATES", str(templates))
    first = _track(tmp_path / "a" / "mlflow.db", tmp_path / "from-a", monkeypatch)
    (template,) = templates.glob("mlflow-*.db")
    assert first["Default"] == str(tmp_path / "from-a" / "mlruns" / "0")
    assert first["maskdiff"] == (tmp_path / "a" / "mlartifacts").resolve().as_uri()
    with contextlib.closing(sqlite3.connect(template)) as db:
        assert db.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        db.execute("CREATE TABLE copied_marker (x)")
        db.commit()

    second = _track(tmp_path / "b" / "mlflow.db", tmp_path / "from-b", monkeypatch)
    assert second == {
        "Default": str(tmp_path / "from-b" / "mlruns" / "0"),
        "maskdiff": (tmp_path / "b" / "mlartifacts").resolve().as_uri(),
    }
    copied = _mlflow_schema(tmp_path / "b" / "mlflow.db")
    assert MARKER in copied["objects"]
    copied["objects"].remove(MARKER)
    assert copied == _mlflow_schema(tmp_path / "a" / "mlflow.db")

    server = start_mlflow(tmp_path / "c")
    try:
        server.wait_ready(180)
        with urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?"
                                    "max_results=10", timeout=30) as resp:  # fmt: skip
            names = [e["name"] for e in json.load(resp)["experiments"]]
    finally:
        server.stop()
    assert names == ["Default"]
    assert MARKER in _mlflow_schema(tmp_path / "c" / "mlflow.db")["objects"]
