"""The coordinator: create (or resume) a study from a study file; rebuild its sampler and pruner.

The study file's text and hash are stored in the study itself, so a worker on any machine needs
only the storage URL and the study name: it reads the file back (``load_study_spec_from_storage``)
and builds the same sampler and pruner the coordinator did. The text is a study *system*
attribute (a long text among the user attributes would fill every line of ``optuna studies``);
the user attributes keep what a person reads: file name, hashes, budget, gate, Stage 2 datasets.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import Callable

import numpy as np
import optuna

from nkat_search.errors import UserError
from nkat_search.search import optuna_private
from nkat_search.search import trials as trial_record
from nkat_search.search.gate_pruner import GatePruner
from nkat_search.search.space import enqueue
from nkat_search.search.spec import StudySpec, check_study_name, parse_study_text
from nkat_search.search.study_lock import StudyLock

# Study attributes (docs/CONTRACTS.md). ATTR_FILE is a system attribute, the rest user attributes.
ATTR_FILE, ATTR_HASH, ATTR_FILE_NAME = "study_file", "study_file_hash", "study_file_name"
ATTR_SEARCH_HASH, ATTR_BUDGET = "search_hash", "n_trials"


def create_study(spec: StudySpec, storage, name: str | None = None,
                 n_trials: int | None = None) -> tuple[optuna.Study, bool, int | None]:
    """Create the study ``name`` (default: the file's ``name``) or resume it.

    Returns ``(study, created, previous budget)`` (the budget before this call; None when
    created). ``n_trials`` overrides the file's budget. Resuming with a file that defines another
    search (``spec.search_hash``) is refused: trials of two searches would be mixed in one TPE
    model. A changed budget (in the file or ``n_trials``) is not another search: it is stored,
    and the workers, which read it before every trial, extend or end the study by it.
    """
    name = spec.name if name is None else check_study_name(name, "--name")
    budget = spec.n_trials if n_trials is None else n_trials
    if budget < 1:
        raise UserError(f"--n-trials: must be >= 1, got {budget}")
    if len(spec.enqueue) > budget:
        raise UserError(f"{spec.file_name}: {len(spec.enqueue)} queued configs exceed the budget "
                        f"of {budget} trials")
    # Two coordinators at once (two `up` on one new study): the second waits until the first has
    # stored the study file, then resumes the study instead of finding it half made.
    with StudyLock(storage, name):
        return _create_or_resume(spec, storage, name, budget)


def _create_or_resume(spec: StudySpec, storage, name: str, budget: int):
    with _quiet():
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction=spec.direction,
                                        sampler=build_sampler(spec), pruner=build_pruner(spec))
        except optuna.exceptions.DuplicatedStudyError:
            study = None
    previous = None
    if study is None:
        stored = load_study_spec_from_storage(storage, name)
        if stored.search_hash != spec.search_hash:
            raise UserError(
                f"study '{name}' already exists with another search definition (stored "
                f"{stored.search_hash[:12]} from {stored.file_name}, given "
                f"{spec.search_hash[:12]} from {spec.file_name}: the space, fixed recipe, queued "
                "configs, gate, Stage 2, sampler, seed, constraints or pruner differ); pass "
                "--name NEW_NAME to start a new study (a changed n_trials alone extends the budget)"
            )
        previous = stored.n_trials
        study = load_study(storage, name, spec)
    else:
        enqueue(study, spec)
    # On a resume too: the stored file becomes the given one (same search, maybe another budget
    # or heartbeat), so `study show` and every worker see what was given last.
    storage.set_study_system_attr(storage.get_study_id_from_name(name), ATTR_FILE, spec.text)
    for key, value in {ATTR_HASH: spec.file_hash, ATTR_FILE_NAME: spec.file_name,
                       ATTR_SEARCH_HASH: spec.search_hash, ATTR_BUDGET: budget,
                       "gate": spec.gate, "stage2_datasets": list(spec.stage2_datasets),
                       "direction": spec.direction}.items():
        study.set_user_attr(key, value)
    with _quiet():
        study.set_metric_names([trial_record.METRIC_NAME])
    return study, previous is None, previous


def load_study_spec_from_storage(storage, name: str) -> StudySpec:
    """The study file stored in study ``name``, parsed, with the stored budget and hashes checked.

    Studies made before the file moved to a system attribute keep it among the user attributes.
    """
    study_id = _study_id(storage, name)
    attrs = storage.get_study_user_attrs(study_id)
    text = storage.get_study_system_attrs(study_id).get(ATTR_FILE, attrs.get(ATTR_FILE))
    if not isinstance(text, str):
        raise UserError(f"study '{name}' has no stored study file; it was not created by "
                        "`nkat-search study create`")
    spec = parse_study_text(text, file_name=f"{attrs.get(ATTR_FILE_NAME, '?')} (stored in '{name}')")
    if spec.file_hash != attrs.get(ATTR_HASH):
        raise UserError(f"study '{name}': the stored study file does not match its stored hash")
    spec.name = name  # --name may differ from the file's name
    spec.n_trials = int(attrs.get(ATTR_BUDGET, spec.n_trials))
    return spec



def load_study(storage, name: str, spec: StudySpec) -> optuna.Study:
    """Load study ``name`` with the sampler and pruner of ``spec``."""
    with _quiet():
        return optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec),
                                 pruner=build_pruner(spec))


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` in a study whose file says ``seed``."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler made afresh for every trial, seeded by the file's seed and the trial's number.

    Optuna seeds a sampler once per process, so with one seed per study file, concurrent
    workers would draw the same start-up trials, and with a seed per worker (host:pid:device)
    the same file gave a different search on every run. Seeding per trial makes a proposal a
    function of the study's history and the trial number only: a one-worker run repeats
    exactly; several workers ask for different trial numbers, so they never draw the same
    random start-up trial (and constant_liar spreads their TPE proposals). The worker holds the
    study lock from ``ask`` until the trial's parameters are drawn (``Objective.on_start``).
    """

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._build = build
        self._seed = seed
        self._sampler = build(seed)

    def before_trial(self, study, trial) -> None:
        self._sampler = self._build(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        # Reproducible by design: a new process gets the same seeds, not fresh ones.
        pass


def build_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """TPE (or random) from the file, seeded per trial. Constraints: see ``objective.py``.

    ``constant_liar`` makes TPE treat running trials as bad results, so parallel workers spread
    out instead of proposing the same region.
    """
    if spec.sampler.get("type", "tpe") == "random":
        return TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), spec.seed)

    def tpe(seed: int) -> optuna.samplers.BaseSampler:
        with _quiet():
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=spec.sampler.get("multivariate", True),
                n_startup_trials=spec.sampler.get("n_startup_trials", 10), constant_liar=True,
            )

    return TrialSeededSampler(tpe, spec.seed)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner of the file; steps are CIFAR-10 epochs and values are Local TPE."""
    return _pruner(spec.pruner, spec)


def _pruner(options: dict, spec: StudySpec) -> optuna.pruners.BasePruner:
    kwargs = {k: v for k, v in options.items() if k not in ("type", "rank")}
    kind = options.get("type", "none")
    epochs = spec.base_config().train.epochs
    if kind == "gate":
        rank = _pruner(options["rank"], spec) if "rank" in options else None
        return GatePruner(spec.gate, epochs, rank=rank, **kwargs)
    if kind == "median":
        return optuna.pruners.MedianPruner(**kwargs)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(**kwargs)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**kwargs)
    if kind == "hyperband":
        kwargs.setdefault("max_resource", epochs)
        return optuna.pruners.HyperbandPruner(**kwargs)
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(**kwargs)
    return optuna.pruners.NopPruner()


def budget_state(study: optuna.Study, budget: int | None = None) -> dict:
    """How far a study is through its budget (default: the stored one, ``n_trials``).

    The budget counts *configurations*: every trial except retries. A retry (a copy queued by the
    heartbeat callback for a trial whose worker died) continues its original trial, so it does not
    use budget; the original stays FAIL and the copy carries the result. Enqueued trials count
    from the moment they are queued (the workers must not propose more than the budget), so what
    a person reads is ``started`` (left the queue) and ``queued`` (enqueued, not yet taken) next
    to ``used``, never "1 used" before anything ran. ``lost`` lists the configurations whose every
    attempt failed with no retry left (``trials.lost_configurations``).
    """
    if budget is None:
        budget = stored_budget(study)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    originals = [t for t in trials if "failed_trial" not in t.system_attrs]
    used = len(originals)
    queued = sum(1 for t in originals if t.state == optuna.trial.TrialState.WAITING)
    return {"budget": budget, "used": used, "started": used - queued, "queued": queued,
            "left": max(0, budget - used),
            "retries": len(trials) - used, "states": dict(states),
            "lost": trial_record.lost_configurations(trials)}


def stored_budget(study: optuna.Study) -> int:
    """The study's budget as last set by ``study create`` / ``up`` (read on every call)."""
    budget = study.user_attrs.get(ATTR_BUDGET)
    if budget is None:  # a study made before the budget was its own attribute
        budget = load_study_spec_from_storage(optuna_private.study_storage(study),
                                              study.study_name).n_trials
    return int(budget)


def summary(study: optuna.Study, spec: StudySpec) -> dict:
    """Counts by state and by outcome, the budget and the best trial, for ``study show``."""
    all_trials = study.get_trials(deepcopy=False)
    outcomes = Counter(trial_record.outcome(t) for t in all_trials)
    found = trial_record.best(study)
    best = None
    if found is not None:
        record = trial_record.TrialRecord.of(found.trial)
        best = {"number": found.trial.number, "global_tpe": found.trial.value,
                "feasible": found.feasible, "local_tpe": record.local_tpe,
                "consistency": record.consistency, "robustness": record.robustness}
    return budget_state(study, spec.n_trials) | {"outcomes": dict(outcomes), "best": best}


def _study_id(storage, name: str) -> int:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        raise UserError(f"study '{name}' not found in this storage; create it with "
                        "`nkat-search study create --study FILE`") from None


@contextlib.contextmanager
def _quiet():
    """Optuna warns that heartbeat, multivariate and constant_liar are experimental: known."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
