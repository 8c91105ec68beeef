"""The ``nkat-search`` console script: a thin argparse front over ``nkat_search.cli.commands``.

Each subcommand lives in its own module, loaded only when that subcommand runs; heavy imports
(torch, optuna, the PostgreSQL driver, the dashboard) happen inside ``run``. So ``--help`` is fast
and a missing optional part (on a GPU box without psycopg2, say) only affects the command that
needs it.
User mistakes surface as one line on stderr and exit code 2 (a bad flag too: argparse's usage
block is replaced by the error and a pointer to ``--help``); internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib import metadata

from nkat_search.errors import UserError
from nkat_search.train.errors import CheckpointMismatch, DeviceError

# (subcommand, module under nkat_search.cli.commands, one-line summary)
COMMANDS = [
    ("params", "params", "print lambda (trainable params / 1e6) and the TPE gate per dataset"),
    ("train", "train", "train one config on one dataset and write metrics.json + checkpoint"),
    ("smoke", "smoke", "the user's step 1: 10-epoch CIFAR-10 run, GO if test accuracy > 45%%"),
    ("stage2", "stage2", "train one config on the four datasets and print the Stage 2 table"),
    ("study", "study", "create or inspect a study from a study file (the coordinator)"),
    ("worker", "worker", "pull trials from a study and train them on one device"),
    ("up", "up", "one machine: study + workers + dashboard + export, embedded storage"),
    ("status", "status", "table of a study's trials (--json for machines)"),
    ("export", "export", "write the best trials' configs as YAML and JSON"),
    ("dashboard", "dashboard", "serve optuna-dashboard for a storage, on 127.0.0.1 by default"),
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults only where they say something: not for on/off switches or unset values."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one line naming it (not the whole usage) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    try:
        return metadata.version("nkat-search")
    except metadata.PackageNotFoundError:  # run from a checkout without `pip install -e .`
        return "unknown (not installed)"


def build_parser(command_name: str | None = None) -> argparse.ArgumentParser:
    """The full parser for ``command_name``; the others are listed but their modules not loaded."""
    parser = Parser(
        prog="nkat-search",
        description="Hyperparameter search for the NKAT vision transformer "
        "(Optuna study, GPU workers, two-stage CIFAR-10 gate + Global TPE objective).",
    )
    parser.add_argument("--version", action="version", version=f"nkat-search {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name, summary in COMMANDS:
        if name != command_name:
            sub.add_parser(name, help=summary)
            continue
        module = importlib.import_module(f"nkat_search.cli.commands.{module_name}")
        command = sub.add_parser(
            name, help=summary, description=getattr(module, "HELP", summary),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _with_flag(err: UserError) -> str:
    """The trainer says what went wrong; the CLI names the flag that sets it."""
    if isinstance(err, DeviceError):
        return f"--device {err.device}: {err.reason}"
    if isinstance(err, CheckpointMismatch):
        return f"{err}; use another --out directory or --no-resume"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = {name for name, _, _ in COMMANDS}
    command = next((a for a in argv if a in names), None)
    try:
        args = build_parser(command).parse_args(argv)
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"nkat-search {command or ''}: error: {_with_flag(err)}".replace("  ", " "),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nkat-search {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`status --json | head`): not an error of ours. Python would
        # print a traceback while flushing stdout at exit; point stdout at /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a process a closed pipe killed


if __name__ == "__main__":
    sys.exit(main())
