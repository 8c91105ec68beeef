"""The ``--storage`` flag shared by the commands that talk to a study's storage, and its lookup."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
    from nkat_search.errors import UserError

    for value in (given, os.environ.get(STORAGE_ENV)):
        if value:
            return as_url(value)
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


def storage_argv(url: str) -> list[str]:
    """``--storage URL`` for a child command, or nothing when the child inherits it from the env."""
    env = os.environ.get(STORAGE_ENV)
    return [] if env and url == as_url(env) else ["--storage", url]
