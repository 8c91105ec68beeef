"""``nkat-search status``: the trials of a study as a table, or as JSON for machines."""

from __future__ import annotations

import argparse

from nkat_search.cli.commands.storage_arg import add_storage_argument

HELP = ("Print a table of the study's trials (number, state, outcome, Global TPE, Local TPE, "
        "lambda, epochs reached, duration, worker) and a summary line: complete / pruned / "
        "gate-failed / failed / running, best Global TPE so far. --json prints the same as JSON.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, metavar="NAME", help="study name")
    add_storage_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    from nkat_search.search.report import format_table, open_study, study_report, summary_line

    report = study_report(open_study(args.storage, args.study))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"study {report['study']} ({report['direction']}, "
          f"study file {report['study_file_name'] or '-'})")
    print(format_table(report["trials"]))
    print(summary_line(report["summary"]))
    return 0
