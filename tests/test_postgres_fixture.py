"""The PostgreSQL fixtures start a real server that Optuna's RDBStorage can use."""

from __future__ import annotations

import optuna
import sqlalchemy as sa


def test_session_database_is_real_postgresql(postgres_url):
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version()")).scalar_one()
            max_connections = int(conn.execute(sa.text("SHOW max_connections")).scalar_one())
    finally:
        engine.dispose()
    assert "PostgreSQL" in version
    assert max_connections >= 200  # room for 8 worker processes with pools


def test_optuna_study_round_trips_a_trial(fresh_postgres_url):
    storage = optuna.storages.RDBStorage(fresh_postgres_url, heartbeat_interval=1)
    try:
        study = optuna.create_study(study_name="fixture-check", storage=storage,
                                    direction="maximize")
        study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
        study.set_user_attr("gate", 0.45)

        loaded = optuna.load_study(study_name="fixture-check", storage=fresh_postgres_url)
        (trial,) = loaded.trials
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == trial.params["x"]
        assert loaded.user_attrs == {"gate": 0.45}
    finally:
        storage.remove_session()
        storage.engine.dispose()


def test_fresh_databases_are_isolated(fresh_postgres_url, postgres_url):
    assert fresh_postgres_url != postgres_url
    assert optuna.get_all_study_names(storage=fresh_postgres_url) == []
