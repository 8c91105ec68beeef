"""The private Optuna API that ``search/optuna_private.py`` reads, checked against the real Optuna.

Each test exercises one adapter function on a real SQLite ``RDBStorage``; an Optuna upgrade that
renames an attribute, changes a signature or returns another type fails here, by name, rather
than as a worker that cannot fail a dead trial.
"""

from __future__ import annotations

import datetime as dt
import inspect
import re
import warnings

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from nkat_search.search import optuna_private

# ``study.ask`` on a storage with heartbeat warns that the heartbeat is meant for ``optimize``.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


@pytest.fixture
def storage(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'private.db'}",
                                          heartbeat_interval=60, grace_period=120)


@pytest.fixture
def study(storage):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name="private")


def test_study_storage_is_the_cache_over_the_rdb_storage(storage, study):
    cached = optuna_private.study_storage(study)
    assert isinstance(cached, optuna.storages.BaseStorage)
    assert cached is not storage  # Optuna 5.1 wraps an RDBStorage in its per-study cache
    assert optuna_private.backend(cached) is storage
    assert optuna_private.backend(storage) is storage


def test_study_id_of_a_study_and_of_a_frozen_study(storage, study):
    study_id = optuna_private.study_id(study)
    assert isinstance(study_id, int)
    assert study_id == storage.get_study_id_from_name("private")
    frozen = storage.get_all_studies()
    assert [optuna_private.study_id(s) for s in frozen] == [study_id]


def test_trial_id_of_a_trial_and_of_a_frozen_trial(storage, study):
    study.ask()
    trial = study.ask()
    trial_id = optuna_private.trial_id(trial)
    assert isinstance(trial_id, int)
    frozen = storage.get_trial(trial_id)
    assert isinstance(frozen, FrozenTrial) and frozen.number == trial.number == 1
    assert optuna_private.trial_id(frozen) == trial_id
    assert [optuna_private.trial_id(t) for t in study.get_trials()] == \
        [storage.get_trial_id_from_study_id_trial_number(optuna_private.study_id(study), n)
         for n in (0, 1)]


def _age_heartbeats(storage, hours: float) -> None:
    from optuna.storages._rdb import models

    table = models.TrialHeartbeatModel.__table__
    with storage.engine.begin() as conn:
        conn.execute(table.update().values(
            heartbeat=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            - dt.timedelta(hours=hours)))


def test_stale_trial_ids_lists_running_trials_with_an_old_heartbeat(storage, study):
    study_id = optuna_private.study_id(study)
    old, fresh = study.ask(), study.ask()
    storage.record_heartbeat(optuna_private.trial_id(old))
    assert optuna_private.stale_trial_ids(storage, study_id) == []
    _age_heartbeats(storage, hours=1)
    storage.record_heartbeat(optuna_private.trial_id(fresh))
    stale = optuna_private.stale_trial_ids(storage, study_id)
    assert stale == [optuna_private.trial_id(old)]
    assert all(isinstance(i, int) for i in stale)
    # The study's cache answers the same (Optuna's own fail_stale_trials asks it).
    assert optuna_private.stale_trial_ids(optuna_private.study_storage(study), study_id) == stale
    assert list(inspect.signature(optuna.storages.RDBStorage._get_stale_trial_ids).parameters) \
        == ["self", "study_id"]


def test_running_trial_ids_without_heartbeat(storage, study):
    study_id = optuna_private.study_id(study)
    silent, beating, done = study.ask(), study.ask(), study.ask()
    storage.record_heartbeat(optuna_private.trial_id(beating))
    study.tell(done, 1.0)
    other = optuna.create_study(storage=storage, study_name="other")
    other.ask()
    found = optuna_private.running_trial_ids_without_heartbeat(storage, study_id)
    assert found == [optuna_private.trial_id(silent)]
    assert all(isinstance(i, int) for i in found)
    assert storage.get_trial(found[0]).state == TrialState.RUNNING


def test_heartbeat_ages_of_running_trials_on_the_databases_clock(storage, study):
    study_id = optuna_private.study_id(study)
    old, fresh, silent, done = study.ask(), study.ask(), study.ask(), study.ask()
    storage.record_heartbeat(optuna_private.trial_id(old))
    storage.record_heartbeat(optuna_private.trial_id(done))
    study.tell(done, 1.0)
    _age_heartbeats(storage, hours=1)
    storage.record_heartbeat(optuna_private.trial_id(fresh))
    ages = optuna_private.heartbeat_ages(storage, study_id)
    # Running trials with a heartbeat only: not the finished one, not the one that never beat.
    assert set(ages) == {optuna_private.trial_id(old), optuna_private.trial_id(fresh)}
    assert 3590 < ages[optuna_private.trial_id(old)] < 3700
    assert 0 <= ages[optuna_private.trial_id(fresh)] < 60
    assert optuna_private.trial_id(silent) not in ages


def test_the_private_methods_the_cache_calls_are_the_listed_ones():
    """``ResilientRDBStorage`` retries these by name: a new one would go unretried."""
    from optuna.storages import _cached_storage

    source = inspect.getsource(_cached_storage._CachedStorage)
    called = set(re.findall(r"self\._backend\.(_\w+)\(", source))
    assert called == set(optuna_private.CACHE_PRIVATE_CALLS)
    for name in optuna_private.CACHE_PRIVATE_CALLS:
        assert callable(getattr(optuna.storages.RDBStorage, name)), name


def test_schema_created_after_an_rdb_storage_opened_the_database(tmp_path):
    import sqlalchemy

    url = f"sqlite:///{tmp_path / 'schema.db'}"
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        assert not optuna_private.schema_created(conn)
    optuna.storages.RDBStorage(url).engine.dispose()
    with engine.connect() as conn:
        assert optuna_private.schema_created(conn)
    engine.dispose()
