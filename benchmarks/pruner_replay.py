"""Replay recorded learning curves through candidate pruners, in many random orders.

    python benchmarks/pruner_replay.py [--curves results/curves/round2_curves.json]
        [--orders 200] [--parallel 4] [--out results/pruner_replay.json]

Each order is a real Optuna study (in memory) with the candidate pruner. The curves' trials run
``--parallel`` at a time, as a worker with that many trials per GPU would: a trial first pays its
recorded start-up (compile, set-up, data: ``time_start_s``), then each epoch takes the rest of its
recorded wall time / epochs, and a trial reports its Local TPE after every epoch and asks
``should_prune`` before its last one (as ``search/objective.py`` does). A trial that finishes below
the gate ends PRUNED, one above it COMPLETE with its final Local TPE as the value (the curves have
no Stage 2). Per pruner the JSON says:

- ``epochs_share``: CIFAR-10 epochs trained / epochs of the unpruned study;
- ``seconds_share``: GPU seconds as a share of the unpruned study's: each trial's start-up (paid
  however early it is pruned) plus its epochs at its epoch time (a 257-token epoch costs ~8x);
- ``best_kept_share``: the share of orders in which the configuration with the best final
  Local TPE among those passing the gate trained to its end;
- ``passers_kept_share``: the share of gate-passing trials (over all orders) not pruned.

The gate pruner is replayed with a leave-one-out prior: the curve being judged is never among
those behind its prior, so the figures say how the rule does on a configuration it has not seen.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.atomic import write_text_atomic  # noqa: E402
from nkat_search.search.coordinator import build_pruner  # noqa: E402
from nkat_search.search.gate_pruner import GatePruner, largest_rises  # noqa: E402
from nkat_search.search.spec import parse_study_text  # noqa: E402

GATE = 0.60


class LeaveOneOutGate(GatePruner):
    """The gate pruner whose prior, for each trial, leaves that trial's own curve out."""

    def __init__(self, priors: list[tuple[float, ...]], pruner: GatePruner):
        # The left-out priors come from the curves, so they are read at the curves' length.
        super().__init__(pruner.gate, pruner.epochs, safety=pruner.safety, prior=(),
                         prior_epochs=pruner.epochs, min_curves=pruner.min_curves,
                         rank=pruner.rank)
        self.priors = priors

    def prune(self, study, trial):
        self.prior = self.priors[trial.user_attrs["curve"]]
        return super().prune(study, trial)


MEDIAN_SHORT = {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 5}
SHA = {"type": "successive_halving", "min_resource": 5, "reduction_factor": 3}
# Name -> the study file's ``pruner:`` mapping. "median 5/10" is what round2.yaml shipped before.
CANDIDATES = {
    "none": {"type": "none"},
    "median 5 startup / 10 warm-up (round2.yaml before)":
        {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 10, "interval_steps": 1},
    "median 2 startup / 5 warm-up": MEDIAN_SHORT,
    "percentile 75 (prunes the lowest quarter), 2 startup / 5 warm-up":
        {"type": "percentile", "percentile": 75.0, "n_startup_trials": 2, "n_warmup_steps": 5},
    "successive halving, min 5, factor 3": SHA,
    "successive halving, min 1, factor 4":
        {"type": "successive_halving", "min_resource": 1, "reduction_factor": 4},
    "hyperband, min 5, max 40, factor 3":
        {"type": "hyperband", "min_resource": 5, "max_resource": 40, "reduction_factor": 3},
    "gate, safety 1.0": {"type": "gate", "safety": 1.0},
    "gate, safety 1.1": {"type": "gate", "safety": 1.1},
    "gate, safety 1.0 + median 2/5": {"type": "gate", "safety": 1.0, "rank": MEDIAN_SHORT},
    "gate, safety 1.0 + successive halving 5/3": {"type": "gate", "safety": 1.0, "rank": SHA},
}


def pruner_factory(options: dict, epochs: int, priors):
    """A fresh pruner per study, built as a study file with ``options`` builds it."""
    spec = parse_study_text(yaml.safe_dump({
        "name": "replay", "n_trials": 1, "gate": {"local_tpe": GATE}, "pruner": options,
        "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0}},
        # The warm-up only has to fit the epochs (the recipe's 5 would not fit short curves).
        "fixed": {"epochs": epochs, "warmup": min(5, epochs)}}), file_name="replay.yaml")

    def make():
        pruner = build_pruner(spec)
        return LeaveOneOutGate(priors, pruner) if isinstance(pruner, GatePruner) else pruner
    return make


def replay(make_pruner, curves: list[dict], order: list[int], epochs: int,
           parallel: int) -> list[int]:
    """Epochs each curve trained (index = curve) in one study of ``order``, ``parallel`` at once."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner(),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    trained = [0] * len(curves)
    queue = list(order)
    events: list[tuple[float, int, int]] = []  # (time, tie-break, curve)
    running: dict[int, optuna.Trial] = {}
    clock, tick = 0.0, 0

    def start(now: float) -> None:
        nonlocal tick
        if not queue:
            return
        index = queue.pop(0)
        trial = study.ask()
        trial.set_user_attr("curve", index)
        running[index] = trial
        tick += 1
        heapq.heappush(events, (now + curves[index]["start_s"] + curves[index]["epoch_s"], tick,
                                index))

    for _ in range(parallel):
        start(clock)
    while events:
        clock, _, index = heapq.heappop(events)
        trial = running[index]
        trained[index] += 1
        epoch = trained[index]
        value = curves[index]["local_tpe"][epoch - 1]
        trial.report(value, epoch)
        if epoch < epochs and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif epoch == epochs:
            if value < GATE:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, value)
        else:
            tick += 1
            heapq.heappush(events, (clock + curves[index]["epoch_s"], tick, index))
            continue
        del running[index]
        start(clock)
    return trained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", default="results/curves/round2_curves.json")
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chosen", help="the candidate the study files use (marked chosen)")
    parser.add_argument("--out", default="results/pruner_replay.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    data = json.loads(Path(args.curves).read_text())
    epochs, curves = data["epochs"], data["curves"]
    for curve in curves:
        # Curves exported before time_start_s was recorded count no start-up.
        curve["start_s"] = curve.get("time_start_s", 0.0)
        curve["epoch_s"] = ((curve.get("time_trial_s") or epochs) - curve["start_s"]) / epochs
    full = [dict(enumerate(c["local_tpe"], start=1)) for c in curves]
    priors = [largest_rises(full[:i] + full[i + 1:], epochs) for i in range(len(curves))]
    passers = [i for i, c in enumerate(curves) if c["local_tpe"][-1] >= GATE]
    best = max(passers, key=lambda i: curves[i]["local_tpe"][-1]) if passers else None
    cost = [c["epoch_s"] for c in curves]
    start_cost = [c["start_s"] for c in curves]
    total_epochs = epochs * len(curves)
    total_seconds = sum(start_cost) + epochs * sum(cost)

    rng = random.Random(args.seed)
    orders = [rng.sample(range(len(curves)), len(curves)) for _ in range(args.orders)]
    rows = []
    for name, options in CANDIDATES.items():
        make = pruner_factory(options, epochs, priors)
        started = time.perf_counter()
        epochs_sum = seconds_sum = best_kept = passers_kept = 0
        for order in orders:
            trained = replay(make, curves, order, epochs, args.parallel)
            epochs_sum += sum(trained)
            seconds_sum += sum(s + t * c for t, c, s in zip(trained, cost, start_cost))
            best_kept += best is not None and trained[best] == epochs
            passers_kept += sum(trained[i] == epochs for i in passers)
        row = {
            "pruner": name,
            "epochs_share": round(epochs_sum / (total_epochs * len(orders)), 4),
            "seconds_share": round(seconds_sum / (total_seconds * len(orders)), 4),
            "best_kept_share": round(best_kept / len(orders), 4) if best is not None else None,
            "passers_kept_share": (round(passers_kept / (len(passers) * len(orders)), 4)
                                   if passers else None),
            "study_file_pruner": options,
            "chosen": name == args.chosen,
        }
        rows.append(row)
        print(f"{name:48s} epochs {row['epochs_share']:6.1%}  seconds {row['seconds_share']:6.1%}"
              f"  best kept {row['best_kept_share']}  passers kept {row['passers_kept_share']}"
              f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.chosen and not any(r["chosen"] for r in rows):
        print(f"--chosen {args.chosen!r} is not a candidate", file=sys.stderr)
        return 2
    result = {
        "curves": args.curves, "n_curves": len(curves), "epochs": epochs, "gate": GATE,
        "passing_curves": len(passers),
        "best_curve": None if best is None else curves[best]["trial"],
        "orders": args.orders, "parallel": args.parallel, "seed": args.seed,
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
