"""``nkat-search status``: the trials of a study as a table, or as JSON for machines."""

from __future__ import annotations

import argparse
import json
import sys

from nkat_search.cli.commands.storage_arg import add_storage_argument, resolve_storage
from nkat_search.terminal import table_width

HELP = ("Print the study's trials: outcome, lambda, accuracy per dataset, Local TPE, Global TPE, "
        "whether the trial meets the constraints and why it stopped (or what it is doing), then "
        "the searched parameters that differ; and a summary line: complete / pruned / "
        "gate-failed / failed, best Global TPE (the study's own best trial: feasible first). "
        "On a terminal the table fits its width: the least needed columns are left out (a last "
        "line names them); --wide shows every column, --json prints the same, with the timings "
        "of each trial, as JSON.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, metavar="NAME", help="study name")
    add_storage_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--wide", action="store_true",
                        help="every column, however wide the terminal (a row may wrap)")


def run(args: argparse.Namespace) -> int:
    # optuna: not for --help.
    from nkat_search.search.report import (budget_text, describe_lost, describe_silent,
                                           format_table, open_study, study_report, summary_line,
                                           wrap)
    from nkat_search.search.trials import lost_configurations

    study = open_study(resolve_storage(args.storage, args.study), args.study)
    report = study_report(study, heartbeats=True)
    # Configurations whose every attempt failed with no retry left: what the study lost.
    report["lost"] = lost_configurations(study.get_trials(deepcopy=False))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    budget = report["budget"]
    used = f", {budget_text(budget)}" if budget else ""
    width = None if args.wide else table_width(sys.stdout)
    print(wrap(f"study {report['study']} ({report['direction']} {report['metric']}, "
               f"study file {report['study_file_name'] or '-'}{used})", width))
    print(format_table(report["trials"], width))
    print(wrap(summary_line(report["summary"]), width))
    silent = describe_silent(report["trials"])
    if silent:
        print(wrap(silent, width))
    if report["lost"]:
        print(wrap(describe_lost(report["lost"]), width))
    return 0
