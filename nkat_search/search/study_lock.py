"""``StudyLock``: one worker at a time, across machines, in a study's check-and-ask step."""

from __future__ import annotations

import contextlib
import fcntl
import os
import zlib

import sqlalchemy

from nkat_search.search.storage_url import POSTGRES_SCHEMES, SQLITE_SCHEME, sqlite_path


class StudyLock:
    """A lock held by one worker at a time, across machines, for a study's check-and-ask step.

    PostgreSQL: a session-level advisory lock (the server drops it with the connection, so a
    killed holder never blocks the others). SQLite: ``flock`` on a file beside the database
    (SQLite is one machine only). In-memory SQLite has a single process: no lock needed.
    ``release`` may be called more than once, and never fails: a connection the database lost
    took its lock with it. Taking the lock waits out an outage like any storage call.
    """

    def __init__(self, storage, study_name: str):
        self._url = str(storage.url)
        self._store = storage
        self._engine = storage.engine
        self._key = zlib.crc32(f"nkat-search:{study_name}".encode()) - 2**31
        self._conn = None
        self._fd: int | None = None

    def acquire(self) -> None:
        scheme = self._url.split("://", 1)[0]
        if scheme in POSTGRES_SCHEMES:
            retry = getattr(self._store, "retry", None)
            self._conn = retry(self._pg_lock, "lock") if retry else self._pg_lock()
            return
        path = sqlite_path(self._url) if scheme == SQLITE_SCHEME else None
        if path is not None:
            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd

    def _pg_lock(self):
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            except Exception:  # noqa: BLE001 - a dead connection's lock died with it
                pass
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
