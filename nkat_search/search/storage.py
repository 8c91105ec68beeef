"""Opening the study storage: PostgreSQL (the service) or SQLite (one machine), both Optuna
``RDBStorage``.

``open_storage`` is the one door. The URL and its engine options are ``storage_url.py``'s; a
worker's storage rides out outages (``resilient_storage.py``) and carries the heartbeat's retry
callback (``stale_trials.py``); the study-wide lock is ``study_lock.py``. Any problem opening it
is one ``StorageError`` line naming the URL (password masked) and the likely fix. Optuna creates
its schema on the first open of an empty database, so one process at a time opens it (a file
lock for SQLite, an advisory lock for PostgreSQL): two coordinators at once failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import warnings
import zlib

import optuna
import sqlalchemy

from nkat_search.search import optuna_private
from nkat_search.search.resilient_storage import ResilientRDBStorage
from nkat_search.search.stale_trials import RetryStaleTrial
from nkat_search.search.storage_url import (POSTGRES_SCHEMES, SQLITE_SCHEME, SQLITE_TIMEOUT_S,
                                            StorageError, check_url, engine_options, explain,
                                            mask_url, sqlite_path)

# The PostgreSQL advisory lock taken while Optuna creates its schema. Two int4 keys: a key space
# that never meets ``StudyLock``'s single bigint keys, whatever a study is named.
SCHEMA_LOCK_KEYS = (zlib.crc32(b"nkat-search") - 2**31, zlib.crc32(b"schema") - 2**31)
# How long an open waits for another process's schema creation (a few seconds when it works): a
# holder that hangs with its connection alive must not hang every worker that starts after it.
SCHEMA_LOCK_WAIT_S = 120


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = 2, outage_s: float | None = None,
                 storage_class=optuna.storages.RDBStorage, connections: int | None = None):
    """An ``optuna.storages.RDBStorage`` for ``url``, with heartbeat and retries when asked.

    ``heartbeat_interval=None`` opens the storage without heartbeat (the coordinator and read-only
    commands); workers pass the study file's interval, grace and max_retry, and ``outage_s``: how
    long each storage call waits for a database that went away (a ``ResilientRDBStorage``).
    ``connections`` bounds the PostgreSQL connections this storage ever holds at once (workers
    pass ``WORKER_CONNECTIONS``; None: SQLAlchemy's default pool).
    """
    given = url
    check_url(url)
    url, engine_kwargs = engine_options(url, connections)
    callback = None
    if heartbeat_interval is not None:
        callback = RetryStaleTrial(max_retry=max_retry, inherit_intermediate_values=True)
    kind = storage_class
    extra = {}
    if outage_s is not None:
        kind, extra = ResilientRDBStorage, {"outage_s": outage_s, "given_url": given}
    with warnings.catch_warnings(), _sqlite_schema_lock(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if url.startswith(SQLITE_SCHEME + "://"):
            # Under the lock too: switching a new file to WAL while another process creates the
            # schema failed at once with "database is locked" (1 in 30 pairs of `study create`).
            _prepare_sqlite(url)
        try:
            with _pg_schema_lock(url, engine_kwargs):
                return kind(url, engine_kwargs=engine_kwargs,
                            heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                            heartbeat_stale_trial_callback=callback, **extra)
        except StorageError:
            raise
        except Exception as err:  # driver, SQLAlchemy and Optuna errors all mean: fix the URL
            raise StorageError(explain(given, err)) from None


@contextlib.contextmanager
def _sqlite_schema_lock(url: str):
    """One process at a time opens a SQLite file: Optuna creates the schema on the first open,
    and two at once (two ``up`` on one new study) failed with "table trials already exists" or
    "UNIQUE constraint failed: alembic_version". A ``flock`` beside the database, released when
    the storage is open."""
    path = _sqlite_file(url)
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".open-lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise StorageError(
            f"storage URL {url}: cannot create or open the SQLite file {path} ({err.strerror}); "
            "pick a writable path, e.g. sqlite:///runs/study.db") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _pg_schema_lock(url: str, engine_kwargs: dict):
    """One process at a time opens a PostgreSQL storage: Optuna's ``RDBStorage`` creates the
    tables, the version row and the alembic stamp with no lock, and six `study create` on one
    new database at once failed in 8 of 10 runs ("duplicate key value violates unique constraint
    pg_type_typname_nsp_index", "relation studies already exists").

    A session-level advisory lock on a connection of its own, closed as soon as the storage is
    open, so it is never held while the storage is used; the server drops it with the connection
    of a holder that was killed. A database whose schema is complete is opened without it: a
    worker then holds no connection beyond its pool's ``WORKER_CONNECTIONS`` (Optuna's checks
    hold two at once), and workers starting together do not wait on each other.
    """
    if url.split("://", 1)[0] not in POSTGRES_SCHEMES:
        yield
        return
    # NullPool: closing the connection ends the session, and the session's lock with it.
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=engine_kwargs.get("connect_args", {}))
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            created = optuna_private.schema_created(conn)
            if not created:
                _wait_for_schema_lock(conn, url)
                yield
        if created:
            yield
    finally:
        engine.dispose()


def _wait_for_schema_lock(conn, url: str) -> None:
    """Take the schema lock, waiting at most ``SCHEMA_LOCK_WAIT_S`` (PostgreSQL's lock_timeout,
    which bounds advisory lock waits too)."""
    conn.execute(sqlalchemy.text(f"SET lock_timeout = '{int(SCHEMA_LOCK_WAIT_S * 1000)}ms'"))
    try:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:a, :b)"),
                     dict(zip("ab", SCHEMA_LOCK_KEYS)))
    except sqlalchemy.exc.OperationalError as err:
        if "lock timeout" not in str(err):
            raise
        raise StorageError(
            f"storage URL {mask_url(url)}: another process has been creating the study tables in "
            f"this database for over {SCHEMA_LOCK_WAIT_S:g} s; find it (SELECT pid, state, query "
            "FROM pg_stat_activity) and stop it, then try again") from None


def fold_sqlite_wal(url: str) -> None:
    """Move a SQLite study's write-ahead log into its file and empty the log, so that the file
    alone is the whole study (a user copies it to another machine to resume there).

    Processes that exit with their connections open leave the last commits in ``FILE-wal``, and
    a copy of the file without it lost them (an interrupted trial and its queued retry). Waits
    at most 5 s for other readers and writers; busy, it leaves the log as it is.
    """
    path = _sqlite_file(url)
    if path is None or not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass


def _sqlite_file(url: str):
    """The file of a SQLite URL; None for PostgreSQL or an in-memory database."""
    return sqlite_path(url) if url.startswith(SQLITE_SCHEME + "://") else None


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
