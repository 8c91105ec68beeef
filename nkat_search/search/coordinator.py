"""The coordinator: create (or resume) a study from a study file; rebuild its sampler and pruner.

The study file's text and hash are stored in the study itself, so a worker on any machine needs
only the storage URL and the study name: it reads the file back (``load_study_spec_from_storage``)
and builds the same sampler and pruner the coordinator did.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib
from collections import Counter

import optuna

from nkat_search.errors import UserError
from nkat_search.search.space import enqueue
from nkat_search.search.spec import StudySpec, parse_study_text

# Study user attrs (docs/CONTRACTS.md).
ATTR_FILE, ATTR_HASH, ATTR_FILE_NAME = "study_file", "study_file_hash", "study_file_name"


def create_study(spec: StudySpec, storage, name: str | None = None) -> tuple[optuna.Study, bool]:
    """Create the study ``name`` (default: the file's ``name``) or resume it; True when created.

    Resuming with a different file under the same name is refused: trials of two different
    searches would be mixed in one TPE model and one budget.
    """
    name = name or spec.name
    with _quiet():
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction=spec.direction,
                                        sampler=build_sampler(spec), pruner=build_pruner(spec))
        except optuna.exceptions.DuplicatedStudyError:
            study = None
    if study is None:
        stored = _stored_attrs(storage, name)
        if stored.get(ATTR_HASH) != spec.file_hash:
            raise UserError(
                f"study '{name}' already exists with a different study file (stored "
                f"{str(stored.get(ATTR_HASH))[:12]}, given {spec.file_hash[:12]} from "
                f"{spec.file_name}); pass --name NEW_NAME to start a new study"
            )
        return load_study(storage, name, spec), False
    study.set_user_attr(ATTR_FILE, spec.text)
    study.set_user_attr(ATTR_HASH, spec.file_hash)
    study.set_user_attr(ATTR_FILE_NAME, spec.file_name)
    study.set_user_attr("gate", spec.gate)
    study.set_user_attr("stage2_datasets", list(spec.stage2_datasets))
    study.set_user_attr("direction", spec.direction)
    enqueue(study, spec)
    return study, True


def load_study_spec_from_storage(storage, name: str) -> StudySpec:
    """The study file stored in study ``name``, parsed and checked against its stored hash."""
    attrs = _stored_attrs(storage, name)
    text = attrs.get(ATTR_FILE)
    if not isinstance(text, str):
        raise UserError(f"study '{name}' has no stored study file; it was not created by "
                        "`nkat-search study create`")
    spec = parse_study_text(text, file_name=f"{attrs.get(ATTR_FILE_NAME, '?')} (stored in '{name}')")
    if spec.file_hash != attrs.get(ATTR_HASH):
        raise UserError(f"study '{name}': the stored study file does not match its stored hash")
    spec.name = name  # --name may differ from the file's name
    return spec


def load_study(storage, name: str, spec: StudySpec, worker: str | None = None) -> optuna.Study:
    """Load study ``name`` with the sampler and pruner of ``spec`` (seeded for ``worker``)."""
    with _quiet():
        return optuna.load_study(study_name=name, storage=storage,
                                 sampler=build_sampler(spec, worker), pruner=build_pruner(spec))


def sampler_seed(spec: StudySpec, worker: str | None = None) -> int:
    """The file's seed, mixed with the worker's identity when there is one.

    Concurrent workers with one seed would draw the same random start-up trials (and, from the
    same history, the same TPE proposals), so each worker's seed is ``seed + crc32(identity)``.
    One worker is then reproducible only up to its identity; the search is not meant to be.
    """
    if worker is None:
        return spec.seed
    return (spec.seed + zlib.crc32(worker.encode())) % 2**32


def build_sampler(spec: StudySpec, worker: str | None = None) -> optuna.samplers.BaseSampler:
    """TPE (or random) from the file. Constraints are set per trial, see ``objective.py``.

    ``constant_liar`` makes TPE treat running trials as bad results, so parallel workers spread
    out instead of proposing the same region.
    """
    seed = sampler_seed(spec, worker)
    if spec.sampler.get("type", "tpe") == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with _quiet():
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=spec.sampler.get("multivariate", True),
            n_startup_trials=spec.sampler.get("n_startup_trials", 10), constant_liar=True,
        )


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner of the file; steps are CIFAR-10 epochs and values are Local TPE."""
    kwargs = {k: v for k, v in spec.pruner.items() if k != "type"}
    kind = spec.pruner.get("type", "none")
    if kind == "median":
        return optuna.pruners.MedianPruner(**kwargs)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(**kwargs)
    if kind == "hyperband":
        kwargs.setdefault("max_resource", spec.base_config().train.epochs)
        return optuna.pruners.HyperbandPruner(**kwargs)
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(**kwargs)
    return optuna.pruners.NopPruner()


def budget_state(study: optuna.Study, budget: int) -> dict:
    """How far a study is through its budget.

    The budget counts *configurations*: every trial except retries. A retry (a copy queued by the
    heartbeat callback for a trial whose worker died) continues its original trial, so it does not
    use budget; the original stays FAIL and the copy carries the result. Enqueued trials count
    from the moment they are queued.
    """
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    used = sum(1 for t in trials if "failed_trial" not in t.system_attrs)
    return {"budget": budget, "used": used, "left": max(0, budget - used),
            "retries": len(trials) - used, "states": dict(states)}


def summary(study: optuna.Study, spec: StudySpec) -> dict:
    """Counts by state and by outcome, the budget and the best trial, for ``study show``."""
    trials = study.get_trials(deepcopy=False)
    outcomes = Counter(t.user_attrs.get("outcome", "-") for t in trials)
    best = None
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Like study.best_trial: the best feasible trial (constraints all <= 0) when there is one.
    feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    if complete:
        top = max(feasible or complete, key=lambda t: t.value)
        best = {"number": top.number, "global_tpe": top.value, "feasible": bool(feasible),
                "local_tpe": top.user_attrs.get("local_tpe"),
                "consistency": top.user_attrs.get("consistency"),
                "robustness": top.user_attrs.get("robustness")}
    return budget_state(study, spec.n_trials) | {"outcomes": dict(outcomes), "best": best}


def _stored_attrs(storage, name: str) -> dict:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        raise UserError(f"study '{name}' not found in this storage; create it with "
                        "`nkat-search study create --study FILE`") from None
    return storage.get_study_user_attrs(study_id)


@contextlib.contextmanager
def _quiet():
    """Optuna warns that heartbeat, multivariate and constant_liar are experimental: known."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
