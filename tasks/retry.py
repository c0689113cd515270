"""Which task failures a retry can fix.

A retry helps when the failure came from outside the input: the network or the Hub went away for a
moment, a server answered 429 or 5xx, a SQLite database was locked by another run. It never helps
a data or configuration error (a missing column, a file that is not UTF-8, an unknown key): the
same input fails the same way, only later. Those fail at once, on their first run.

Tasks take :func:`retry_if_transient` as Prefect's ``retry_condition_fn``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sqlite3
import urllib.error
from collections.abc import Iterator
from typing import Any

__all__ = ["is_transient", "retry_if_transient"]

log = logging.getLogger(__name__)

# errno values of an OSError that another attempt may not see (not ENOENT, EACCES, ENOSPC...).
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}
_LOCKED = ("database is locked", "database is busy", "database table is locked")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TRUE = {"1", "true", "yes", "on"}
_TRANSPORT = {
    "ConnectTimeout",
    "ReadTimeout",
    "ConnectError",
    "ReadError",
    "RemoteProtocolError",
    "ChunkedEncodingError",
    "ProxyError",
    "PoolTimeout",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from (``__cause__``, or the implicit context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def _offline() -> bool:
    """The Hugging Face libraries were told there is no network: a retry cannot reach it."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _http_status(exc: BaseException) -> int | None:
    """The status of an HTTP error from requests, httpx, huggingface_hub or urllib."""
    response: Any = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is None and isinstance(exc, urllib.error.HTTPError):
        status = exc.code
    return status if isinstance(status, int) else None


def _locked(exc: BaseException) -> bool:
    """A SQLite "database is locked" (sqlite3, or wrapped by SQLAlchemy)."""
    if isinstance(exc, sqlite3.OperationalError) or type(exc).__name__ == "OperationalError":
        text = str(exc).lower()
        return any(marker in text for marker in _LOCKED)
    return False


def _network(exc: BaseException) -> bool:
    """A connection, timeout or name-resolution failure, or an HTTP status worth another try."""
    status = _http_status(exc)
    if status is not None:
        return status in _RETRY_STATUS
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror | socket.herror):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    # requests and httpx name their transport failures so; none of them is a data error
    return type(exc).__name__ in _TRANSPORT


def is_transient(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from, may pass on another attempt.

    A locked SQLite database always may. A network failure may, unless the Hugging Face
    libraries are offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``): then the Hub answers
    ``ConnectionError`` every time. Everything else (the library's ``IngestError``,
    ``TokenizerError``, ``StageError``, ``CheckpointError``, ``ConfigError``, a missing file,
    a full disk) is not: the same input fails the same way.
    """
    offline = _offline()
    for err in _chain(exc):
        if _locked(err):
            return True
        if not offline and _network(err):
            return True
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect 3's ``retry_condition_fn(task, task_run, state)``: retry transient failures only."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as raised:  # a result that cannot be read is an error of its own
            exc = raised
    if not isinstance(exc, BaseException):
        return False
    transient = is_transient(exc)
    if not transient:
        log.debug("task %s: %s is not transient; no retry", task_run.name, type(exc).__name__)
    return transient
