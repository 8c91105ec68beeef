"""Study storage: PostgreSQL (the service) or SQLite (one machine), both Optuna ``RDBStorage``.

Both get Optuna's heartbeat: a running trial whose worker stops beating for ``grace_period``
seconds is marked FAIL by the next worker that asks for a trial, and ``RetryStaleTrial`` queues
a copy of it (same parameters, linked to the original) that any worker then picks up.

A wrong URL is the user's to fix, so every connection problem becomes one ``UserError`` line that
names the URL (password masked) and the likely fix.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import re
import sqlite3
import warnings
import zlib
from pathlib import Path

import optuna

from nkat_search.errors import UserError

POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")
SQLITE_SCHEME = "sqlite"
# A worker blocked on another's write must wait, not fail: trials write rarely but the heartbeat
# thread and several workers share one SQLite file.
SQLITE_TIMEOUT_S = 60
POSTGRES_CONNECT_TIMEOUT_S = 10


class StorageError(UserError):
    """The storage URL is wrong or the database cannot be reached; the message names the fix."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print and log)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = 2, storage_class=optuna.storages.RDBStorage):
    """An ``optuna.storages.RDBStorage`` for ``url``, with heartbeat and retries when asked.

    ``heartbeat_interval=None`` opens the storage without heartbeat (the coordinator and read-only
    commands); workers pass the study file's interval, grace and max_retry.
    """
    given = url
    scheme = url.split("://", 1)[0] if "://" in url else ""
    engine_kwargs: dict = {}
    if scheme in POSTGRES_SCHEMES:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        # pre_ping: a trial can run for an hour between writes; idle pooled connections get cut.
        engine_kwargs = {"pool_pre_ping": True,
                         "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}}
    elif scheme == SQLITE_SCHEME:
        _prepare_sqlite(url)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        raise StorageError(
            f"storage URL {mask_url(url)}: unsupported scheme {scheme or '(none)'!r}; use "
            "postgresql+psycopg2://user:password@host:5432/db or sqlite:///path/study.db"
        )
    callback = None
    if heartbeat_interval is not None:
        callback = RetryStaleTrial(max_retry=max_retry, inherit_intermediate_values=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return storage_class(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=callback,
            )
        except Exception as err:  # driver, SQLAlchemy and Optuna errors all mean: fix the URL
            raise StorageError(_explain(given, err)) from None


def _prepare_sqlite(url: str) -> None:
    """Create the parent folder and switch the file to WAL, failing early on an unusable path.

    WAL lets readers (the dashboard, ``status``) work while a worker writes; the setting is stored
    in the file, so one connection here sets it for every later one.
    """
    path = sqlite_path(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as err:
        raise StorageError(
            f"storage URL {url}: cannot create or open the SQLite file {path} ({err}); pick a "
            "writable path, e.g. sqlite:///runs/study.db"
        ) from None


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, or None for an in-memory database."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/"):
        raise StorageError(f"storage URL {url}: use three slashes, sqlite:///relative/path.db or "
                           "sqlite:////absolute/path.db")
    rest = rest[1:].split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def _explain(url: str, err: Exception) -> str:
    masked = mask_url(url)
    text = " ".join(str(getattr(err, "orig", None) or err).split())
    lower = text.lower()
    if "does not exist" in lower and "database" in lower:
        database = url.rsplit("/", 1)[-1].split("?", 1)[0]
        fix = f"create it first (createdb {database}, or docker compose up starts one)"
    elif "password authentication failed" in lower or "no password supplied" in lower:
        fix = "check the user and password in the URL"
    elif any(s in lower for s in ("connection refused", "could not connect", "timeout expired",
                                  "could not translate host name", "name or service not known")):
        fix = "is PostgreSQL running and are host and port right?"
    elif isinstance(err, ImportError) or "no module named" in lower:
        fix = "install the driver: pip install psycopg2-binary"
    elif "unable to open database file" in lower:
        fix = "pick a writable path, e.g. sqlite:///runs/study.db"
    else:
        fix = "check the URL (postgresql+psycopg2://user:password@host:5432/db or sqlite:///path.db)"
    reason = _redact(text, url)[:300]
    return f"storage URL {masked}: cannot open it ({reason}); {fix}"


def _redact(text: str, url: str) -> str:
    match = re.search(r"://[^:/@]+:([^@]*)@", url)
    return text.replace(match.group(1), "***") if match and match.group(1) else text


# Optuna 4.9 renamed RetryFailedTrialCallback to RetryHeartbeatStaleTrialCallback; the old name
# still works but warns on every use.
_RetryBase = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
    optuna.storages.RetryFailedTrialCallback


class RetryStaleTrial(_RetryBase):
    """Optuna's retry callback, except the queued copy does not inherit the dead run's user attrs.

    The copy starts clean: the dead run's ``outcome`` and ``error`` describe the crash, not the
    retry, and the objective sets every attribute again. Parameters, the link to the original
    (``retried_trial_number``) and, here, the intermediate values are kept.
    """

    def __init__(self, max_retry: int | None = None, inherit_intermediate_values: bool = True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(max_retry=max_retry,
                             inherit_intermediate_values=inherit_intermediate_values)

    def __call__(self, study, trial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {}
        super().__call__(study, trial)


def retried_trial_number(trial) -> int | None:
    """The number of the first trial of a retry chain, or None when ``trial`` is no retry.

    Takes a ``FrozenTrial`` or a live ``Trial`` (which, since Optuna 5, no longer exposes its
    system attrs; the storage still has them).
    """
    if isinstance(trial, optuna.trial.FrozenTrial):
        system_attrs = trial.system_attrs
    else:
        system_attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    return system_attrs.get("failed_trial")


class StudyLock:
    """A lock held by one worker at a time, across machines, for a study's check-and-ask step.

    PostgreSQL: a session-level advisory lock (the server drops it with the connection, so a
    killed holder never blocks the others). SQLite: ``flock`` on a file beside the database
    (SQLite is one machine only). In-memory SQLite has a single process: no lock needed.
    ``release`` may be called more than once (the objective releases early, the worker again).
    """

    def __init__(self, storage, study_name: str):
        self._url = str(storage.url)
        self._engine = storage.engine
        self._key = zlib.crc32(f"nkat-search:{study_name}".encode()) - 2**31
        self._conn = None
        self._fd: int | None = None

    def acquire(self) -> None:
        scheme = self._url.split("://", 1)[0]
        if scheme in POSTGRES_SCHEMES:
            import sqlalchemy

            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            self._conn = conn
            return
        path = sqlite_path(self._url) if scheme == SQLITE_SCHEME else None
        if path is not None:
            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd

    def release(self) -> None:
        if self._conn is not None:
            import sqlalchemy

            conn, self._conn = self._conn, None
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            finally:
                conn.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
