"""Dead workers' trials: failed with the reason written, then queued again by the retry policy.

Optuna's heartbeat marks a running trial stale when its worker stops beating for ``grace_period``
seconds; the next worker that asks for a trial fails it (``fail_stale_trials``, which also writes
why), and ``RetryStaleTrial`` queues a copy of it (same parameters, linked to the original) that
any worker then picks up. Faults count against ``heartbeat.max_retry``; polite stops do not.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nkat_search.search import optuna_private
from nkat_search.search import trials as trial_record
from nkat_search.search.resilient_storage import ResilientRDBStorage

# System attr of a queued retry: the faults (not polite stops) in its chain so far.
FAULTS_ATTR = "retry_faults"


class RetryStaleTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback, with ``max_retry`` counting faults instead of attempts.

    Optuna counts every attempt of a chain (``retry_history``) against ``max_retry``. Here a copy
    queued after a *polite stop* (SIGTERM, Ctrl-C, ``up`` stopping, a storage outage the worker
    survived) does not count: it is the same configuration resumed, and two stops must not drop
    it. Faults do count (a worker that went silent, out of GPU memory): the copy carries the
    chain's fault count in the system attr ``retry_faults``. Chains queued before this rule have
    no such attr and count each attempt, as Optuna did.

    The copy starts clean: the dead run's ``outcome`` and ``error`` describe the crash, not the
    retry, and the objective sets every attribute again. Parameters, the link to the original
    (``failed_trial``, read by ``retried_trial_number``) and the intermediate values are kept.
    """

    def __init__(self, max_retry: int | None = None, inherit_intermediate_values: bool = True):
        with warnings.catch_warnings():  # Optuna calls the callback experimental, every time
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry,
                             inherit_intermediate_values=inherit_intermediate_values)
        # Kept here, not read back from the base class's private attributes: ``__call__`` below
        # replaces the base's, so these two are all that is used of it.
        self.max_retry = max_retry
        self.inherit_intermediate_values = inherit_intermediate_values

    def __call__(self, study, trial) -> None:
        """The heartbeat's callback: a silent worker is a fault."""
        self.requeue(study, trial, counted=True)

    @staticmethod
    def faults(trial) -> int:
        """Faults in ``trial``'s chain before ``trial`` itself ended."""
        attrs = trial.system_attrs
        return int(attrs.get(FAULTS_ATTR, len(attrs.get("retry_history", []))))

    def would_retry(self, trial, counted: bool = True) -> bool:
        return not counted or self.max_retry is None or self.faults(trial) + 1 <= self.max_retry

    def requeue(self, study, trial, counted: bool = True) -> int | None:
        """Queue a copy of the FAIL ``trial``; its number, or None when the retries are spent."""
        if not self.would_retry(trial, counted):
            return None
        trial = copy.deepcopy(trial)
        system_attrs = {"failed_trial": trial.number, **trial.system_attrs}
        system_attrs["retry_history"] = [*system_attrs.get("retry_history", []), trial.number]
        system_attrs[FAULTS_ATTR] = self.faults(trial) + (1 if counted else 0)
        template = optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={}, system_attrs=system_attrs,
            intermediate_values=trial.intermediate_values if self.inherit_intermediate_values
            else None)
        # study.add_trial, minus its return value of None: the caller prints the copy's number.
        storage = optuna_private.study_storage(study)
        trial_id = storage.create_new_trial(optuna_private.study_id(study), template_trial=template)
        return storage.get_trial_number_from_id(trial_id)


def retried_trial_number(trial) -> int | None:
    """The number of the first trial of a retry chain, or None when ``trial`` is no retry.

    Takes a ``FrozenTrial`` or a live ``Trial`` (which, since Optuna 5, no longer exposes its
    system attrs; the storage still has them).
    """
    if isinstance(trial, optuna.trial.FrozenTrial):
        system_attrs = trial.system_attrs
    else:
        system_attrs = trial.storage.get_trial_system_attrs(optuna_private.trial_id(trial))
    return system_attrs.get("failed_trial")


def original_number(trial) -> int:
    """The number of the first trial of ``trial``'s retry chain (its own if it is no retry)."""
    original = retried_trial_number(trial)
    return trial.number if original is None else original


def trial_dir(checkpoint_root: str | Path, study_name: str, trial) -> Path:
    """The trial's checkpoint folder, shared by every retry of the same original trial."""
    return Path(checkpoint_root) / study_name / f"trial-{original_number(trial)}"


def fail_stale_trials(study) -> list[int]:
    """Dead workers' RUNNING trials -> FAIL with the reason written, then their retries queued.

    Optuna's ``fail_stale_trials`` is the model; this one differs in three ways. It writes
    ``outcome`` and ``error`` before the state changes (a FAIL trial takes no more attributes), so
    ``status`` can say why. It also fails RUNNING trials that never beat (see
    ``ResilientRDBStorage``). And it judges nobody until this process has had the storage for a
    grace period: after an outage every heartbeat is old, and live workers need that long to beat
    again. Call it under the ``StudyLock`` so that two workers never fail the same trial.
    """
    storage = optuna_private.study_storage(study)
    rdb = optuna_private.backend(storage)
    interval = rdb.get_heartbeat_interval()
    if interval is None:
        return []
    grace = rdb.grace_period or 2 * interval
    health = getattr(rdb, "health", None)
    if health is not None and health.up_for() < grace:
        return []
    study_id = optuna_private.study_id(study)
    stale = list(optuna_private.stale_trial_ids(rdb, study_id))
    if isinstance(rdb, ResilientRDBStorage):
        stale += [i for i in rdb.beatless_stale_ids(study_id) if i not in stale]
    callback = rdb.get_heartbeat_stale_trial_callback()
    failed = []
    for trial_id in stale:
        trial = storage.get_trial(trial_id)
        if trial.state != TrialState.RUNNING:
            continue
        retry = callback is not None and (not isinstance(callback, RetryStaleTrial)
                                          or callback.would_retry(trial))
        note = "retry queued" if retry else _spent(callback, trial)
        who = trial.user_attrs.get("worker", "its worker")
        error = (f"worker lost: no heartbeat from {who} for over {grace} s (killed, or cut off "
                 f"from the storage); {note}")
        try:
            trial_record.write_by_id(storage, trial_id, outcome="failed", error=error)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker (or another) finished it first
        failed.append(trial_id)
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))
    return failed


def _spent(callback, trial) -> str:
    if callback is None:
        return "not retried (no retry callback)"
    faults = RetryStaleTrial.faults(trial) + 1
    return (f"not retried: retries spent ({faults} faults, heartbeat.max_retry "
            f"{callback.max_retry}); the configuration has no result")
