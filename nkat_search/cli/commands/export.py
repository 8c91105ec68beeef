"""``nkat-search export``: the best trials of a study as config files that ``train`` re-runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nkat_search.cli.commands.storage_arg import add_storage_argument, resolve_storage
from nkat_search.errors import UserError
from nkat_search.search.study_files import write_study_files

# `export --top` and `up --top` alike.
DEFAULT_TOP = 3

HELP = ("Write the best K complete trials into --out as trial-<n>.yaml and trial-<n>.json, plus "
        "best.yaml / best.json for the top one. The order is the study's own: its best trial "
        "(Optuna's study.best_trial: the best Global TPE among the trials that meet the "
        "Consistency and Robustness constraints) first, then the other feasible ones, then the "
        "infeasible ones, each marked metrics.feasible. Each file has a 'config' section that "
        "'nkat-search train --config FILE' and 'stage2 --config FILE' accept, the trial's "
        "'metrics' and its 'study' (name, study file hash, trial number). Beside them: "
        "trials.csv (every trial: state, value, params, attributes) and Optuna's plots as PNG "
        "(optimization history, parameter importances, parallel coordinate, intermediate "
        "values, timeline); a plot that cannot be drawn yet is a warning line. Files are written "
        "atomically. Exit code 1 with 'nothing to export yet' when no trial has completed (the "
        "CSV and the plots that need no complete trial are still written).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, metavar="NAME", help="study name")
    add_storage_argument(parser)
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                        help="export the best K trials")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")


def run(args: argparse.Namespace) -> int:
    # optuna: not for --help.
    from nkat_search.search.export import NothingToExport, export_best
    from nkat_search.search.report import open_study

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: is a file, not a folder; name a folder to export into")
    study = open_study(resolve_storage(args.storage, args.study), args.study)
    try:
        exported, nothing = export_best(study, args.out, top=args.top), None
    except NothingToExport as err:
        # Not a mistake of the user: the study is just young. Distinct from exit 2 (bad input).
        exported, nothing = None, err
    files = write_study_files(study, args.out)
    for path in (exported.paths if exported else []) + files.written:
        print(f"wrote {path}")
    if exported is not None:
        print(exported.describe(Path(args.out)))
    for warning in files.warnings:
        print(f"nkat-search export: warning: {warning}", file=sys.stderr)
    if nothing is not None:
        print(f"nkat-search export: {nothing}", file=sys.stderr)
        return 1
    return 0
