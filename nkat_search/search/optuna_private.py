"""Every use of Optuna's private API, in one place.

nkat-search needs a few things Optuna does not publish: the storage and the id behind a study, a
trial's id, the ``RDBStorage`` under Optuna's per-study cache, the heartbeat's stale-trial query,
a query for RUNNING trials that never beat, which private storage methods the cache calls, and
whether a database holds Optuna's whole schema.
Each function names the Optuna version it was read from and what it relies on;
``tests/test_optuna_private.py`` fails when an Optuna upgrade changes any of it.
"""

from __future__ import annotations

from optuna.trial import TrialState

# Read from Optuna 5.1.0, optuna/storages/_cached_storage.py: the private ``RDBStorage`` methods
# that ``_CachedStorage`` (the storage every ``Study`` on an RDB talks to) calls on its backend.
# A storage that wraps every call (``ResilientRDBStorage``) must wrap these too.
CACHE_PRIVATE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials",
                       "_get_best_trial_id", "_get_stale_trial_ids")


def study_storage(study):
    """The storage a ``Study`` talks to (for an ``RDBStorage``, Optuna's per-study cache on it).

    Optuna 5.1.0, optuna/study/study.py: ``Study.__init__`` keeps it as ``self._storage``.
    """
    return study._storage


def study_id(study) -> int:
    """The storage's id of a ``Study`` or a ``FrozenStudy`` (what the storage methods take).

    Optuna 5.1.0: both keep it as ``_study_id`` (optuna/study/study.py, optuna/study/_frozen.py).
    """
    return study._study_id


def trial_id(trial) -> int:
    """The storage's id of a ``Trial`` or a ``FrozenTrial`` (``number`` counts within a study).

    Optuna 5.1.0: both keep it as ``_trial_id`` (optuna/trial/_trial.py, optuna/trial/_frozen.py).
    """
    return trial._trial_id


def backend(storage):
    """The ``RDBStorage`` under Optuna's per-study cache; ``storage`` itself when not cached.

    Optuna 5.1.0, optuna/storages/_cached_storage.py: ``_CachedStorage.__init__`` keeps the
    wrapped storage as ``self._backend``.
    """
    return getattr(storage, "_backend", storage)


def stale_trial_ids(storage, study_id: int) -> list[int]:
    """RUNNING trials of the study whose last heartbeat is older than the grace period.

    Optuna 5.1.0, optuna/storages/_heartbeat.py: ``BaseHeartbeat._get_stale_trial_ids(study_id)``,
    which ``RDBStorage`` implements and Optuna's own ``fail_stale_trials`` calls.
    """
    return storage._get_stale_trial_ids(study_id)


def running_trial_ids_without_heartbeat(storage, study_id: int) -> list[int]:
    """RUNNING trials of the study that never recorded a heartbeat (Optuna's stale query skips
    them), by the ids of an ``RDBStorage``.

    Optuna 5.1.0, optuna/storages/_rdb: the ORM models ``TrialModel`` (``trial_id``, ``study_id``,
    ``state``) and ``TrialHeartbeatModel`` (``trial_id``) of ``models.py``, and the session
    helper ``_create_scoped_session(storage.scoped_session)`` of ``storage.py``, which commits or
    rolls back as Optuna's own queries do.
    """
    # Here, not at the top: these load SQLAlchemy, which the importers of this module (the trial
    # record among them) do not need until they query.
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        rows = (session.query(models.TrialModel.trial_id)
                .outerjoin(models.TrialHeartbeatModel,
                           models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                .filter(models.TrialModel.study_id == study_id,
                        models.TrialModel.state == TrialState.RUNNING,
                        models.TrialHeartbeatModel.trial_id.is_(None))
                .all())
    return [row[0] for row in rows]


def heartbeat_ages(storage, study_id: int) -> dict[int, float]:
    """Seconds since each RUNNING trial's last heartbeat, by trial id (trials that never beat
    are left out), measured on the database's clock as Optuna's stale query measures them.

    Optuna 5.1.0, optuna/storages/_rdb/storage.py: ``RDBStorage._get_stale_trial_ids`` (the same
    query: ``sqlalchemy.func.now()``, made naive, against ``TrialHeartbeatModel.heartbeat``), on
    the models and session helper named in ``running_trial_ids_without_heartbeat``.
    """
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
        rows = (session.query(models.TrialModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                .join(models.TrialHeartbeatModel,
                      models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                .filter(models.TrialModel.study_id == study_id,
                        models.TrialModel.state == TrialState.RUNNING)
                .all())
    return {trial_id: (now - beat.replace(tzinfo=None)).total_seconds() for trial_id, beat in rows}


def schema_created(connection) -> bool:
    """True when an ``RDBStorage`` has finished creating Optuna's schema in this database.

    Optuna 5.1.0, optuna/storages/_rdb/storage.py: ``RDBStorage.__init__`` creates the tables,
    then ``_VersionManager`` adds the version row and, last, stamps alembic's revision; its
    ``_init_alembic`` takes a stamped revision to mean the storage is set up.
    """
    # Here, not at the top: alembic is needed only when a storage is opened.
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision() is not None
