"""Checks of numeric flags that argparse cannot express: one line naming the flag and the value."""

from __future__ import annotations

import math

from nkat_search.errors import UserError


def check_seconds(flag: str, value: float | None, *, zero_ok: bool = False) -> None:
    """A duration flag must be a finite number of seconds, > 0 (or >= 0); None means unset."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise UserError(f"{flag}: must be a number of seconds {bound}, got {value}")
