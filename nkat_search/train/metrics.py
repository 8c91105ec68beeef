"""The project's parameter-efficiency metrics, exactly as the user defines them (MISSION.md sec. 1).

All functions are pure and take plain floats; lambda is trainable parameters / 1e6.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# The user's targets for the whole evaluation and per dataset (accuracy, TPE).
TARGETS = {"global_tpe": 0.70, "consistency": 0.80, "robustness": 0.75, "local_tpe_cifar10": 0.60}
DATASET_TARGETS = {
    "mnist": {"accuracy": 0.91, "tpe": 0.69},
    "fashion_mnist": {"accuracy": 0.87, "tpe": 0.67},
    "emnist": {"accuracy": 0.75, "tpe": 0.60},
    "cifar10": {"accuracy": 0.60, "tpe": 0.45},
}
STAGE2_DATASETS = ("mnist", "fashion_mnist", "emnist", "cifar10")


def param_lambda(parameters: int) -> float:
    """lambda = trainable parameters / 1e6."""
    return parameters / 1e6


def tpe(accuracy: float, lam: float) -> float:
    """TPE = accuracy / log10(1 + lambda), accuracy in 0..1."""
    if lam <= 0:
        raise ValueError(f"lambda must be > 0, got {lam}")
    return accuracy / math.log10(1.0 + lam)


def accuracy_for_tpe(target_tpe: float, lam: float) -> float:
    """The accuracy that reaches ``target_tpe`` at ``lam``: target * log10(1 + lambda)."""
    return target_tpe * math.log10(1.0 + lam)


def global_tpe(accuracies: list[float], lambdas: list[float]) -> float:
    """Global TPE = mean(accuracy_i) / log10(1 + mean(lambda_i))."""
    _same_nonempty(accuracies, lambdas)
    return _mean(accuracies) / math.log10(1.0 + _mean(lambdas))


def consistency(tpes: list[float]) -> float:
    """Consistency = 1 - std(TPE_i) / mean(TPE_i), population std."""
    mean = _mean(tpes)
    std = math.sqrt(sum((t - mean) ** 2 for t in tpes) / len(tpes))
    return 1.0 - std / mean


def robustness(tpes: list[float]) -> float:
    """Robustness = min(TPE_i) / mean(TPE_i)."""
    return min(tpes) / _mean(tpes)


@dataclass
class DatasetRow:
    dataset: str
    accuracy: float
    lam: float
    tpe: float
    accuracy_target: float | None
    tpe_target: float | None
    passed: bool | None  # None where the user set no target for this dataset


@dataclass
class Stage2Table:
    """The user's Stage 2 table: per-dataset rows and the aggregate metrics with pass/fail."""

    rows: list[DatasetRow]
    global_tpe: float
    consistency: float
    robustness: float
    missing: list[str] = field(default_factory=list)
    checks: dict[str, dict[str, float | bool]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values()) and not self.missing

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def to_markdown(self) -> str:
        lines = ["| dataset | accuracy | lambda | TPE | target acc / TPE | pass |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            target = (f">= {r.accuracy_target:.2f} / >= {r.tpe_target:.2f}"
                      if r.accuracy_target is not None else "-")
            verdict = "-" if r.passed is None else ("yes" if r.passed else "NO")
            lines.append(f"| {r.dataset} | {r.accuracy:.4f} | {r.lam:.4f} | {r.tpe:.4f} | "
                         f"{target} | {verdict} |")
        for name in self.missing:
            lines.append(f"| {name} | missing | - | - | - | NO |")
        lines += ["", "| metric | value | target | pass |", "| --- | --- | --- | --- |"]
        for name, c in self.checks.items():
            lines.append(f"| {name} | {c['value']:.4f} | >= {c['target']:.2f} | "
                         f"{'yes' if c['passed'] else 'NO'} |")
        if self.missing:
            lines += ["", f"Missing datasets (not in the aggregates): {', '.join(self.missing)}."]
        return "\n".join(lines)


def stage2_table(results: dict[str, tuple[float, float]], missing: list[str] | None = None) -> Stage2Table:
    """Turn ``{dataset: (accuracy, lambda)}`` into the Stage 2 table with pass/fail.

    Aggregates are over the datasets present; ``missing`` names those that could not be run, so a
    table over three datasets never passes for four.
    """
    if not results:
        raise ValueError("stage2_table needs at least one dataset result")
    rows = []
    for name, (acc, lam) in results.items():
        target = DATASET_TARGETS.get(name)
        value = tpe(acc, lam)
        passed = None if target is None else (acc >= target["accuracy"] and value >= target["tpe"])
        rows.append(DatasetRow(name, acc, lam, value, target and target["accuracy"],
                               target and target["tpe"], passed))
    accs = [r.accuracy for r in rows]
    lams = [r.lam for r in rows]
    tpes = [r.tpe for r in rows]
    table = Stage2Table(rows, global_tpe(accs, lams), consistency(tpes), robustness(tpes),
                        sorted(missing or []))
    table.checks = {
        name: {"value": value, "target": TARGETS[name], "passed": value >= TARGETS[name]}
        for name, value in (("global_tpe", table.global_tpe), ("consistency", table.consistency),
                            ("robustness", table.robustness))
    }
    if "cifar10" in results:
        local = next(r.tpe for r in rows if r.dataset == "cifar10")
        table.checks["local_tpe_cifar10"] = {"value": local, "target": TARGETS["local_tpe_cifar10"],
                                             "passed": local >= TARGETS["local_tpe_cifar10"]}
    return table


def _mean(values: list[float]) -> float:
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


def _same_nonempty(a: list[float], b: list[float]) -> None:
    if not a or len(a) != len(b):
        raise ValueError(f"need equally long non-empty lists, got {len(a)} and {len(b)}")
