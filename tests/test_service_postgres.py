"""The service end to end on real PostgreSQL: a coordinator and two worker processes.

A tiny variant of studies/quick.yaml: two enqueued trials make sure one configuration passes the
gate (tiny stem, lambda ~0.07) and one cannot (small stem, lambda ~0.3 needs an accuracy no
2-epoch run reaches), and a median pruner without warm-up may stop the weak ones earlier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml

from nkat_search.search.storage import SCHEMA_LOCK_KEYS, open_storage
from nkat_search.search.trials import TrialRecord

STUDIES = Path(__file__).resolve().parents[1] / "studies"
BUDGET = 6


def study_variant(tmp_path: Path, **overrides) -> Path:
    data = yaml.safe_load((STUDIES / "quick.yaml").read_text())
    data.update({
        "name": "svc",
        "n_trials": BUDGET,
        "search": {
            "conv_stem": {"type": "categorical", "choices": ["tiny", "small"]},
            "temperature": {"type": "float", "low": 0.6, "high": 1.0},
            "lr": {"type": "float", "low": 5.0e-4, "high": 2.0e-3, "log": True},
        },
        "fixed": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4, "epochs": 2,
                  "warmup": 0, "batch_size": 64, "val_fraction": 0.1, "train_limit": 256,
                  "test_limit": 128},
        # Local TPE 3.0 needs accuracy > 0.083 at lambda 0.066 (tiny) but > 0.34 at lambda 0.30.
        "gate": {"local_tpe": 3.0},
        "enqueue": [{"conv_stem": "tiny"}, {"conv_stem": "small"}],
        "sampler": {"type": "tpe", "n_startup_trials": 2, "multivariate": True,
                    "constraints": {"consistency": 0.80, "robustness": 0.75}},
        "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "heartbeat": {"interval": 2, "grace": 10, "max_retry": 1},
    })
    data.update(overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two workers share two cores in CI
    return subprocess.run([sys.executable, "-m", "nkat_search", *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def start_worker(url: str, study: str, data_dir: Path, ckpt: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "nkat_search", "worker", "--storage", url, "--study", study,
         "--device", "cpu", "--data-dir", str(data_dir), "--checkpoint-dir", str(ckpt), "--quiet"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_coordinator_and_two_workers(fresh_postgres_url, data_dir, tmp_path):
    path = study_variant(tmp_path)
    created = cli("study", "create", "--study", str(path), "--storage", fresh_postgres_url)
    assert created.returncode == 0, created.stdout
    assert "created study 'svc'" in created.stdout

    ckpt = tmp_path / "ckpt"
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    workers = [start_worker(fresh_postgres_url, "svc", data_dir, ckpt, log) for log in logs]
    try:
        codes = [w.wait(timeout=200) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], output

    study = optuna.load_study(study_name="svc", storage=fresh_postgres_url)
    trials = study.get_trials()
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(BUDGET)), output  # the budget, exactly, each number once
    states = [t.state.name for t in trials]
    assert "FAIL" not in states and "RUNNING" not in states and "WAITING" not in states, output

    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete, output
    for t in complete:
        attrs = t.user_attrs
        record = TrialRecord.of(t)
        assert record.outcome == "complete" and t.value == record.global_tpe
        assert set(record.datasets) == {"cifar10", "mnist", "fashion_mnist"}
        for row in record.datasets.values():
            assert 0 <= row.accuracy <= 1 and row.lam > 0 and row.tpe > 0
        assert record.missing_datasets == ["emnist"]  # absent from data_dir, and said so
        assert record.local_tpe >= 3.0
        assert {"consistency", "robustness", "worker", "feasible"} <= set(attrs)
        # The config is a system attribute (optuna trials and the dashboard stay readable).
        assert record.config and t.system_attrs.get("config") == record.config
        assert set(t.constraints) == {"consistency", "robustness"}
        assert record.feasible == all(v <= 0 for v in t.constraints.values())
    stopped = [t for t in trials if t.user_attrs.get("outcome") in ("gate_failed", "pruned")]
    assert stopped, output
    assert all(t.state.name == "PRUNED" for t in stopped)
    # Never reached Stage 2: infeasible, behind every measured trial.
    assert all(min(t.constraints.values()) >= 2.0 for t in stopped)
    assert all(t.user_attrs["local_tpe"] < 3.0 for t in stopped
               if t.user_attrs["outcome"] == "gate_failed")
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers pulled trials
    assert output.count(" complete ") == len(complete)  # one line per trial end

    # Checkpoints of finished trials are removed; the Stage 2 reports stay.
    assert not list(ckpt.rglob("checkpoint.pt"))
    assert (ckpt / "svc" / f"trial-{complete[0].number}" / "stage2.md").exists()

    shown = cli("study", "show", "--study", "svc", "--storage", fresh_postgres_url)
    assert shown.returncode == 0 and f"{BUDGET} of {BUDGET} trials started" in shown.stdout

    # Same name, another search: refused, naming both hashes and the way out.
    changed = study_variant(tmp_path, gate={"local_tpe": 2.5})
    again = cli("study", "create", "--study", str(changed), "--storage", fresh_postgres_url)
    assert again.returncode == 2, again.stdout
    assert len(again.stdout.strip().splitlines()) == 1 and "--name" in again.stdout
    resumed = cli("study", "create", "--study", str(changed), "--storage", fresh_postgres_url,
                  "--name", "svc-2")
    assert resumed.returncode == 0, resumed.stdout


def test_resume_with_the_same_file_enqueues_nothing(fresh_postgres_url, tmp_path):
    path = study_variant(tmp_path)
    assert cli("study", "create", "--study", str(path), "--storage",
               fresh_postgres_url).returncode == 0
    again = cli("study", "create", "--study", str(path), "--storage", fresh_postgres_url)
    assert again.returncode == 0 and "resumed study 'svc'" in again.stdout
    study = optuna.load_study(study_name="svc", storage=fresh_postgres_url)
    assert len(study.get_trials()) == 2  # the two enqueued trials, once
    assert study.user_attrs["gate"] == 3.0
    assert study.user_attrs["stage2_datasets"] == ["mnist", "fashion_mnist", "emnist"]
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    assert system_attrs["study_file"] == path.read_text()
    assert "study_file" not in study.user_attrs  # `optuna studies` stays one line per study
    assert study.metric_names == ["Global TPE"]


# Each child loads everything before the barrier, so the six reach the empty database together
# (importing on 2 shared cores alone spreads their starts over seconds).
_COORDINATOR_AT_BARRIER = """
import sys, time
from pathlib import Path
from nkat_search.cli.main import main
import nkat_search.search.coordinator, nkat_search.search.storage, optuna, psycopg2
ready, go, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
ready.touch()
while not go.exists():
    time.sleep(0.001)
sys.exit(main(argv))
"""


def test_coordinators_on_one_new_database_at_once(fresh_postgres_url, tmp_path):
    """Six `study create` of six different studies on one new empty database at the same moment
    (six hosts' `up` on a fresh service): all succeed and the database holds all six. (On main
    Optuna's schema creation ran in each at once: duplicate pg_type keys, tables that already
    existed, two version rows.)"""
    names = [f"first{i}" for i in range(6)]
    go, ready = tmp_path / "go", [tmp_path / f"ready-{n}" for n in names]
    children = []
    for name, flag in zip(names, ready):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nn_trials: 1\nseed: 1\n"
                        "search: {temperature: {type: float, low: 0.6, high: 1.0}}\n")
        children.append(subprocess.Popen(
            [sys.executable, "-c", _COORDINATOR_AT_BARRIER, str(flag), str(go),
             "study", "create", "--study", str(path), "--storage", fresh_postgres_url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 120
        while not all(f.exists() for f in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outputs = [c.communicate(timeout=120)[0] for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert [c.returncode for c in children] == [0] * 6, "\n".join(outputs)
    stored = optuna.storages.RDBStorage(fresh_postgres_url).get_all_studies()
    assert sorted(s.study_name for s in stored) == names


def test_a_schema_lock_held_too_long_fails_the_open_in_one_line(fresh_postgres_url, monkeypatch):
    """A holder that hangs with its connection alive: the open gives up after the bound and names
    what to do; nothing waits forever."""
    from nkat_search.search import storage as storage_module
    from nkat_search.search.storage_url import StorageError

    monkeypatch.setattr(storage_module, "SCHEMA_LOCK_WAIT_S", 1)
    engine = sqlalchemy.create_engine(fresh_postgres_url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as holder:
        holder.execute(sqlalchemy.text("SELECT pg_advisory_lock(:a, :b)"),
                       dict(zip("ab", SCHEMA_LOCK_KEYS)))
        started = time.monotonic()
        with pytest.raises(StorageError) as raised:
            open_storage(fresh_postgres_url)
        waited = time.monotonic() - started
    engine.dispose()
    message = str(raised.value)
    assert 1 <= waited < 10, waited
    assert len(message.splitlines()) == 1 and "over 1 s" in message, message
    assert "pg_stat_activity" in message, message
    # Once the holder is gone, the same URL opens.
    open_storage(fresh_postgres_url).engine.dispose()


def test_schema_lock_of_a_killed_holder_is_dropped_and_never_held_after_open(fresh_postgres_url):
    """A process killed while it holds the schema lock blocks an open only until the server sees
    it gone; an open storage no longer holds the lock (another session takes it at once)."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, sqlalchemy\n"
         "from nkat_search.search.storage import SCHEMA_LOCK_KEYS\n"
         "conn = sqlalchemy.create_engine(sys.argv[1]).connect()\n"
         "conn.execute(sqlalchemy.text('SELECT pg_advisory_lock(:a, :b)'),"
         " dict(zip('ab', SCHEMA_LOCK_KEYS)))\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n", fresh_postgres_url],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        opened = []
        opener = threading.Thread(target=lambda: opened.append(open_storage(fresh_postgres_url)))
        opener.start()
        opener.join(timeout=2)
        assert opener.is_alive() and not opened  # waits for the holder
        holder.kill()
        opener.join(timeout=30)
        assert opened, "open_storage still blocked after its holder was killed"
    finally:
        holder.kill()
        holder.wait()
    storage = opened[0]
    storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "after")
    engine = sqlalchemy.create_engine(fresh_postgres_url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        keys = dict(zip("ab", SCHEMA_LOCK_KEYS))
        assert conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:a, :b)"), keys).scalar()
    engine.dispose()
    storage.engine.dispose()
