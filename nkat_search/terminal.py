"""Whether a stream is a terminal that a progress bar can be drawn on."""

from __future__ import annotations

import os

# Narrower than this a tqdm bar is a stub of digits; a terminal that reports 0 columns (a pty
# nobody sized, as `docker exec -t` can give) gets an empty line redrawn forever.
MIN_BAR_COLUMNS = 40


def draws_bars(stream) -> bool:
    """True for a terminal at least ``MIN_BAR_COLUMNS`` wide; else callers print plain lines."""
    try:
        if not stream.isatty():
            return False
        return os.get_terminal_size(stream.fileno()).columns >= MIN_BAR_COLUMNS
    except (AttributeError, OSError, ValueError):
        return False


def table_width(stream) -> int | None:
    """The columns a table must fit on ``stream``: a terminal's width, None for a pipe or a file.

    Piped or redirected output keeps every column (it is read by tools, or in an editor that does
    not wrap); a terminal that reports no width gets the same.
    """
    try:
        if not stream.isatty():
            return None
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None
    return columns or None
