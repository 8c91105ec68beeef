"""The ``--storage`` flag shared by the commands that talk to a study's storage."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn

STORAGE_ENV = "NKAT_STORAGE"
STORAGE_PASSWORD_FILE_ENV = "NKAT_STORAGE_PASSWORD_FILE"


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    """``--storage URL``, defaulting to ``$NKAT_STORAGE``.

    The environment is the better place for a URL with a password: a command line is visible to
    every user of the host (``ps``), and the compose file gives each container the variable.
    """
    default = os.environ.get(STORAGE_ENV)
    parser.add_argument(
        "--storage", metavar="URL", default=default, required=default is None,
        type=with_password_file,
        help="postgresql+psycopg2://user:pw@host:5432/db or sqlite:///path/study.db "
             f"(default: ${STORAGE_ENV}, which keeps a password off the command line)")


def storage_argv(url: str) -> list[str]:
    """``--storage URL`` for a child command, or nothing when the child inherits it from the env."""
    url = without_file_password(url)
    return [] if url == os.environ.get(STORAGE_ENV) else ["--storage", url]


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
    argparse applies this to the ``$NKAT_STORAGE`` default too.
    """
    from pathlib import Path
    from urllib.parse import quote

    path = os.environ.get(STORAGE_PASSWORD_FILE_ENV)
    scheme = url.split("://", 1)[0]
    if not path or not scheme.startswith("postgresql"):
        return url
    match = _USERINFO.match(url)
    if match is None or not match.group("user"):
        _fail(f"{STORAGE_PASSWORD_FILE_ENV} is set but the storage URL names no user; write it "
              "as postgresql+psycopg2://USER@HOST:5432/DB")
    if match.group("password") is not None:
        _fail(f"{STORAGE_PASSWORD_FILE_ENV} is set and the storage URL has a password too; drop "
              f"the password from the URL or unset {STORAGE_PASSWORD_FILE_ENV}")
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"{STORAGE_PASSWORD_FILE_ENV}={path}: cannot read it "
              f"({getattr(err, 'strerror', None) or err}); mount the secret there or fix the path")
    if not password:
        _fail(f"{STORAGE_PASSWORD_FILE_ENV}={path}: the file is empty; write the password into it")
    head, user, rest = match.group("head", "user", "rest")
    return f"{head}{user}:{quote(password, safe='')}@{rest}"


def without_file_password(url: str) -> str:
    """``url`` without the password that ``with_password_file`` put in (none else can be there).

    A child command inherits ``$NKAT_STORAGE_PASSWORD_FILE`` and puts the password back itself, so
    the password never appears on its command line.
    """
    match = _USERINFO.match(url)
    if not os.environ.get(STORAGE_PASSWORD_FILE_ENV) or match is None:
        return url
    if match.group("password") is None:
        return url
    return f"{match.group('head')}{match.group('user')}@{match.group('rest')}"


_USERINFO = re.compile(r"(?P<head>[a-z0-9+]+://)(?:(?P<user>[^:/@]*)(?::(?P<password>[^@]*))?@)?"
                       r"(?P<rest>.*)", re.S)


def _fail(message: str) -> NoReturn:
    # Inside argparse, which would print its usage line first: the project's user errors are one
    # line and exit code 2.
    print(f"nkat-search: error: {message}", file=sys.stderr)
    raise SystemExit(2)
