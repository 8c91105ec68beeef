"""A study's results section in Markdown, made from the files the study left (issue 23).

    python benchmarks/study_report.py --summary results/round2_whole.json \
        --stage2 results/round2/nkat-round2/stage2.json \
        [--baseline results/gpu/session3/stage2.json] [--target 0.7609] \
        [--out results/round2/nkat-round2/report.md]

Every number comes from the files named, none is typed in: ``study_summary.py``'s JSON (trials by
outcome, wall clock, the best five with their parameters, importances), the winner's Stage 2 JSON
(``nkat-search stage2 --config .../best.yaml --val_fraction 0``) and the baseline's. The user's
last result (0.53, ``USER_LAST_GLOBAL_TPE``) is the one figure from outside: MISSION.md's table.
``--target`` is the Global TPE the issue asks of this study's winner on the test splits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.atomic import write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The user's last Global TPE, from their report (MISSION.md, "Global TPE | 0.53 | >= 0.70").
USER_LAST_GLOBAL_TPE = 0.53
# Outcomes in the order a reader expects them; any other state the summary holds follows.
OUTCOMES = ("complete", "pruned_by_gate", "pruned_by_rank", "gate_failed", "failed",
            "interrupted")
ARCHITECTURE = ("conv_stem", "patch_size", "embed_dim", "depth")
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
                 "emnist": "EMNIST"}


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _param(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def outcome_lines(summary: dict) -> list[str]:
    trials = summary["trials"]
    names = [n for n in OUTCOMES if n in trials] + sorted(set(trials) - set(OUTCOMES))
    lines = ["| outcome | trial rows |", "| --- | --- |"]
    lines += [f"| {name.replace('_', ' ')} | {trials[name]} |" for name in names]
    lines.append(f"| **configurations** (a retry is its original's configuration) | "
                 f"**{summary['configurations']}** |")
    retried = summary.get("run_twice", {})
    lines += ["", f"- Retries: {summary.get('retries', 0)}; of them trained again from epoch 0: "
                  f"{retried.get('retries_from_epoch_0', 0)} "
                  f"({retried.get('trial_s', 0):,.1f} trial-seconds run twice)."]
    return lines


def clock_lines(summary: dict) -> list[str]:
    windows = summary.get("windows_s") or []
    if not windows:
        return ["- Wall clock: no window record."]
    parts = " + ".join(f"{s:,.0f} s" for s in windows)
    return [f"- Wall clock ({summary['device']}): {parts} = {summary['wall_minutes']:.1f} "
            f"minutes over {len(windows)} window(s), {summary.get('trials_per_hour')} "
            f"configurations per hour.",
            f"- Epochs: {summary['cifar10_epochs_trained']:,} CIFAR-10 epochs trained against "
            f"{summary['cifar10_epochs_unpruned']:,} unpruned "
            f"({summary['cifar10_epochs_trained'] / summary['cifar10_epochs_unpruned']:.0%}); "
            f"{summary['epochs_trained']:,} with Stage 2."]


def top_lines(summary: dict) -> list[str]:
    top = summary.get("top_complete") or []
    if not top:
        return ["No complete trial."]
    datasets = [d for d in DATASET_NAMES if any(d in row["accuracy"] for row in top)]
    searched = sorted({k for row in top for k in row.get("params", {})} - set(ARCHITECTURE))
    head = (["trial", "stem/patch/embed/depth", "lambda", "Global TPE", "Local TPE",
             "Consistency", "Robustness"] + [DATASET_NAMES[d] for d in datasets] + searched)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in top:
        cells = [str(row["trial"]) + ("" if row["feasible"] else " (infeasible)"),
                 row["architecture"], _num(row["lambda"], 2), _num(row["global_tpe"]),
                 _num(row["local_tpe"]), _num(row["consistency"], 3), _num(row["robustness"], 3)]
        cells += [_pct(row["accuracy"].get(d)) for d in datasets]
        cells += [_param(row.get("params", {}).get(k, "-")) for k in searched]
        lines.append("| " + " | ".join(cells) + " |")
    missing = sorted({m for row in top for m in row.get("missing_datasets") or []})
    if missing:
        lines += ["", "Accuracies as the search scored them, on the held-out slices of the "
                      "train splits (`val_fraction`); missing on this machine, so outside the "
                      "aggregates: " + ", ".join(DATASET_NAMES.get(m, m) for m in missing) + "."]
    return lines


def importance_lines(summary: dict) -> list[str]:
    ranked = summary.get("importances")
    if not ranked:
        return ["- Importances: too few complete trials to rank."]
    text = ", ".join(f"{name} {value:.2f}" for name, value in ranked.items())
    return [f"- Which parameters mattered (Optuna's default importance over the "
            f"{summary['complete_trials']} complete trials): {text}."]


def rank_cut_lines(summary: dict) -> list[str]:
    """What the successive-halving rung cost: trials it ended above the gate (issue 23)."""
    cuts = summary.get("rank_cuts_above_gate")
    if cuts is None:
        return []
    gate = _num(cuts["gate"], 2)
    if not cuts["cuts"]:
        return [f"- The rank rule ended no trial at or above the {gate} gate.", ""]
    listed = ", ".join(f"{c['trial']} ({_num(c['local_tpe'])}, epoch {c['epoch']})"
                       for c in cuts["cuts"])
    lines = [f"- The rank rule (successive halving), not the gate, ended {len(cuts['cuts'])} "
             f"trial(s) at or above the {gate} gate: {listed}."]
    for epoch, at in cuts["complete_at_epoch"].items():
        rho = at["spearman_vs_global_tpe"]
        lines.append(
            f"- At epoch {epoch} the {at['complete_trials']} complete trials stood at "
            f"{_num(at['local_tpe_min'])}-{_num(at['local_tpe_max'])} (median "
            f"{_num(at['local_tpe_median'])}), {at['complete_at_or_below_highest_cut']} of them "
            f"at or below the highest cut; the winner, trial {at['best_trial']}, at "
            f"{_num(at['best_trial_local_tpe'])}. Epoch {epoch}'s Local TPE ranks the complete "
            f"trials' final Global TPE with Spearman's rho "
            f"{'n/a' if rho is None else f'{rho:.3f}'}.")
    return lines + [""]


def stage2_lines(winner: dict, baseline: dict | None, target: float | None) -> list[str]:
    tables = [("winner", winner["table"])] + ([("baseline", baseline["table"])] if baseline else [])
    head = ["", *(name for name, _ in tables), "target", "the user's last result"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = {name: {r["dataset"]: r for r in table["rows"]} for name, table in tables}
    for dataset, label in DATASET_NAMES.items():
        cells = []
        for name, table in tables:
            row = rows[name].get(dataset)
            cells.append("missing" if row is None else
                         f"{_pct(row['accuracy'])} (TPE {_num(row['tpe'])})")
        goal = "Local TPE >= 0.60" if dataset == "cifar10" else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {goal} | |")
    checks = winner["table"]["checks"]
    for metric, label in (("global_tpe", "Global TPE"), ("consistency", "Consistency"),
                          ("robustness", "Robustness")):
        cells = [_num(table["checks"][metric]["value"]) for _, table in tables]
        last = f"{USER_LAST_GLOBAL_TPE:.2f}" if metric == "global_tpe" else ""
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | >= {checks[metric]['target']:.2f} | {last} |")
    failed = [name for name, c in checks.items() if not c["passed"]]
    verdict = ("every one met" if not failed else "not met: " + ", ".join(failed))
    lines += ["", f"- The user's targets on the winner ({', '.join(checks)}): {verdict}."]
    if target is not None:
        value = checks["global_tpe"]["value"]
        lines.append(f"- This study's target, Global TPE >= {target:.4f}: "
                     f"{'met' if value >= target else 'NOT met'} ({value:.4f}).")
    missing = winner["table"].get("missing") or []
    if missing:
        lines.append("- Missing here, outside the aggregates: "
                     + ", ".join(DATASET_NAMES.get(m, m) for m in missing) + ".")
    return lines


def report(summary: dict, winner: dict | None, baseline: dict | None,
           target: float | None) -> str:
    lines = [f"### `{summary['study']}`: {summary['configurations']} configurations", "",
             *outcome_lines(summary), *clock_lines(summary), "",
             f"Best five complete trials (best: trial {summary['best_trial']}, "
             f"{'feasible' if summary['best_feasible'] else 'infeasible'}):", "",
             *top_lines(summary), "", *importance_lines(summary), "",
             *rank_cut_lines(summary)]
    if winner is None:
        lines.append("Stage 2 of the winner on the test splits: not run yet.")
    else:
        lines += ["The winner re-trained on the full train splits, scored on the official "
                  "test splits (Stage 2, `--val_fraction 0`), beside the baseline:", "",
                  *stage2_lines(winner, baseline, target)]
    return "\n".join(lines) + "\n"


def _load(path: Path | None, what: str) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"study_report: {what} {path} not found; make it first (see --help)")
    except json.JSONDecodeError as err:
        raise SystemExit(f"study_report: {what} {path} is not JSON ({err})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, required=True,
                        help="study_summary.py's JSON for the study")
    parser.add_argument("--stage2", type=Path, help="the winner's stage2.json (test splits)")
    parser.add_argument("--baseline", type=Path,
                        default=ROOT / "results" / "gpu" / "session3" / "stage2.json",
                        help="the baseline's stage2.json (default: session 3's, 0.7609)")
    parser.add_argument("--target", type=float, help="the Global TPE asked of the winner")
    parser.add_argument("--out", type=Path, help="Markdown to write (default: print)")
    args = parser.parse_args(argv)
    text = report(_load(args.summary, "summary"), _load(args.stage2, "Stage 2 JSON"),
                  _load(args.baseline, "baseline Stage 2 JSON"), args.target)
    if args.out:
        write_text_atomic(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
