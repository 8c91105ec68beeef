"""Faults a long study meets, injected for real: the database restarts, a worker is misconfigured,
a trial is stopped twice, a checkpoint is truncated.

Real worker processes (``python -m nkat_search worker``) on real PostgreSQL; the database faults
use a server private to this module (``private_postgres``), stopped with ``pg_ctl stop -m fast``
(which ends every connection, as a restart does) and started again on the same port. Every test
asserts exact trial counts and outcomes: nothing lost, nothing trained twice at once, and a stop
costs no retry. Models are tiny and trials short; heartbeats beat every second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

optuna.logging.set_verbosity(optuna.logging.WARNING)

FIXED = {"conv_stem": "tiny", "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4,
         "warmup": 0, "batch_size": 64, "val_fraction": 0.1, "test_limit": 64}


def write_study(tmp_path: Path, name: str, *, n_trials: int, epochs: int, train_limit: int = 512,
                grace: int = 6, max_retry: int = 1, stage2: list | None = None) -> Path:
    data = {
        "name": name, "n_trials": n_trials, "seed": 1,
        "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0}},
        "fixed": FIXED | {"epochs": epochs, "train_limit": train_limit},
        "gate": {"local_tpe": 1e-6},  # every trial passes and completes
        "stage2": {"datasets": stage2 or []},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "heartbeat": {"interval": 1, "grace": grace, "max_retry": max_retry},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nkat_search", *args], text=True,
                          capture_output=True, timeout=timeout, env=env)


def create(url: str, path: Path) -> None:
    done = cli("study", "create", "--study", str(path), "--storage", url)
    assert done.returncode == 0, done.stdout + done.stderr


def start_worker(url: str, study: str, data_dir: Path, ckpt: Path, log: Path, *extra: str,
                 env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "nkat_search", "worker", "--storage", url, "--study", study,
         "--device", "cpu", "--data-dir", str(data_dir), "--checkpoint-dir", str(ckpt), "--quiet",
         "--checkpoint-interval", "0", *extra],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(workers: list[subprocess.Popen], timeout: float) -> list[int]:
    try:
        deadline = time.monotonic() + timeout
        return [w.wait(timeout=max(1.0, deadline - time.monotonic())) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


def wait_until(condition, what: str, timeout: float, workers=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for w in workers:
            assert w.poll() is None, f"a worker ended (exit {w.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def load_trials(url: str, name: str) -> list:
    return sorted(optuna.load_study(study_name=name, storage=url).get_trials(),
                  key=lambda t: t.number)


def chains(trials) -> dict[int, list]:
    """Original trial number -> its attempts in order (the original, then its retries)."""
    found: dict[int, list] = {}
    for t in trials:
        found.setdefault(t.system_attrs.get("failed_trial", t.number), []).append(t)
    return found


def checkpoints(ckpt: Path, name: str) -> list[Path]:
    return sorted((ckpt / name).glob("trial-*/cifar10/checkpoint.pt"))


def assert_no_overlap(attempts) -> None:
    """Each attempt of a configuration ended before the next began: never trained twice at once."""
    for before, after in zip(attempts, attempts[1:]):
        assert before.datetime_complete <= after.datetime_start, (before.number, after.number)


def text(*logs: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)


def test_database_restart_under_three_workers(private_postgres, data_dir, tmp_path):
    """pg_ctl stop -m fast for 10 s, then start, while 3 workers train 3 trials.

    The outage outlasts the grace (6 s, less a second), so each worker stops its trial's training
    before anyone could call it dead, waits for the database, queues the trial again itself (no
    retry used) and the retries resume from their checkpoints: 3 configurations complete, each
    with one interrupted attempt; every worker survives and exits 0. (On main every worker died
    within a second of the stop, with hundreds of lines of tracebacks.)
    """
    url = private_postgres.create_database("restart")
    name = "restart"
    create(url, write_study(tmp_path, name, n_trials=3, epochs=20, train_limit=256, grace=6))
    ckpt = tmp_path / "ckpt"
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = [start_worker(url, name, data_dir, ckpt, log) for log in logs]
    try:
        wait_until(lambda: len(checkpoints(ckpt, name)) == 3
                   and [t.state.name for t in load_trials(url, name)] == ["RUNNING"] * 3,
                   "a checkpoint of each trial", 180, workers)
        private_postgres.stop("fast")
        stopped = time.monotonic()
        time.sleep(10)
        private_postgres.start()
        outage = time.monotonic() - stopped
        codes = finish(workers, 240)
    finally:
        if not private_postgres.running:
            private_postgres.start()
    output = text(*logs)
    assert codes == [0, 0, 0], output
    assert "Traceback" not in output, output

    trials = load_trials(url, name)
    assert len(trials) == 6, output
    found = chains(trials)
    assert sorted(found) == [0, 1, 2], output
    reported, resumed = [], []
    for original, attempts in found.items():
        assert [t.state.name for t in attempts] == ["FAIL", "COMPLETE"], (original, output)
        failed, retry = attempts
        assert failed.user_attrs["error"].startswith("heartbeat lost"), failed.user_attrs
        assert retry.system_attrs["retry_faults"] == 0  # an outage uses no retry
        assert retry.user_attrs["resumed_from_epoch"] >= 1, output
        assert_no_overlap(attempts)
        # The report the outage held up was sent once the database was back: the retry's
        # curve has every epoch, no gap where the training stopped (on merge it lacked one).
        assert sorted(retry.intermediate_values) == list(range(1, 21)), retry.intermediate_values
        reported.append(len(failed.intermediate_values))
        resumed.append(retry.user_attrs["resumed_from_epoch"])
    assert all(worker_line in output for worker_line in ("unreachable", "reachable again"))
    # Training waits at the epoch's end for the storage (its report), after the epoch's
    # checkpoint: the retries resume from at least the last epoch reported.
    assert all(r >= e for r, e in zip(resumed, reported)), (reported, resumed)
    print(f"outage {outage:.1f} s: 3 configurations, 0 lost, 0 trained twice; epochs reported "
          f"{reported}, resumed from {resumed}")


def heartbeat_age(url: str) -> float:
    """Seconds since the study's one RUNNING trial last beat, by the database's clock."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            age = conn.execute(sqlalchemy.text(
                "SELECT EXTRACT(EPOCH FROM (LOCALTIMESTAMP - h.heartbeat)) FROM trial_heartbeats h "
                "JOIN trials t ON t.trial_id = h.trial_id WHERE t.state = 'RUNNING'")).scalar()
    finally:
        engine.dispose()
    return float("inf") if age is None else float(age)


def test_a_blip_shorter_than_the_grace_period_is_ridden_out(private_postgres, data_dir, tmp_path):
    """A 3-second outage (grace 10 s): the trial trains on, nobody declares it dead, no retry.

    Two workers, budget 1: the one without a trial checks for dead trials every second, so a
    heartbeat that stopped at the blip would get the live trial failed and trained twice. The
    test also reads the heartbeat itself: it beats again within seconds of the restart.
    """
    url = private_postgres.create_database("blip")
    # pg_ctl stop and start take seconds of their own on a loaded machine: the outage the workers
    # see is longer than the sleep.
    name, grace = "blip", 10
    create(url, write_study(tmp_path, name, n_trials=1, epochs=40, grace=grace))
    ckpt = tmp_path / "ckpt"
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    workers = [start_worker(url, name, data_dir, ckpt, log) for log in logs]
    try:
        wait_until(lambda: checkpoints(ckpt, name) and "budget spent" in text(*logs),
                   "a checkpoint and an idle worker", 120, workers)
        private_postgres.stop("fast")
        time.sleep(3)
        private_postgres.start()
        restarted = time.monotonic()
        # Beats every second: a fresh one within a few seconds shows the heartbeat came back (a
        # grace period must not pass, or the idle worker would rightly call the trial dead).
        wait_until(lambda: heartbeat_age(url) < 2, "the heartbeat to beat again", grace - 1,
                   workers)
        beat_again = time.monotonic() - restarted
        codes = finish(workers, 240)
    finally:
        if not private_postgres.running:
            private_postgres.start()
    output = text(*logs)
    assert codes == [0, 0], output
    trials = load_trials(url, name)
    assert [t.state.name for t in trials] == ["COMPLETE"], output
    assert trials[0].user_attrs["resumed_from_epoch"] == 0  # never stopped
    assert "declared dead" not in output and "Traceback" not in output, output
    print(f"3 s outage: the heartbeat beat again {beat_again:.1f} s after the restart; "
          "0 trials lost, 0 trained twice, 0 epochs lost")


def test_a_misconfigured_worker_beside_a_healthy_one_drains_nothing(
        fresh_postgres_url, data_dir, tmp_path):
    """A bad --device and missing data (with an empty cache) exit 2 with one line at once,
    before taking any trial; the healthy worker runs the whole budget. (On main each failed
    every trial it took in under a second and the healthy worker found the budget spent.)"""
    url, name = fresh_postgres_url, "misconfigured"
    create(url, write_study(tmp_path, name, n_trials=2, epochs=1, train_limit=256))
    ckpt = tmp_path / "ckpt"
    logs = [tmp_path / "banana.log", tmp_path / "nodata.log", tmp_path / "healthy.log"]
    banana = start_worker(url, name, data_dir, ckpt, logs[0], "--device", "banana")
    nodata = start_worker(url, name, tmp_path / "no-data", ckpt, logs[1],
                          env={"NKAT_CACHE_DIR": str(tmp_path / "empty-cache")})
    healthy = start_worker(url, name, data_dir, ckpt, logs[2])
    codes = finish([banana, nodata, healthy], 240)
    output = text(*logs)
    assert codes == [2, 2, 0], output
    for log, needle in ((logs[0], "banana"), (logs[1], "cifar10")):
        lines = log.read_text().strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "error" in lines[0], lines
    trials = load_trials(url, name)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2, output
    assert {t.user_attrs["worker"].split(":")[-1] for t in trials} == {"cpu"}


def test_a_worker_whose_trials_keep_failing_stops_and_hands_them_back(
        fresh_postgres_url, data_dir, tmp_path, monkeypatch):
    """A GPU that breaks after the checks: every trial fails at once with the same CUDA error.

    Beside a healthy worker process, the broken one (here in-process, its training patched to
    raise) fails 3 trials in a row, queues them again for the others (no retry used), names the
    error and exits 4; the healthy worker completes all 4 configurations.
    """
    import nkat_search.train.loop as loop
    from nkat_search.search.worker import EXIT_BROKEN, FAILURE_STREAK, WorkerOptions, run_worker

    url, name = fresh_postgres_url, "streak"
    create(url, write_study(tmp_path, name, n_trials=4, epochs=2, train_limit=256))
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "healthy.log"
    healthy = start_worker(url, name, data_dir, ckpt, log)

    def broken_gpu(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loop, "train_model", broken_gpu)
    try:
        code = run_worker(WorkerOptions(storage=url, study=name, device="cpu",
                                        data_dir=str(data_dir), checkpoint_dir=str(ckpt),
                                        progress=False))
    finally:
        monkeypatch.undo()
    codes = finish([healthy], 240)
    assert code == EXIT_BROKEN
    assert codes == [0], log.read_text()
    trials = load_trials(url, name)
    found = chains(trials)
    assert len(found) == 4, log.read_text()  # the budget's 4 configurations, no more
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == FAILURE_STREAK and len(trials) == 4 + FAILURE_STREAK
    assert all("illegal memory access" in t.user_attrs["error"] for t in failed)
    for attempts in found.values():
        assert attempts[-1].state.name == "COMPLETE"
        assert all(t.system_attrs.get("retry_faults", 0) == 0 for t in attempts)


def running_worker(url: str, name: str, workers: list[subprocess.Popen]) -> subprocess.Popen:
    """The worker process that holds the study's RUNNING trial."""
    running = [t for t in load_trials(url, name) if t.state.name == "RUNNING"
               and "worker" in t.user_attrs]
    assert len(running) == 1, running
    pid = int(running[0].user_attrs["worker"].split(":")[1])
    return next(w for w in workers if w.pid == pid)


def test_a_trial_stopped_twice_still_completes(fresh_postgres_url, data_dir, tmp_path):
    """SIGTERM on the worker of the trial, then Ctrl-C (SIGINT) on the one that took it over;
    the third worker completes it.

    The study allows one retry; polite stops must not use it (on main, the second stop dropped
    the configuration and the study reported its budget spent).
    """
    url, name = fresh_postgres_url, "twice"
    create(url, write_study(tmp_path, name, n_trials=1, epochs=12, max_retry=1))
    ckpt = tmp_path / "ckpt"
    path = ckpt / name / "trial-0" / "cifar10" / "checkpoint.pt"
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = [start_worker(url, name, data_dir, ckpt, log) for log in logs]
    stopped = []
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            seen = path.stat().st_mtime_ns if path.exists() else 0
            alive = [w for w in workers if w not in stopped]
            wait_until(lambda: path.exists() and path.stat().st_mtime_ns != seen,
                       "a new checkpoint", 120, alive)
            holder = running_worker(url, name, workers)
            holder.send_signal(sig)
            assert holder.wait(timeout=60) == 128 + sig, text(*logs)
            stopped.append(holder)
        last = [w for w in workers if w not in stopped]
        assert finish(last, 180) == [0], text(*logs)
    finally:
        finish(workers, 1)
    trials = load_trials(url, name)
    output = text(*logs)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"], output
    assert [t.system_attrs.get("failed_trial") for t in trials] == [None, 0, 0]
    assert [t.system_attrs.get("retry_faults") for t in trials] == [None, 0, 0]
    assert all(t.user_attrs["error"].startswith("interrupted") for t in trials[:2])
    assert trials[2].user_attrs["resumed_from_epoch"] >= 2, output
    assert len({t.user_attrs["worker"] for t in trials}) == 3  # three workers, one attempt each
    assert_no_overlap(trials)
    assert output.count("uses no retry") == 2, output
    print(f"2 stops: 3 attempts, 0 retries used, 0 lost, 0 trained twice; the last resumed "
          f"from epoch {trials[2].user_attrs['resumed_from_epoch']}")


def test_a_truncated_checkpoint_falls_back_to_the_one_before(fresh_postgres_url, data_dir,
                                                            tmp_path):
    """The worker of a trial is killed and its last checkpoint cut in half; the other worker
    declares the trial dead, and its retry resumes from the checkpoint before the damaged one
    (kept as checkpoint.prev.pt) and completes."""
    url, name = fresh_postgres_url, "truncated"
    create(url, write_study(tmp_path, name, n_trials=1, epochs=12, grace=3))
    ckpt = tmp_path / "ckpt"
    path = ckpt / name / "trial-0" / "cifar10" / "checkpoint.pt"
    previous = path.with_name("checkpoint.prev.pt")
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    workers = [start_worker(url, name, data_dir, ckpt, log) for log in logs]
    try:
        wait_until(lambda: previous.exists() and "budget spent" in text(*logs),
                   "two checkpoints and an idle worker", 120, workers)
        holder = running_worker(url, name, workers)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        # The survivor waits a grace period (3 s) before it calls the trial dead: time enough.
        import torch

        epoch_before = torch.load(previous, weights_only=False)["epoch"]
        epoch_damaged = torch.load(path, weights_only=False)["epoch"]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        survivor = [w for w in workers if w is not holder]
        assert finish(survivor, 180) == [0], text(*logs)
    finally:
        finish(workers, 1)
    trials = load_trials(url, name)
    output = text(*logs)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], output
    killed, retry = trials
    assert killed.user_attrs["outcome"] == "failed"
    assert killed.user_attrs["error"].startswith("worker lost: no heartbeat"), killed.user_attrs
    assert retry.system_attrs["retry_faults"] == 1  # a kill is a fault
    assert retry.user_attrs["resumed_from_epoch"] == epoch_before, output
    assert "set aside as checkpoint.pt.unreadable" in output, output
    print(f"truncated checkpoint (epoch {epoch_damaged}): resumed from epoch {epoch_before}, "
          f"{epoch_damaged - epoch_before} epoch(s) trained again, 0 lost, 0 trained twice")
