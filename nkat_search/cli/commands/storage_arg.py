"""The ``--storage`` flag shared by the commands that talk to a study's storage, and its lookup."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

from nkat_search.errors import UserError
from nkat_search.search.storage_url import STORAGE_PASSWORD_FILE_ENV, split_userinfo

STORAGE_ENV = "NKAT_STORAGE"
# Where `nkat-search up` keeps its embedded SQLite file by default: <out>/<study>.db, out = runs.
UP_DEFAULT_OUT = "runs"


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    """``--storage URL|PATH``, defaulting to ``$NKAT_STORAGE``, then to ``up``'s SQLite file.

    The environment is the better place for a URL with a password: a command line is visible to
    every user of the host (``ps``), and the compose file gives each container the variable.
    """
    parser.add_argument(
        "--storage", metavar="URL",
        help="postgresql+psycopg2://user:pw@host:5432/db, sqlite:///path/study.db, or the path of "
             f"a SQLite file (default: ${STORAGE_ENV}, which keeps a password off the command "
             f"line; else {UP_DEFAULT_OUT}/STUDY.db, where `nkat-search up` keeps a study, if it "
             "exists here)")


def resolve_storage(given: str | None, study: str | None = None) -> str:
    """The storage URL: ``--storage`` (a URL or a SQLite path), ``$NKAT_STORAGE``, or ``up``'s file.

    ``up`` stores study S in ``runs/S.db`` under the folder it ran in; from that folder every
    command finds it by the study's name alone.
    """
    for value in (given, os.environ.get(STORAGE_ENV)):
        if value:
            return with_password_file(as_url(value))
    if study:
        path = Path(UP_DEFAULT_OUT) / f"{study}.db"
        if path.is_file():
            return as_url(str(path))
    where = f" (no {UP_DEFAULT_OUT}/{study}.db here either)" if study else ""
    raise UserError(f"no storage given{where}: pass --storage URL, or the path of a SQLite file "
                    f"such as {UP_DEFAULT_OUT}/STUDY.db, or set ${STORAGE_ENV}")


def as_url(value: str) -> str:
    """A storage URL as given, or ``sqlite:////abs/path`` for the path of a SQLite file."""
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def child_env(url: str, env: dict | None = None) -> dict:
    """The environment for a child command that talks to ``url``: ``NKAT_STORAGE`` set to it.

    Children never get ``--storage URL`` on their command line, where ``ps`` shows the password
    to every user of the host; a password that came from ``$NKAT_STORAGE_PASSWORD_FILE`` stays
    out of the environment too (the child inherits the file's path and reads it itself).
    """
    return dict(os.environ if env is None else env, **{STORAGE_ENV: without_file_password(url)})


# -- the password from a file (Docker secrets) ------------------------------------------------
# The compose files mount one secret file that PostgreSQL reads as POSTGRES_PASSWORD_FILE and the
# clients read as NKAT_STORAGE_PASSWORD_FILE, so the password is in neither the environment
# (`docker inspect` shows it) nor a command line. libpq's own PGPASSFILE would need a second copy
# in its host:port:db:user:password format, readable only by its owner.


def with_password_file(url: str) -> str:
    """``url`` with the password of ``$NKAT_STORAGE_PASSWORD_FILE`` put in, when that is set.

    Applies to PostgreSQL URLs with a user and no password (``postgresql://nkat@db:5432/nkat``);
    SQLite URLs pass unchanged. The file holds the password alone; trailing newlines are dropped
    (as the postgres image's entrypoint does) and the rest is URL-quoted, so any character works.
    ``resolve_storage`` applies it to ``--storage`` and ``$NKAT_STORAGE`` alike.
    """
    path = os.environ.get(STORAGE_PASSWORD_FILE_ENV)
    scheme = url.split("://", 1)[0]
    if not path or not scheme.startswith("postgresql"):
        return url
    parts = split_userinfo(url)
    if parts is None or not parts.user:
        _fail(f"{STORAGE_PASSWORD_FILE_ENV} is set but the storage URL names no user; write it "
              "as postgresql+psycopg2://USER@HOST:5432/DB")
    if parts.password is not None:
        _fail(f"{STORAGE_PASSWORD_FILE_ENV} is set and the storage URL has a password too; drop "
              f"the password from the URL or unset {STORAGE_PASSWORD_FILE_ENV}")
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"{STORAGE_PASSWORD_FILE_ENV}={path}: cannot read it "
              f"({getattr(err, 'strerror', None) or err}); mount the secret there or fix the path")
    if not password:
        _fail(f"{STORAGE_PASSWORD_FILE_ENV}={path}: the file is empty; write the password into it")
    return f"{parts.head}{parts.user}:{quote(password, safe='')}@{parts.rest}"


def without_file_password(url: str) -> str:
    """``url`` without the password that ``with_password_file`` put in (none else can be there).

    A child command inherits ``$NKAT_STORAGE_PASSWORD_FILE`` and puts the password back itself, so
    the password never appears on its command line.
    """
    parts = split_userinfo(url)
    if not os.environ.get(STORAGE_PASSWORD_FILE_ENV) or parts is None or parts.password is None:
        return url
    return f"{parts.head}{parts.user}@{parts.rest}"


def _fail(message: str) -> NoReturn:
    raise UserError(message)
