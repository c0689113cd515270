"""The project's own stores for a command: Prefect's home and SQLite database under the run root
(``runs/prefect``), MLflow's ``runs/mlflow.db``, unless the environment already names others;
the local Prefect database migrated, one process at a time; and the command's temporary Prefect
server on it, when no server is named.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from pathlib import Path

from maskdiff.config import Config
from maskdiff.ops.servers import ServerProcess, project_prefect_home, start_prefect_api

__all__ = [
    "TEMPORARY_SERVERS",
    "named_prefect_api",
    "prepare_local_prefect_database",
    "start_temporary_server",
    "temporary_server_env",
    "use_project_stores",
    "wait_for_temporary_server",
]

# The temporary Prefect servers this process started and has not stopped yet.
TEMPORARY_SERVERS: list[ServerProcess] = []
# What Prefect sets for its own temporary server: the API alone, no UI, ephemeral services.
_TEMPORARY_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                  "PREFECT__SERVER_FINAL": "1"}  # fmt: skip


def use_project_stores(cfg: Config) -> Path:
    """Point Prefect and MLflow at the run root unless the environment already chose."""
    root = Path(cfg.data.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        home = project_prefect_home(root)
        os.environ["PREFECT_HOME"] = str(home)
        os.environ.setdefault(
            "PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return root


def prepare_local_prefect_database() -> bool:
    """Migrate a local SQLite Prefect database and register its block types, one process at a
    time.

    Without ``PREFECT_API_URL`` every ``maskdiff run`` starts its own temporary Prefect server on
    the shared database, and each server does both as it starts: two runs started at once on a
    new database would do them concurrently (seen: "duplicate column name", "UNIQUE constraint
    failed: block_schema"). Under an ``fcntl`` lock the first run does the work and the next
    find nothing left to write. A new database is a copy of the migrated template when there is
    one, and the first one migrated here becomes it (:mod:`maskdiff.ops.store_templates`: 6 s of
    CPU saved per new ``data.root``). A copy is not even checked when the template's facts (its
    revision, Prefect version and collections) are this process's: 1 s of CPU and of wall time
    less per command on a new root (a 60-step ``maskdiff run``: 14.9 s of CPU against 13.9, the
    mean of 5 alternated pairs on 2026-12-06).

    Once done, ``PREFECT_HOME/.prepared.json`` says for which database, Prefect version, Alembic
    revision and installed Prefect collections: while all four still hold, later commands skip
    the check and the import of Prefect's server modules (1.7 s of CPU per command, measured).
    Returns True when the marker holds at the end: the database needs no migration check.
    """
    import fcntl

    from prefect.settings import get_current_settings
    from sqlalchemy.engine import make_url

    from maskdiff.ops.prefect_store import (
        contents,
        database_state,
        mark_prepared,
        record_template_facts,
        skips_checks,
        template_part,
    )
    from maskdiff.ops.store_templates import (
        keep_template,
        seed_from_template,
        template_identity,
    )

    settings = get_current_settings()
    if settings.api.url:  # a running server (environment or profile) owns its database
        return False
    url = settings.server.database.connection_url
    if url is not None and not url.get_secret_value().startswith("sqlite"):
        return False
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    name = make_url(url.get_secret_value()).database if url is not None else None
    database = Path(name or home / "prefect.db") if name != ":memory:" else None
    if database is not None and skips_checks(home, database, copied=False):
        return True
    with open(home / ".migrate.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            identity = template_identity("prefect")  # the template as it is before the copy
            copied = database is not None and seed_from_template(database, "prefect")
            new = database is not None and not copied and not database.exists()
            if copied and database is not None and skips_checks(home, database, copied=True):
                return True  # the template was made by a process with this Prefect and these
            before = contents(database) if copied and database is not None else None
            asyncio.run(_migrate_and_register_blocks())  # collections: nothing left to check
            state = database_state(database) if database is not None else None
            if new and database is not None and database.is_file():
                keep_template(database, "prefect", None if state is None else template_part(state))
            elif copied and database is not None:  # a template without facts, if it has none
                record_template_facts(database, state, before, identity)
            if state is not None:
                mark_prepared(home, state)
                return True
            return False
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def start_temporary_server(prepared: bool) -> ServerProcess | None:
    """Start this command's temporary Prefect server when no server is named (no
    ``PREFECT_API_URL``, in the environment or a profile), and point this process and its
    children at it; None when a server is named. ``prepared``: the database is migrated and
    holds the block types (:func:`prepare_local_prefect_database`), so the server skips both.

    Prefect would start the same server itself on its first API call, but to do so it imports
    its whole server application into the command (``prefect.server.api.server``: 2 s of CPU,
    measured) only to run ``uvicorn`` in a subprocess. Started here, it costs the command no
    import, and it boots while the command imports the pipeline. Like Prefect's, it is stopped
    at exit, after Prefect's last API calls (the final states, the last logs): an ``atexit``
    hook registered before Prefect's own runs after them. It gets its own process group, so a
    Ctrl-C in the terminal does not stop it before those calls either.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None  # a named server; or none allowed, which Prefect reports itself
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True)}
    server = start_prefect_api(
        temporary_server_env(env, prepared), Path(settings.home) / "temporary-server.log"
    )
    TEMPORARY_SERVERS.append(server)
    atexit.register(_stop_temporary_server, server)
    os.environ["PREFECT_API_URL"] = f"{server.url}/api"
    # Prefect would link runs to the UI of this server, which has none and stops with the command
    os.environ.setdefault("PREFECT_UI_URL", "")
    refresh_global_settings_context()  # Prefect read its settings when first imported
    return server


def temporary_server_env(env: dict[str, str], prepared: bool) -> dict[str, str]:
    """The environment of a temporary Prefect server (:func:`start_prefect_api`) from the
    environment ``env`` naming its home and database: the API alone, with the services Prefect
    runs in its own temporary server, and, on a ``prepared`` database
    (:func:`prepare_local_prefect_database`), no migration or block registration at start."""
    env = {**env, **_TEMPORARY_ENV}
    env.pop("PREFECT_API_URL", None)
    if prepared:
        env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"
        env["PREFECT_SERVER_REGISTER_BLOCKS_ON_START"] = "false"
    return env


def named_prefect_api() -> str | None:
    """The API URL of the Prefect server the user named (``PREFECT_API_URL``), None when the
    command runs on its own temporary server or on none."""
    url = os.environ.get("PREFECT_API_URL")
    return url if url and url not in {f"{s.url}/api" for s in TEMPORARY_SERVERS} else None


def wait_for_temporary_server(server: ServerProcess | None) -> None:
    """Return once ``server`` answers (its start-up timeout: Prefect's setting for its own);
    raise with the server's last log lines if it exits first."""
    if server is None:
        return
    from prefect.settings import get_current_settings

    timeout = get_current_settings().server.ephemeral.startup_timeout_seconds
    # logged here, once Prefect's logging is set up (it is not when the server is started)
    logging.getLogger("prefect").info("Starting temporary server on %s", server.url)
    try:
        server.wait_ready(timeout, interval=0.1)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}\n(the log: {server.log_path})") from None


def _stop_temporary_server(server: ServerProcess) -> None:
    if server in TEMPORARY_SERVERS:
        logging.getLogger("prefect").info("Stopping temporary server on %s", server.url)
        server.stop(timeout=10)
        TEMPORARY_SERVERS.remove(server)


async def _migrate_and_register_blocks() -> None:
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
        await session.commit()
