"""One trial's record: what the objective writes into an Optuna trial, and how every reader reads it.

The objective writes a trial through ``write``; ``status``, ``study show``, ``export``, ``up``'s
live line and final table, the worker's line per trial and the dashboard read it back through
``TrialRecord.of``, ``outcome``, ``feasible`` and ``best``. So they cannot disagree about what a
trial was or which one is best.

Attributes are flat, short values where a person reads them (optuna-dashboard prints every user
attribute as one line of text): per-dataset results are ``accuracy_<dataset>``,
``lambda_<dataset>`` and ``tpe_<dataset>``, not one nested JSON blob. The one long value, the
trained ``config`` (about 1,500 characters of JSON; each searched value is already a param), is
a system attribute (``CONFIG_ATTR``), so ``optuna trials`` and the dashboard's attribute list stay
readable; the dashboard shows it in the trial's note (``dashboard_storage.py``).

The best trial is Optuna's ``study.best_trial``: the best complete trial that meets every
constraint (each constraint value <= 0; here Consistency and Robustness, see ``objective.py``).
The one fallback: when no complete trial is feasible, the best complete trial by value, marked
``feasible=False`` wherever it is shown or exported, so a young study still shows a result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from nkat_search.search import optuna_private
from nkat_search.search.spec import STAGE1_DATASET

# What a finished trial was. A gate failure and a pruned trial are both Optuna PRUNED; an
# interrupted trial (SIGTERM / Ctrl-C) is FAIL with a retry queued, not a crash.
OUTCOMES = ("complete", "pruned", "gate_failed", "failed", "interrupted")
# Trials not finished yet.
LIVE = ("running", "waiting")
# The study's value, named for Optuna's plots and optuna-dashboard (``Study.set_metric_names``).
METRIC_NAME = "Global TPE"
# Prefix of the ``error`` of an interrupted trial (objective.py writes it, worker.py requeues).
INTERRUPTED = "interrupted"
# A trial that ran out of GPU memory is retried (up to heartbeat.max_retry): with several trials
# per GPU the memory may have been a neighbour's, which is no fault of the configuration.
OUT_OF_MEMORY = "out of GPU memory"
# A checkpoint the host could not write (a full disk): queued again at no retry cost, and the
# worker stops (worker.py), since every trial it takes would meet the same disk.
CHECKPOINT_NOT_WRITTEN = "checkpoint not written"
# Timing attributes (``train.loop.Timings.as_attrs``, the whole objective's wall time and its
# part up to the gate).
TIMING_KEYS = ("time_data_s", "time_setup_s", "time_compile_s", "time_train_s", "time_eval_s",
               "time_checkpoint_s", "time_trial_s", "time_stage1_s", "checkpoints",
               "train_images")
_DATASET_FIELDS = (("accuracy", "accuracy"), ("lam", "lambda"), ("tpe", "tpe"))
RESUMED_PREFIX = "resumed_from_epoch_"
# The trial's whole config, a system attribute (see the module docstring).
CONFIG_ATTR = "config"
# What the pruner and the gate read each epoch (the intermediate values), by name.
INTERMEDIATE_NAME = "Local TPE@CIFAR10"


@dataclass
class DatasetScore:
    """One dataset's row of the Stage 2 table: EMA accuracy on the eval split, lambda, TPE."""

    accuracy: float
    lam: float
    tpe: float

    def to_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "lambda": self.lam, "tpe": self.tpe}


@dataclass
class TrialRecord:
    """Every user attribute nkat-search writes into a trial (attribute names in comments).

    ``stage``, ``dataset`` and ``epoch`` say where a trial is while it runs (and where it stopped):
    stage 1 is CIFAR-10 with the pruner and the gate, stage 2 the other datasets; ``epoch`` counts
    the finished epochs of that dataset's run.
    """

    outcome: str | None = None            # one of OUTCOMES, set when the trial ends
    config: dict | None = None            # the flat RunConfig.to_dict() that was trained
    local_tpe: float | None = None        # Local TPE@CIFAR10, last epoch (the gate's number)
    global_tpe: float | None = None       # the study's value, for complete trials
    consistency: float | None = None
    robustness: float | None = None
    feasible: bool | None = None          # every constraint met (pruned / gate-failed: False)
    datasets: dict[str, DatasetScore] = field(default_factory=dict)  # accuracy_/lambda_/tpe_<name>
    missing_datasets: list[str] = field(default_factory=list)  # not found: not in Global TPE
    reason: str | None = None             # why it stopped, in words (pruner, gate)
    error: str | None = None              # failed and interrupted trials
    worker: str | None = None             # host:pid:device
    resumed_from_epoch: int | None = None  # a retry that continued a checkpoint (CIFAR-10)
    resumed: dict[str, int] = field(default_factory=dict)  # resumed_from_epoch_<name>: Stage 2
    retry_of: int | None = None           # the original trial of a retry chain
    compile_scope: str | None = None      # the worker's --compile-scope (trials that compile)
    stage: int | None = None              # 1 or 2
    dataset: str | None = None
    epoch: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # TIMING_KEYS, flat

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TrialRecord:
        """The record of a trial's user attributes (older studies' nested ``datasets`` too)."""
        plain = {f.name for f in fields(cls)} - {"datasets", "timings", "missing_datasets",
                                                 "resumed"}
        record = cls(**{name: attrs[name] for name in plain if name in attrs})
        record.missing_datasets = list(attrs.get("missing_datasets") or [])
        record.resumed = {key[len(RESUMED_PREFIX):]: value for key, value in attrs.items()
                          if key.startswith(RESUMED_PREFIX)}
        record.timings = {key: attrs[key] for key in TIMING_KEYS if key in attrs}
        names = {key.split("_", 1)[1] for key in attrs if key.startswith("tpe_")}
        for name in sorted(names):
            values = [attrs.get(f"{attr}_{name}") for _, attr in _DATASET_FIELDS]
            if None not in values:
                record.datasets[name] = DatasetScore(*values)
        for name, row in (attrs.get("datasets") or {}).items():  # written before flat attributes
            record.datasets.setdefault(name, DatasetScore(row["accuracy"], row["lambda"],
                                                          row["tpe"]))
        return record

    @classmethod
    def of(cls, trial) -> TrialRecord:
        record = cls.from_attrs(trial.user_attrs)
        config = trial.system_attrs.get(CONFIG_ATTR)
        if config is not None:  # trials written before it moved keep it as a user attribute
            record.config = config
        return record

    @property
    def lam(self) -> float | None:
        """lambda of the CIFAR-10 model (the other datasets differ only by channels and classes)."""
        score = self.datasets.get(STAGE1_DATASET)
        return score.lam if score else None

    @property
    def cifar10_accuracy(self) -> float | None:
        score = self.datasets.get(STAGE1_DATASET)
        return score.accuracy if score else None


def attrs_of(**values: Any) -> dict[str, Any]:
    """The user attributes for some fields of ``TrialRecord`` (None values are left out)."""
    known = {f.name for f in fields(TrialRecord)}
    attrs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise TypeError(f"{name} is not a TrialRecord field")
        if value is None:
            continue
        if name == "datasets":
            for dataset, score in value.items():
                for attr_field, attr in _DATASET_FIELDS:
                    attrs[f"{attr}_{dataset}"] = getattr(score, attr_field)
        elif name == "resumed":
            attrs.update({f"{RESUMED_PREFIX}{dataset}": epoch for dataset, epoch in value.items()})
        elif name == "timings":
            unknown = set(value) - set(TIMING_KEYS)
            if unknown:
                raise TypeError(f"unknown timing attributes {sorted(unknown)}")
            attrs.update(value)
        else:
            attrs[name] = value
    return attrs


def write(trial, **values: Any) -> None:
    """Set fields of the trial's record (one storage write per attribute); ``config`` goes to
    the system attribute ``CONFIG_ATTR``."""
    config = values.pop("config", None)
    if config is not None:
        # Trial.set_system_attr is deprecated; the storage call is what it did.
        write_by_id(trial.storage, optuna_private.trial_id(trial), config=config)
    for key, value in attrs_of(**values).items():
        trial.set_user_attr(key, value)  # the live trial's own copy of its attributes too


def write_by_id(storage, trial_id: int, **values: Any) -> None:
    """``write`` for a trial known by its storage id (another worker's, found dead)."""
    config = values.pop("config", None)
    if config is not None:
        storage.set_trial_system_attr(trial_id, CONFIG_ATTR, config)
    for key, value in attrs_of(**values).items():
        storage.set_trial_user_attr(trial_id, key, value)


def outcome(trial: FrozenTrial) -> str:
    """One of OUTCOMES or LIVE for a trial, from its state and what the objective wrote."""
    state = trial.state
    attrs = trial.user_attrs
    if state == TrialState.COMPLETE:
        return "complete"
    if state == TrialState.PRUNED:
        return "gate_failed" if attrs.get("outcome") == "gate_failed" else "pruned"
    if state == TrialState.FAIL:
        return "interrupted" if str(attrs.get("error", "")).startswith(INTERRUPTED) else "failed"
    if state == TrialState.RUNNING:
        return "running"
    return "waiting"


def feasible(trial: FrozenTrial) -> bool | None:
    """Optuna's feasibility: every constraint value <= 0. None while a trial has not finished.

    A trial that never reached Stage 2 has no Global TPE to be a solution with; the objective
    gives it violated constraints, so it is infeasible here as it is for TPE.
    """
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return None
    if trial.state != TrialState.COMPLETE and not trial.constraints:
        return False
    return all(value <= 0.0 for value in trial.constraints.values())


def violations(trial: FrozenTrial) -> dict[str, tuple[float, float]]:
    """``{name: (measured, target)}`` of the constraints a complete trial misses.

    The objective sets each constraint to ``target - measured`` (a minimum), so the target is
    the measured value plus the constraint value.
    """
    record = TrialRecord.of(trial)
    missed = {}
    for name, value in trial.constraints.items():
        measured = getattr(record, name, None)
        if value > 0 and isinstance(measured, (int, float)):
            missed[name] = (measured, measured + value)
    return missed


@dataclass
class Best:
    trial: FrozenTrial
    feasible: bool  # False only in the fallback: no complete trial meets the constraints


def best_of(trials: Iterable[FrozenTrial], maximize: bool = True) -> Best | None:
    """Optuna's best-trial rule over ``trials`` (see the module docstring), with the fallback.

    Same as ``Study.best_trial``: among complete trials, the best value among the feasible ones;
    ties go to the earlier trial. None when nothing has completed.
    """
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    ok = [t for t in complete if feasible(t)]
    pool = ok or complete
    sign = -1.0 if maximize else 1.0
    top = min(pool, key=lambda t: (sign * t.value, t.number))
    return Best(top, feasible=bool(ok))


def best(study) -> Best | None:
    """The study's best trial by Optuna's own rule (``study.best_trial``), or the fallback."""
    return best_of(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                   maximizes(study))


def ranked(study) -> list[Best]:
    """Complete trials, best first: ``best(study)``, then feasible ones by value, then the rest."""
    maximize = maximizes(study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None]
    sign = -1.0 if maximize else 1.0
    order = sorted(complete, key=lambda t: (not feasible(t), sign * t.value, t.number))
    return [Best(t, bool(feasible(t))) for t in order]


def maximizes(study) -> bool:
    return study.direction == optuna.study.StudyDirection.MAXIMIZE


def retry_trials(trials: Iterable[FrozenTrial]) -> dict[int, FrozenTrial]:
    """``{trial number: the retry that continues it}`` (Optuna's ``failed_trial`` link)."""
    found = {}
    for trial in trials:
        original = trial.system_attrs.get("failed_trial")
        if original is not None:
            found[original] = trial
    return found


def retries(trials: Iterable[FrozenTrial]) -> dict[int, int]:
    """``{trial number: number of the retry that continues it}``."""
    return {original: retry.number for original, retry in retry_trials(trials).items()}


def lost_configurations(trials: Iterable[FrozenTrial]) -> list[dict]:
    """Configurations with no result: every attempt ended FAIL and none is queued or running.

    One entry per original trial: ``{"trial", "attempts", "last_trial", "error"}``. These are
    what a study lost: a configuration that kept crashing, or whose retries were spent.
    """
    chains: dict[int, list] = {}
    for trial in trials:
        chains.setdefault(trial.system_attrs.get("failed_trial", trial.number), []).append(trial)
    lost = []
    for original, attempts in sorted(chains.items()):
        if all(t.state == TrialState.FAIL for t in attempts):
            last = max(attempts, key=lambda t: t.number)
            lost.append({"trial": original, "attempts": len(attempts), "last_trial": last.number,
                         "error": last.user_attrs.get("error") or "no error recorded"})
    return lost


def stop_reason(trial: FrozenTrial, retry: FrozenTrial | None = None) -> str:
    """Why a trial ended where it did, in words; '' for a feasible complete or a live trial.

    ``retry`` (the trial that continues it, ``retry_trials``) also says whether the retry really
    continued the checkpoint: it is on the host that wrote it only, so a retry on another
    machine trains again from epoch 0, and the words should not promise a resume.
    """
    record = TrialRecord.of(trial)
    kind = outcome(trial)
    if kind == "complete":
        missed = violations(trial)
        if missed:
            return "infeasible: " + ", ".join(f"{name} {measured:.2f} < {target:.2f}"
                                              for name, (measured, target) in missed.items())
        return ""
    if kind in ("pruned", "gate_failed"):
        if record.reason:
            return record.reason
        return f"pruned at epoch {trial.last_step}" if trial.last_step is not None else "pruned"
    if kind == "interrupted":
        where = interrupted_where(record)
        if retry is None:
            return f"interrupted {where}; no retry queued (heartbeat.max_retry reached)"
        return f"interrupted {where}; {retry_words(retry)}"
    if kind == "failed":
        if record.error:
            return str(record.error).strip().splitlines()[-1]
        if retry is not None:
            return f"its worker stopped (heartbeat lost); retried as trial {retry.number}"
        return "its worker stopped (heartbeat lost)"
    return ""


def retry_words(retry: FrozenTrial) -> str:
    """``retried as trial 25, ...``: where the retry started, once its record says (after its
    Stage 1), else what it will try."""
    retried_by, record = retry.number, TrialRecord.of(retry)
    if record.resumed_from_epoch is None:
        return f"retried as trial {retried_by} (from its checkpoint, where that host has it)"
    if record.resumed_from_epoch or record.resumed:
        epochs = ", ".join(f"{name} epoch {epoch}" for name, epoch in
                           {STAGE1_DATASET: record.resumed_from_epoch, **record.resumed}.items()
                           if epoch)
        return f"retried as trial {retried_by}, which resumed from its checkpoint ({epochs})"
    return (f"retried as trial {retried_by}, which trained again from epoch 0 (no checkpoint on "
            "its host)")


def interrupted_where(record: TrialRecord) -> str:
    """``in stage 1 (cifar10), in epoch 2 at step 13 of 32``: where an interrupted trial stopped.

    The error is the objective's ``interrupted: stopped <where the trainer stopped>, ...``.
    """
    detail = str(record.error or "")[len(INTERRUPTED):].lstrip(": ")
    detail = detail.split(", checkpoint kept")[0].removeprefix("stopped ")
    stage = f"in stage {record.stage} ({record.dataset})" if record.stage is not None else ""
    return ", ".join(part for part in (stage, detail) if part)
