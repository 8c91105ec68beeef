"""The storage as ``nkat-search dashboard`` serves it: a read-only view for optuna-dashboard 0.21.

The trial record (``trials.py``) is what the objective wrote; this module only changes how the
dashboard is shown it: constraints it can read, the best trial by the study's own rule, no value
for pruned trials, the telling attributes first and the trial's config as its note.
"""

from __future__ import annotations

import copy
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
# The dashboard's own note layout (a version and the text in chunks, keyed by trial id), so it
# reads the notes made here as it reads the notes it wrote.
from optuna_dashboard._note import note_ver_key, split_body

from nkat_search.search import optuna_private
from nkat_search.search.trials import (CONFIG_ATTR, TrialRecord, best_of, feasible, outcome,
                                       stop_reason)


class DashboardStorage(optuna.storages.RDBStorage):
    """The storage as optuna-dashboard 0.21 should see it: constraints, best trial, pruned values.

    That dashboard version predates Optuna 5's named constraints: it reads the older list under
    the ``constraints`` system attribute (so it shows ``constraints: []`` and draws every trial
    feasible) and takes ``storage.get_best_trial``, which ignores constraints (so it marks an
    infeasible trial "Best Trial"). And Optuna stores a pruned trial's last intermediate value
    (a Local TPE) as its value, which the dashboard plots on the Global TPE axis. This view
    changes nothing in the database; it gives the dashboard the constraint list, the best trial
    by ``best_of`` and no value for trials that were never scored. A trial's page shows no
    constraints, so they are attributes here (``constraint_<name>``), and the attributes are in
    the order a person reads them (``dashboard_attrs``); the trial's config is its note.
    """

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        return [_for_dashboard(t) for t in super().get_all_trials(study_id, deepcopy, states)]

    def get_trial(self, trial_id):
        return _for_dashboard(super().get_trial(trial_id))

    def get_best_trial(self, study_id):
        maximize = self.get_study_directions(study_id)[0] == optuna.study.StudyDirection.MAXIMIZE
        found = best_of(super().get_all_trials(study_id, deepcopy=False,
                                               states=(TrialState.COMPLETE,)), maximize)
        if found is None:
            raise ValueError("No trials are completed yet.")
        return _for_dashboard(found.trial)

    def get_all_studies(self):
        # The dashboard reads the notes from the studies it lists, not from the call below.
        studies = super().get_all_studies()
        for study in studies:
            study.system_attrs = self.get_study_system_attrs(optuna_private.study_id(study))
        return studies

    def get_study_system_attrs(self, study_id):
        """The study's system attributes, with a note for each trial that has none of its own."""
        attrs = dict(super().get_study_system_attrs(study_id))
        for trial in super().get_all_trials(study_id, deepcopy=False):
            trial_id = optuna_private.trial_id(trial)
            if note_ver_key(trial_id) in attrs:
                continue  # a note somebody wrote in the dashboard wins
            body = trial_note(trial)
            if body:
                attrs[note_ver_key(trial_id)] = 1
                attrs.update(split_body(body, trial_id))
        return attrs


# The user attributes a person looks for first, in this order, on a trial's page.
FIRST_ATTRS = ("outcome", "reason", "feasible", "global_tpe", "local_tpe", "consistency",
               "robustness", "error")
FIRST_PREFIXES = ("constraint_", "accuracy_", "tpe_", "lambda_")


def dashboard_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's user attributes for the dashboard: the telling ones first, then the rest.

    optuna-dashboard 0.21 lists them in a box a few rows high; ``outcome``, ``reason`` and the
    accuracies were below its fold. The constraint values join them (``constraint_<name>``: the
    constraint's value, met when <= 0), and the config, when an older trial has it here, goes.
    """
    attrs = {k: v for k, v in trial.user_attrs.items() if k != CONFIG_ATTR}
    for name, value in trial.constraints.items():
        attrs[f"constraint_{name}"] = f"{value:.4f} ({'met' if value <= 0 else 'missed'})"
    order = [k for k in FIRST_ATTRS if k in attrs]
    for prefix in FIRST_PREFIXES:
        order += sorted(k for k in attrs if k.startswith(prefix) and k not in order)
    order += [k for k in attrs if k not in order]
    return {k: attrs[k] for k in order}


def trial_note(trial: FrozenTrial) -> str:
    """The trial's note on the dashboard (Markdown): verdict, constraints, the whole config."""
    record = TrialRecord.of(trial)
    if not isinstance(record.config, dict) and not trial.constraints:
        return ""
    kind = outcome(trial)
    ok = feasible(trial)
    reason = stop_reason(trial)
    verdict = reason or {True: "meets the constraints", False: "infeasible", None: ""}[ok]
    lines = [f"**{kind.replace('_', '-')}**" + (f": {verdict}" if verdict else "")]
    if trial.constraints:
        lines += ["", "| constraint | value (met when <= 0) | measured |", "| --- | --- | --- |"]
        for name, value in trial.constraints.items():
            measured = getattr(record, name, None)
            shown = f"{measured:.4f}" if isinstance(measured, (int, float)) else "not measured"
            lines.append(f"| {name} | {value:.4f} | {shown} |")
    if isinstance(record.config, dict):
        # One wrapped paragraph, not a YAML block of 40 lines: the note sits above the trial's
        # attributes, which must stay in view.
        items = " · ".join(f"{key}: {_note_value(value)}" for key, value in record.config.items())
        lines += ["", f"**config** (`nkat-search export` writes it as a file that "
                      f"`train --config` re-runs): {items}"]
    return "\n".join(lines)


def _note_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _for_dashboard(trial: FrozenTrial) -> FrozenTrial:
    shown = copy.copy(trial)
    system_attrs = dict(trial.system_attrs)
    if "constraints" not in system_attrs and trial.constraints:
        system_attrs["constraints"] = list(trial.constraints.values())
    shown.system_attrs = system_attrs
    shown.user_attrs = dashboard_attrs(trial)
    if trial.state == TrialState.PRUNED:
        shown.values = None
    return shown
