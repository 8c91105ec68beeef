"""Storage URLs: the two schemes, the engine options each is opened with, and what is printed.

A wrong URL is the user's to fix, so every problem with one becomes a ``StorageError``: one line
that names the URL (password masked, ``mask_url``) and the likely fix. Nothing here imports
Optuna or SQLAlchemy: the CLI reads URLs before it opens anything.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from nkat_search.errors import UserError

POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")
SQLITE_SCHEME = "sqlite"
# The file a password can come from instead of the URL (cli/commands/storage_arg.py reads it).
STORAGE_PASSWORD_FILE_ENV = "NKAT_STORAGE_PASSWORD_FILE"
# A worker blocked on another's write must wait, not fail: trials write rarely but the heartbeat
# thread and several workers share one SQLite file.
SQLITE_TIMEOUT_S = 60
POSTGRES_CONNECT_TIMEOUT_S = 10
# TCP keepalives: a connection whose server vanished without a reset (a cut network, a host that
# died) is noticed within idle + interval * count seconds instead of the kernel's two hours.
POSTGRES_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                       "keepalives_count": 3}
# A worker process's connections to PostgreSQL: the study lock's (a session advisory lock, held
# from ``ask`` until the trial's parameters are drawn) and one that the trial's calls and its
# heartbeat thread take turns on (each call holds it for milliseconds). SQLAlchemy's default pool
# (5 + 10 overflow) and a second engine for reading the study file let one process hold 4-5, so a
# host of 8 GPUs at 4 trials each opened about 150 against PostgreSQL's default max_connections
# of 100.
WORKER_CONNECTIONS = 2
# How long a call waits for the pool's connection before it counts as an outage (retried).
POOL_WAIT_S = 30


class StorageError(UserError):
    """The storage URL is wrong or the database cannot be reached; the message names the fix."""


@dataclass(frozen=True)
class Userinfo:
    """A URL cut around its user and password: ``head`` + ``user:password@`` + ``rest``."""

    head: str              # "scheme://"
    user: str | None       # None: the URL has no "@" before its host
    password: str | None   # None: no ":" after the user
    rest: str              # host, port, database and query


def split_userinfo(url: str) -> Userinfo | None:
    """The user and password of ``url``; None when it has no ``scheme://``.

    The user part ends at the *last* ``@`` before the first ``/``, so a password with an unencoded
    ``@`` is seen whole (SQLAlchemy would cut it at the first one). A password with an unencoded
    ``/`` is seen whole too: when no ``@`` comes before the first ``/`` but a ``:`` does, the
    password runs on to the next ``@``, as SQLAlchemy reads it (``postgresql://u:pa/ss@h/db`` is
    user ``u``, password ``pa/ss``). A user with an unencoded ``/`` is read the same way
    (``postgresql://us/er:pw@h/db``: user ``us/er``, password ``pw``), though SQLAlchemy takes
    ``us`` for the host and the rest, password included, for the database. ``check_url`` refuses
    all three kinds of URL. The user ends at the first ``:``.
    """
    scheme, sep, after = url.partition("://")
    if not sep:
        return None
    netloc, slash, tail = after.partition("/")
    if "@" not in netloc and "@" in tail and ":" in netloc + tail.partition("@")[0]:
        password_tail, _, after_at = tail.partition("@")
        host, slash, tail = after_at.partition("/")
        netloc = f"{netloc}/{password_tail}@{host}"
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return Userinfo(scheme + sep, None, None, after)
    user, colon, password = userinfo.partition(":")
    return Userinfo(scheme + sep, user, password if colon else None, host + slash + tail)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print and log)."""
    parts = split_userinfo(url)
    if parts is None or parts.password is None:
        return url
    return f"{parts.head}{parts.user}:***@{parts.rest}"


def redact(text: str, url: str) -> str:
    """``text`` with the URL's password (as written and percent-decoded) replaced by ``***``."""
    parts = split_userinfo(url)
    password = (parts.password if parts else None) or ""
    for secret in {password, urllib.parse.unquote(password)}:
        if secret:
            text = text.replace(secret, "***")
    return text


def check_url(url: str) -> None:
    """Refuse URLs that the driver would misread in a way that prints part of the password."""
    parts = split_userinfo(url)
    if parts is not None and "@" in (parts.user or "") + (parts.password or ""):
        raise StorageError(
            f"storage URL {mask_url(url)}: the user or password contains '@'; write it as %40 "
            "(postgresql+psycopg2://user:pass%40word@host:5432/db)")
    if parts is not None and "/" in (parts.user or ""):
        raise StorageError(
            f"storage URL {mask_url(url)}: the user contains '/'; write it as %2F "
            "(postgresql+psycopg2://us%2Fer:password@host:5432/db)")
    if parts is not None and "/" in (parts.password or ""):
        raise StorageError(
            f"storage URL {mask_url(url)}: the password contains '/'; write it as %2F "
            "(postgresql+psycopg2://user:pass%2Fword@host:5432/db) or give the password in a file "
            f"(${STORAGE_PASSWORD_FILE_ENV})")


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


def engine_options(url: str, connections: int | None = None) -> tuple[str, dict]:
    """(the URL SQLAlchemy is given, its ``engine_kwargs``) for a PostgreSQL or SQLite URL.

    ``connections`` bounds the PostgreSQL connections the engine ever holds at once (None:
    SQLAlchemy's default pool).
    """
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in POSTGRES_SCHEMES:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        # pre_ping: a trial can run for an hour between writes, and a database restart leaves
        # every pooled connection dead; each checkout tests its connection and replaces it.
        options: dict = {"pool_pre_ping": True,
                         "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S,
                                          **POSTGRES_KEEPALIVES}}
        if connections is not None:
            options.update(pool_size=connections, max_overflow=0, pool_timeout=POOL_WAIT_S)
        return url, options
    if scheme == SQLITE_SCHEME:
        return url, {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    raise StorageError(
        f"storage URL {mask_url(url)}: unsupported scheme {scheme or '(none)'!r}; use "
        "postgresql+psycopg2://user:password@host:5432/db or sqlite:///path/study.db"
    )


def explain(url: str, err: Exception) -> str:
    """One line for a storage that would not open: the URL (masked), the reason, the fix."""
    masked = mask_url(url)
    text = " ".join(str(getattr(err, "orig", None) or err).split())
    lower = text.lower()
    if "does not exist" in lower and "database" in lower:
        database = url.rsplit("/", 1)[-1].split("?", 1)[0]
        fix = f"create it first (createdb {database}, or docker compose up starts one)"
    elif "too many clients" in lower or "connection slots are reserved" in lower:
        fix = (f"the server has no connection left (its max_connections); each worker process "
               f"holds at most {WORKER_CONNECTIONS}: run fewer workers, raise max_connections, or "
               "put a connection pooler such as PgBouncer (pool_mode = session) in front of it")
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
    reason = redact(text, url)[:300]
    return f"storage URL {masked}: cannot open it ({reason}); {fix}"
