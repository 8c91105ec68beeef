"""Learning curves out of a study, and the gate pruner's prior out of the curves.

    python benchmarks/curves_export.py STUDY.db results/curves/round2_curves.json \
        [--prior nkat_search/search/gate_prior.py]

Reads every trial of the (one) study in the SQLite file that reported all its epochs, and writes
one row per trial: its parameters, lambda, tokens per image, outcome, the Local TPE@CIFAR10 of
every epoch (validation slice) and the same as accuracy, Stage 1's wall time and the part of it
paid before the first epoch (compile, set-up, data). ``--prior`` also writes the largest rise
factor per epoch over these curves (``search/gate_pruner.py`` says what it is) as the module the
pruner ships with.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.atomic import write_text_atomic  # noqa: E402
from nkat_search.search.gate_pruner import largest_rises  # noqa: E402
from nkat_search.search.report import only_study  # noqa: E402
from nkat_search.search.trials import TrialRecord  # noqa: E402
from nkat_search.train.model import tokens_per_image  # noqa: E402


def curves_of(study: optuna.Study, epochs: int) -> list[dict]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.intermediate_values
        if any(step not in values for step in range(1, epochs + 1)):
            continue
        record = TrialRecord.of(trial)
        lam = record.datasets["cifar10"].lam
        curve = [values[step] for step in range(1, epochs + 1)]
        rows.append({
            "trial": trial.number, "outcome": record.outcome, "params": trial.params,
            "lambda": lam, "tokens": tokens_per_image(trial.params["conv_stem"],
                                                         trial.params["patch_size"]),
            "local_tpe": curve,
            "accuracy": [v * math.log10(1 + lam) for v in curve],
            # Stage 1's wall time: the whole trial's where it had no Stage 2 to split off.
            "time_trial_s": record.timings.get("time_stage1_s",
                                               record.timings.get("time_trial_s")),
            # What the trial pays before its first epoch however early it is pruned: compiling
            # (its first steps beyond steady ones), building the model, loading data.
            "time_start_s": sum(record.timings.get(f"time_{part}_s", 0.0)
                                for part in ("compile", "setup", "data")),
        })
    return rows


def prior_module(curves: list[dict], epochs: int, source: str) -> str:
    largest = largest_rises([dict(enumerate(c["local_tpe"], start=1)) for c in curves], epochs)
    lines = "\n".join(f"    {v:.4f},  # epoch {e}" for e, v in enumerate(largest, start=1))
    return (
        '"""The gate pruner\'s prior: the largest rise factor seen after each epoch.\n\n'
        f"Written by benchmarks/curves_export.py from {source} ({len(curves)} full curves of\n"
        f"{epochs} epochs, pruning off); do not edit by hand. Entry e - 1 is max over the curves\n"
        "of Local TPE(last epoch) / best Local TPE up to epoch e (search/gate_pruner.py).\n"
        '"""\n\n'
        f"PRIOR_EPOCHS = {epochs}\n\nPRIOR_RISE = (\n{lines}\n)\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", help="the study's SQLite file")
    parser.add_argument("out", help="curves JSON to write")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--prior", metavar="FILE", help="also write the prior module here")
    args = parser.parse_args()
    study = only_study(args.db)
    curves = curves_of(study, args.epochs)
    if not curves:
        print(f"{args.db}: no trial reported all {args.epochs} epochs", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out), json.dumps(
        {"study": study.study_name, "epochs": args.epochs, "curves": curves}, indent=1) + "\n")
    print(f"{len(curves)} curves of {args.epochs} epochs -> {args.out}")
    if args.prior:
        write_text_atomic(Path(args.prior), prior_module(curves, args.epochs, args.out))
        print(f"prior -> {args.prior}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
