"""``nkat-search train``: one config on one dataset; writes metrics.json and the checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from nkat_search.atomic import write_text_atomic
from nkat_search.cli.checks import check_seconds
from nkat_search.cli.config_args import add_config_arguments, config_from_args
from nkat_search.config import CHECKPOINT_INTERVAL_S

HELP = ("Train one NKAT config on one dataset. Accepts the user's baseline flags verbatim "
        "(e.g. --conv_stem tiny --patch_size 2 --randaugment 2 9 --ema 0.9995). Writes "
        "metrics.json (accuracy, lambda, TPE, time, images/s, config) and checkpoint.pt into --out; "
        "re-running with the same --out resumes from the checkpoint.")


def add_run_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Flags shared by train, smoke and stage2."""
    add_data_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", default=default_out, metavar="DIR", help="output directory")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="ignore a checkpoint in --out and start over")
    add_checkpoint_interval_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--download`` (train, smoke, stage2, worker, up)."""
    parser.add_argument("--data-dir", metavar="DIR",
                        help="dataset root (default: $NKAT_DATA_DIR, else ~/.cache/nkat-search/data)")
    parser.add_argument("--download", action="store_true",
                        help="download missing datasets from their official sources into the data dir; without --data-dir and $NKAT_DATA_DIR they are always downloaded (into ~/.cache/nkat-search/data), a named folder only with this flag")


def data_dir_of(args: argparse.Namespace):
    """The ``sources.DataDir`` the flags name (whether missing datasets may be downloaded)."""
    from nkat_search.train.sources import data_location  # torch: not for --help

    return data_location(args.data_dir, args.download)


def add_checkpoint_interval_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-interval", type=float, default=CHECKPOINT_INTERVAL_S, metavar="S",
                        help="write the checkpoint at most every S seconds (0: after every epoch); "
                        "always after the last epoch and on SIGTERM / Ctrl-C")


def run_options(args: argparse.Namespace):
    """TrainOptions from the shared flags; a negative or NaN interval is one clear line."""
    from nkat_search.train.loop import TrainOptions  # torch: not for --help

    check_seconds("--checkpoint-interval", args.checkpoint_interval, zero_ok=True)
    return TrainOptions(checkpoint_interval_s=args.checkpoint_interval)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "runs/train")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nkat_search.train.loop import train_model  # torch: not for --help

    cfg = config_from_args(args)
    out = Path(args.out)
    result = train_model(cfg, data_dir=data_dir_of(args), device=args.device, out_dir=out,
                         progress=not args.quiet, resume=args.resume,
                         on_epoch=None if args.quiet else print_epoch, options=run_options(args))
    write_text_atomic(out / "metrics.json", json.dumps(dataclasses.asdict(result), indent=2))
    print(f"{result.dataset}: accuracy {result.accuracy:.4f} ({result.eval_split}), "
          f"lambda {result.lam:.4f}, TPE {result.tpe:.4f}, {result.train_seconds:.1f} s training, "
          f"{result.images_per_s:,.0f} images/s on {result.device}")
    print(f"wrote {out / 'metrics.json'}")
    return 0


def print_epoch(report) -> None:
    print(f"epoch {report.epoch:>3}/{report.epochs}  loss {report.train_loss:.4f}  "
          f"acc {report.accuracy:.4f}  TPE {report.tpe:.4f}  {report.epoch_seconds:.1f} s  "
          f"{report.images_per_s:,.0f} img/s", flush=True)
