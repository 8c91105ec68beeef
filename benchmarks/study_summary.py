"""A whole study in figures: trials by outcome, epochs trained, wall clock, the best trial.

    python benchmarks/study_summary.py STUDY.db --device "one NVIDIA H200" \
        --windows results/round2/nkat-round2/windows.txt [--out results/round2_whole.json]

``windows.txt`` holds one line per device window as ``benchmarks/gpu_study_window.sh`` writes it
("up ended at HH:MM:SS after S s"), or, for a window whose machine was lost before up ended,
"machine lost at HH:MM:SS after S s" (``lost_window.py``); their seconds are summed into
``wall_minutes``. Pruned trials
are split by the rule that stopped them (from the reason the objective recorded). Epochs count
every CIFAR-10 epoch of every attempt, plus the Stage 2 epochs of complete trials (``epochs_trained``); the CIFAR-10
ones are also given alone (``cifar10_epochs_trained``), beside what the unpruned study would have
trained (``cifar10_epochs_unpruned`` = configurations x epochs). The complete trials' wall time
is split at the gate (``survivors_stage1_s``, ``survivors_stage2_s`` and their ratio): what Stage 2
costs a survivor. ``phase_s``: every attempt's seconds by phase (data, setup, compile, train,
eval, checkpoint), summed over trials that share the GPU (trial seconds, not wall clock).
``block_graph_repeats``: configurations whose Block graph (embed_dim, tokens,
top_k) an earlier configuration of the study already had, the ones that can load it from
Inductor's cache under ``compile_scope`` "blocks".
``by_tokens``: per tokens per image (the attention's row length), configurations, trials by
outcome and their trial seconds: where a study's time went by attention cost. ``top_complete``:
the best complete trials (``ranked``) with every metric the user's targets name and their
parameters.
``run_twice``: retries that trained again from epoch 0 (the checkpoint stayed on another
machine) and the trial seconds their interrupted originals had spent, which the study paid
twice. ``importances``: Optuna's default parameter importance (PED-ANOVA in Optuna 5) over
the complete trials, what ``export`` draws; ``trials_per_hour``: configurations over the summed
windows. ``rank_cuts_above_gate``: trials the rank rule ended at or above the gate, beside the
complete trials' Local TPE at the same epoch and how well it ranked their final Global TPE.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.atomic import write_text_atomic  # noqa: E402
from nkat_search.search.report import only_study  # noqa: E402
from nkat_search.search.trials import (  # noqa: E402
    TrialRecord,
    best,
    outcome,
    ranked,
    retries,
    retry_trials,
)
from nkat_search.train.model import tokens_per_image  # noqa: E402


def window_seconds(path: Path | None) -> list[float]:
    if path is None or not path.exists():
        return []
    line = r"(?:up ended|machine lost) at \S+ after (\d+) s"
    return [float(m.group(1)) for m in re.finditer(line, path.read_text())]


PHASE_TIMINGS = ("time_data_s", "time_setup_s", "time_compile_s", "time_train_s", "time_eval_s",
                 "time_checkpoint_s")


def block_graph_repeats(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Configurations (retries left out) whose (embed_dim, tokens, top_k) an earlier one had."""
    seen, repeats, retry_numbers = set(), 0, set(retries(trials).values())
    for trial in sorted(trials, key=lambda t: t.number):
        p = trial.params
        if "embed_dim" not in p or trial.number in retry_numbers:
            continue
        key = (p["embed_dim"], tokens_per_image(p["conv_stem"], p["patch_size"]), p["top_k"])
        repeats += key in seen
        seen.add(key)
    return repeats


def by_tokens(trials: list[optuna.trial.FrozenTrial]) -> dict[str, dict]:
    """Trials and trial seconds grouped by tokens per image (retries count as trials)."""
    groups: dict[int, dict] = {}
    retry_numbers = set(retries(trials).values())
    for trial in trials:
        p = trial.params
        if "conv_stem" not in p:
            continue
        group = groups.setdefault(tokens_per_image(p["conv_stem"], p["patch_size"]),
                                  {"configurations": 0, "trials": Counter(), "trial_s": 0.0})
        group["configurations"] += trial.number not in retry_numbers
        group["trials"][outcome(trial)] += 1
        group["trial_s"] += TrialRecord.of(trial).timings.get("time_trial_s", 0.0)
    return {str(tokens): {"configurations": g["configurations"],
                          "trials": dict(sorted(g["trials"].items())),
                          "trial_s": round(g["trial_s"], 1)}
            for tokens, g in sorted(groups.items())}


def top_complete(study: optuna.Study, n: int = 5) -> list[dict]:
    rows = []
    for entry in ranked(study)[:n]:
        record = TrialRecord.of(entry.trial)
        p = entry.trial.params
        rows.append({
            "trial": entry.trial.number, "feasible": entry.feasible,
            "architecture": f"{p.get('conv_stem')}/{p.get('patch_size')}/{p.get('embed_dim')}/"
                            f"{p.get('depth')}",
            "lambda": round(record.lam, 3) if record.lam is not None else None,
            "global_tpe": entry.trial.value, "local_tpe": record.local_tpe,
            "consistency": record.consistency, "robustness": record.robustness,
            "accuracy": {name: score.accuracy for name, score in record.datasets.items()},
            "missing_datasets": record.missing_datasets, "params": dict(p),
        })
    return rows


def importances(study: optuna.Study) -> dict[str, float] | None:
    """Optuna's default importance over the complete trials; None while it cannot rank them."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranked = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few complete trials
        return None
    return {name: round(value, 3) for name, value in ranked.items()}


def run_twice(trials: list[optuna.trial.FrozenTrial]) -> dict:
    """Retries that started again from epoch 0, and what their originals had cost."""
    by_number = {t.number: t for t in trials}
    count, seconds = 0, 0.0
    for original, retry in retry_trials(trials).items():
        record = TrialRecord.of(retry)
        if record.resumed_from_epoch == 0 and not record.resumed:
            count += 1
            seconds += TrialRecord.of(by_number[original]).timings.get("time_trial_s", 0.0)
    return {"retries_from_epoch_0": count, "trial_s": round(seconds, 1)}


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None for fewer than 3 pairs or a
    constant side. pandas ranks; scipy, which has spearmanr, is not a dependency."""
    if len(xs) < 3:
        return None
    rx, ry = (pd.Series(values).rank().to_numpy() for values in (xs, ys))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return round(float(np.corrcoef(rx, ry)[0, 1]), 3)


def rank_cuts_above_gate(study: optuna.Study) -> dict | None:
    """Trials the rank rule (not the gate) ended while their Local TPE stood at the gate or above,
    beside where the complete trials stood at the same epoch.

    What the successive-halving rung cost: a cut trial that stood below every complete trial
    that went on to win could not have been judged better there; ``spearman_vs_global_tpe``
    says how well that epoch's Local TPE ranked the complete trials' final Global TPE.
    """
    gate = study.user_attrs.get("gate")
    if gate is None:
        return None
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    cuts = []
    for trial in trials:
        if outcome(trial) != "pruned" or "gate pruner" in (TrialRecord.of(trial).reason or ""):
            continue
        if not trial.intermediate_values:
            continue
        epoch = max(trial.intermediate_values)
        value = trial.intermediate_values[epoch]
        if value >= gate:
            cuts.append({"trial": trial.number, "epoch": epoch, "local_tpe": round(value, 4)})
    at_epoch = {}
    for epoch in sorted({cut["epoch"] for cut in cuts}):
        pairs = [(t.intermediate_values[epoch], t.value, t.number) for t in complete
                 if epoch in t.intermediate_values]
        if not pairs:
            continue
        highest_cut = max(c["local_tpe"] for c in cuts if c["epoch"] == epoch)
        best_pair = max(pairs, key=lambda pair: pair[1])
        values = sorted(pair[0] for pair in pairs)
        at_epoch[str(epoch)] = {
            "complete_trials": len(pairs),
            "local_tpe_min": round(values[0], 4),
            "local_tpe_median": round(statistics.median(values), 4),
            "local_tpe_max": round(values[-1], 4),
            "complete_at_or_below_highest_cut": sum(v <= highest_cut for v in values),
            "best_trial": best_pair[2], "best_trial_local_tpe": round(best_pair[0], 4),
            "spearman_vs_global_tpe": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        }
    return {"gate": gate, "cuts": cuts, "complete_at_epoch": at_epoch}


def summary(study: optuna.Study, epochs: int) -> dict:
    trials = study.get_trials(deepcopy=False)
    kinds = Counter()
    epochs_all = cifar_epochs = 0
    # What a survivor's Stage 2 costs beside its Stage 1 (issue 21, item 4): wall seconds of the
    # complete trials, split at the gate (time_stage1_s; studies before it have no split).
    survivors_timed, stage1_s, stage2_s = 0, 0.0, 0.0
    phases = Counter()
    for trial in trials:
        record = TrialRecord.of(trial)
        phases.update({name[len("time_"):]: seconds for name, seconds in record.timings.items()
                       if name in PHASE_TIMINGS})
        kind = outcome(trial)
        if kind == "pruned":
            kind = "pruned_by_gate" if "gate pruner" in (record.reason or "") else "pruned_by_rank"
        kinds[kind] += 1
        cifar = max(trial.intermediate_values, default=0)
        if record.resumed_from_epoch:
            cifar -= record.resumed_from_epoch
        cifar_epochs += cifar
        epochs_all += cifar
        if kind == "complete":
            resumed = record.resumed
            epochs_all += sum(epochs - resumed.get(name, 0) for name in record.datasets
                              if name != "cifar10")
            timed = record.timings
            if "time_stage1_s" in timed and "time_trial_s" in timed:
                survivors_timed += 1
                stage1_s += timed["time_stage1_s"]
                stage2_s += timed["time_trial_s"] - timed["time_stage1_s"]
    configurations = len(trials) - len(retries(trials))
    top = best(study)
    return {
        "study": study.study_name,
        "trials": dict(sorted(kinds.items())),
        "configurations": configurations,
        "block_graph_repeats": block_graph_repeats(trials),
        "retries": len(retries(trials)),
        "run_twice": run_twice(trials),
        "epochs_trained": epochs_all,
        "cifar10_epochs_trained": cifar_epochs,
        "cifar10_epochs_unpruned": configurations * epochs,
        "best_trial": None if top is None else top.trial.number,
        "best_feasible": None if top is None else top.feasible,
        "best_global_tpe": None if top is None else top.trial.value,
        "best_params": None if top is None else top.trial.params,
        "complete_trials": sum(t.state == TrialState.COMPLETE for t in trials),
        "survivors_timed": survivors_timed,
        "survivors_stage1_s": round(stage1_s, 1),
        "survivors_stage2_s": round(stage2_s, 1),
        "stage2_over_stage1": round(stage2_s / stage1_s, 2) if stage1_s else None,
        "phase_s": {name: round(seconds, 1) for name, seconds in phases.items()},
        "by_tokens": by_tokens(trials),
        "top_complete": top_complete(study),
        "importances": importances(study),
        "rank_cuts_above_gate": rank_cuts_above_gate(study),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db")
    parser.add_argument("--device", required=True, help="the GPU, in words")
    parser.add_argument("--windows", type=Path, help="gpu_study_window.sh's windows.txt")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", help="JSON to write (default: print)")
    args = parser.parse_args()
    study = only_study(args.db)
    seconds = window_seconds(args.windows)
    result = {"device": args.device, "windows_s": seconds,
              "wall_minutes": round(sum(seconds) / 60, 2) if seconds else None,
              **summary(study, args.epochs)}
    if seconds:
        result["trials_per_hour"] = round(result["configurations"] / (sum(seconds) / 3600), 1)
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        write_text_atomic(Path(args.out), text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
