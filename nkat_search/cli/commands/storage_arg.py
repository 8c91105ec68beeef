"""The ``--storage`` flag shared by the commands that talk to a study's storage."""

from __future__ import annotations

import argparse
import os

STORAGE_ENV = "NKAT_STORAGE"


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    """``--storage URL``, defaulting to ``$NKAT_STORAGE``.

    The environment is the better place for a URL with a password: a command line is visible to
    every user of the host (``ps``), and the compose file gives each container the variable.
    """
    default = os.environ.get(STORAGE_ENV)
    parser.add_argument(
        "--storage", metavar="URL", default=default, required=default is None,
        help="postgresql+psycopg2://user:pw@host:5432/db or sqlite:///path/study.db "
             f"(default: ${STORAGE_ENV}, which keeps a password off the command line)")


def storage_argv(url: str) -> list[str]:
    """``--storage URL`` for a child command, or nothing when the child inherits it from the env."""
    return [] if url == os.environ.get(STORAGE_ENV) else ["--storage", url]
