"""``nkat-search stage2``: one config on the four datasets and the user's Stage 2 table."""

from __future__ import annotations

import argparse

from nkat_search.cli.commands.train import add_run_arguments, data_dir_of, print_epoch, run_options
from nkat_search.cli.config_args import add_config_arguments, config_from_args
from nkat_search.config import DATASET_NAMES

HELP = ("Train one config on MNIST, Fashion-MNIST, EMNIST and CIFAR-10 (or --datasets) and print "
        "the Stage 2 table: per-dataset accuracy, lambda and TPE, then Global TPE, Consistency "
        "and Robustness against the user's targets. Writes stage2.json and stage2.md into --out. "
        "A dataset whose files are missing is reported as missing, never silently dropped.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "runs/stage2")
    parser.add_argument("--datasets", nargs="+", choices=DATASET_NAMES, default=list(DATASET_NAMES),
                        metavar="NAME", help=f"datasets to run, from {', '.join(DATASET_NAMES)}")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # torch: not for --help.
    from nkat_search.train.session import TrainingSession
    from nkat_search.train.stage2 import run_stage2, write_report

    cfg = config_from_args(args)
    options = run_options(args)
    # One session for the datasets: those with the same input channels and classes (MNIST,
    # Fashion-MNIST) share one compiled model instead of compiling it again.
    options.session = TrainingSession()
    quiet = args.quiet
    report = run_stage2(
        cfg, list(dict.fromkeys(args.datasets)), data_dir=data_dir_of(args), device=args.device,
        out_dir=args.out, progress=not quiet,
        on_dataset=None if quiet else lambda name, r: print(
            f"{name}: accuracy {r.accuracy:.4f}, lambda {r.lam:.4f}, TPE {r.tpe:.4f}, "
            f"{r.train_seconds:.1f} s", flush=True),
        train_kwargs={"resume": args.resume, "on_epoch": None if quiet else print_epoch,
                      "options": options},
    )
    json_path, md_path = write_report(report, args.out)
    print(report.to_markdown())
    print(f"wrote {json_path} and {md_path}")
    # Pass/fail against the targets is in the table; the exit code says whether the run worked.
    return 0 if report.table is not None else 2
