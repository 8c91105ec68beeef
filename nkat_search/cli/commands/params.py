"""``nkat-search params``: lambda per dataset and the accuracy each TPE target needs."""

from __future__ import annotations

import argparse
import json

from nkat_search.cli.config_args import add_config_arguments, config_from_args
from nkat_search.config import DATASET_NAMES
from nkat_search.train import metrics
from nkat_search.train.datasets import dataset_info

HELP = ("Print lambda (trainable parameters / 1e6) of a config on every dataset, and the accuracy "
        "it needs to reach the 0.60 Local TPE gate and the dataset's own TPE target. No data or "
        "GPU needed.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gate", type=float, default=0.60, help="the Local TPE gate")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nkat_search.train.model import build_model, count_parameters  # torch: not for --help

    cfg = config_from_args(args)
    rows = []
    for name in DATASET_NAMES:
        info = dataset_info(name, cfg.train.emnist_split)
        parameters = count_parameters(build_model(cfg.model, info.in_chans, info.num_classes))
        lam = metrics.param_lambda(parameters)
        target = metrics.DATASET_TARGETS[name]
        rows.append({
            "dataset": name, "in_chans": info.in_chans, "num_classes": info.num_classes,
            "parameters": parameters, "lambda": lam,
            "accuracy_for_gate": metrics.accuracy_for_tpe(args.gate, lam),
            "tpe_target": target["tpe"],
            "accuracy_for_tpe_target": metrics.accuracy_for_tpe(target["tpe"], lam),
        })
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "gate": args.gate, "datasets": rows}, indent=2))
        return 0
    print(f"{'dataset':<14} {'chans':>5} {'classes':>7} {'parameters':>11} {'lambda':>8} "
          f"{'acc for TPE ' + format(args.gate, '.2f'):>16} {'acc for own target':>19}")
    for r in rows:
        print(f"{r['dataset']:<14} {r['in_chans']:>5} {r['num_classes']:>7} {r['parameters']:>11,} "
              f"{r['lambda']:>8.4f} {r['accuracy_for_gate']:>16.4f} "
              f"{r['accuracy_for_tpe_target']:>12.4f} (TPE {r['tpe_target']:.2f})")
    return 0
