"""The search service: study files, the objective, coordinator, workers, storage, reports.

Optuna 5.0 is the floor: the objective records Consistency and Robustness with
``Trial.set_constraint`` and names the study's value with ``Study.set_metric_names`` (both from
5.0). Under Optuna 4.9 every trial failed after Stage 2, so an older Optuna is refused here, in
one line, before any trial runs.
"""

from __future__ import annotations

import re
from importlib import metadata

from nkat_search.errors import UserError

OPTUNA_MIN = (5, 0)


def check_optuna(version: str) -> None:
    """Raise a one-line ``UserError`` when ``version`` is older than ``OPTUNA_MIN``."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < OPTUNA_MIN:
        need = ".".join(map(str, OPTUNA_MIN))
        raise UserError(f"optuna {version} is installed, nkat-search needs optuna >= {need} "
                        f"(Trial.set_constraint); pip install 'optuna>={need}'")


try:
    check_optuna(metadata.version("optuna"))
except metadata.PackageNotFoundError:
    pass  # the import of optuna itself will say so
