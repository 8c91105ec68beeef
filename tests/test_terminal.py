"""Progress bars only on a terminal wide enough to draw one (a pty of 0 columns got empty bars)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import termios

from nkat_search.terminal import MIN_BAR_COLUMNS, draws_bars


def _pty_of_width(columns: int):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return leader, os.fdopen(follower, "w")


def test_a_terminal_of_normal_width_draws_bars():
    leader, stream = _pty_of_width(120)
    try:
        assert draws_bars(stream)
    finally:
        stream.close()
        os.close(leader)


def test_a_terminal_that_reports_no_width_or_too_little_gets_plain_lines():
    for columns in (0, MIN_BAR_COLUMNS - 1):
        leader, stream = _pty_of_width(columns)
        try:
            assert not draws_bars(stream), columns
        finally:
            stream.close()
            os.close(leader)


def test_files_and_pipes_get_plain_lines():
    assert not draws_bars(io.StringIO())
    read, write = os.pipe()
    with os.fdopen(read) as r, os.fdopen(write, "w") as w:
        assert not draws_bars(w) and not draws_bars(r)
