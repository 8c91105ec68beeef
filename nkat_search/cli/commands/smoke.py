"""``nkat-search smoke``: the user's step 1, a 10-epoch CIFAR-10 run; GO above 45 % accuracy."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from nkat_search.atomic import write_text_atomic
from nkat_search.cli.commands.train import add_run_arguments, data_dir_of, print_epoch, run_options
from nkat_search.cli.config_args import add_config_arguments, config_from_args

HELP = ("The user's smoke test: the ConvStem-tiny + patch-2 baseline trained 10 epochs on "
        "CIFAR-10. Prints GO and exits 0 when test accuracy > 45 %, NO-GO and exits 1 otherwise.")
GO_ACCURACY = 0.45
# Applied unless given as flags; the warm-up shrinks with the shorter run (5 of 40 epochs in the
# baseline). The dataset is always CIFAR-10.
SMOKE_DEFAULTS = {"epochs": 10, "warmup": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "runs/smoke")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nkat_search.train.loop import train_model  # torch: not for --help

    for key, value in SMOKE_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.dataset = "cifar10"
    cfg = config_from_args(args)
    out = Path(args.out)
    result = train_model(cfg, data_dir=data_dir_of(args), device=args.device, out_dir=out,
                         progress=not args.quiet, resume=args.resume,
                         on_epoch=None if args.quiet else print_epoch, options=run_options(args))
    go = result.accuracy > GO_ACCURACY
    verdict = "GO" if go else "NO-GO"
    summary = dataclasses.asdict(result) | {"verdict": verdict, "go_accuracy": GO_ACCURACY,
                                            "smoke_defaults": SMOKE_DEFAULTS}
    write_text_atomic(out / "smoke.json", json.dumps(summary, indent=2))
    print(f"{verdict}: CIFAR-10 {result.eval_split} accuracy {result.accuracy:.2%} after "
          f"{cfg.train.epochs} epochs (threshold {GO_ACCURACY:.0%}), lambda {result.lam:.4f}, "
          f"Local TPE {result.tpe:.4f}, {result.train_seconds:.1f} s training on {result.device}")
    return 0 if go else 1
