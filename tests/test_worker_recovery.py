"""A worker killed mid-trial loses nothing: its trial is retried from its last epoch checkpoint.

``kill -9`` leaves the trial RUNNING with a heartbeat that stops; after the grace period the next
worker fails it, Optuna's retry callback queues a copy, and that copy resumes from the original
trial's checkpoint. SIGTERM is the polite version: the step finishes and is checkpointed, and the worker queues the
retry itself before it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

STUDY = {
    "name": "recover",
    "n_trials": 1,
    "seed": 1,
    "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0}},
    # Enough epochs that the kill lands mid-trial; a gate every run passes.
    "fixed": {"conv_stem": "tiny", "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4,
              "epochs": 8, "warmup": 0, "batch_size": 64, "val_fraction": 0.1,
              "train_limit": 512, "test_limit": 128},
    "gate": {"local_tpe": 0.01},
    "stage2": {"datasets": ["mnist"]},
    "sampler": {"type": "tpe", "n_startup_trials": 1},
    "pruner": {"type": "none"},
    "heartbeat": {"interval": 1, "grace": 3, "max_retry": 1},
}


def create(url: str, tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "nkat_search", "study", "create", "--study",
                           str(path), "--storage", url], text=True, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def start_worker(url: str, data_dir: Path, ckpt: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nkat_search", "worker", "--storage", url, "--study", "recover",
         "--device", "cpu", "--data-dir", str(data_dir), "--checkpoint-dir", str(ckpt), "--quiet",
         "--checkpoint-interval", "0"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the worker ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint at {path}"
        time.sleep(0.05)


def interrupt_then_recover(url: str, data_dir: Path, tmp_path: Path, sig: int) -> list:
    create(url, tmp_path)
    ckpt = tmp_path / "ckpt"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(url, data_dir, ckpt, first_log)
    try:
        # checkpoint.pt appears once epoch 1 is done (interval 0: after every epoch).
        wait_for(ckpt / "recover" / "trial-0" / "cifar10" / "checkpoint.pt", first)
        first.send_signal(sig)
        first_code = first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
    assert first_code == expected, first_log.read_text()

    second = start_worker(url, data_dir, ckpt, second_log)
    try:
        assert second.wait(timeout=120) == 0, second_log.read_text()
    finally:
        if second.poll() is None:
            second.kill()
    trials = optuna.load_study(study_name="recover", storage=url).get_trials()
    logs = first_log.read_text() + second_log.read_text()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], logs
    original, retry = trials
    assert retry.system_attrs["failed_trial"] == 0 and retry.user_attrs["retry_of"] == 0
    assert retry.params == original.params
    assert retry.user_attrs["resumed_from_epoch"] >= 1, logs
    assert retry.user_attrs["outcome"] == "complete" and "error" not in retry.user_attrs
    assert retry.user_attrs["worker"] != original.user_attrs["worker"]
    assert "resumed from epoch" in second_log.read_text()
    return trials


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_killed_worker_trial_resumes_from_its_checkpoint(backend, request, data_dir, tmp_path):
    if backend == "postgres":
        url = request.getfixturevalue("fresh_postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'db' / 'study.db'}"
    original, retry = interrupt_then_recover(url, data_dir, tmp_path, signal.SIGKILL)
    # Killed: it wrote nothing itself; the worker that found it dead wrote why.
    assert original.user_attrs["outcome"] == "failed"
    assert original.user_attrs["error"].startswith("worker lost: no heartbeat")
    assert retry.system_attrs["retry_faults"] == 1  # a kill is a fault


def test_sigterm_checkpoints_and_queues_the_retry(fresh_postgres_url, data_dir, tmp_path):
    original, retry = interrupt_then_recover(fresh_postgres_url, data_dir, tmp_path,
                                             signal.SIGTERM)
    assert original.user_attrs["outcome"] == "interrupted"
    assert original.user_attrs["error"].startswith("interrupted")
    assert retry.system_attrs["retry_faults"] == 0  # a stop uses no retry
    # Not a crash: one line says where it stopped and that the retry resumes it; no traceback,
    # no "failed with value None".
    log = (tmp_path / "first.log").read_text()
    assert "Traceback" not in log and "failed with value" not in log, log
    assert "trial    0  interrupted" in log and "its retry resumes from the checkpoint" in log


def test_a_trial_that_runs_out_of_gpu_memory_is_retried_not_lost(data_dir, tmp_path, monkeypatch):
    """Out of memory (with K trials per GPU, maybe a neighbour's) fails the attempt, not the trial.

    The first training call raises CUDA's OutOfMemoryError as the allocator would; the worker
    queues the retry, waits a heartbeat interval, and runs the retry to completion itself.
    """
    import torch

    import nkat_search.train.loop as train_module
    from nkat_search.search.worker import WorkerOptions, run_worker

    url = f"sqlite:///{tmp_path / 'oom.db'}"
    create(url, tmp_path)
    real_train_model = train_module.train_model
    calls = []

    def train_model_that_fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.01 GiB.")
        return real_train_model(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_model", train_model_that_fails_once)
    code = run_worker(WorkerOptions(storage=url, study="recover", device="cpu",
                                    data_dir=str(data_dir), checkpoint_dir=str(tmp_path / "ckpt"),
                                    progress=False))
    assert code == 0
    trials = optuna.load_study(study_name="recover", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    original, retry = trials
    assert original.user_attrs["error"].startswith("out of GPU memory: CUDA out of memory")
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == original.params
    assert retry.user_attrs["outcome"] == "complete"


def test_after_running_out_of_memory_the_worker_waits_for_its_gpu_neighbour(
        data_dir, tmp_path, monkeypatch):
    """The retry starts only once the other trial on the same host and device has finished."""
    import socket
    import threading

    import torch

    import nkat_search.train.loop as train_module
    from nkat_search.search.worker import WorkerOptions, run_worker

    url = f"sqlite:///{tmp_path / 'oom.db'}"
    monkeypatch.setitem(STUDY, "n_trials", 2)  # the neighbour's configuration and ours
    # The neighbour is asked here and never beats; a worker fails a RUNNING trial that has not
    # beaten for a grace period as dead, so the grace must outlast the neighbour's 3 s.
    monkeypatch.setitem(STUDY, "heartbeat", {"interval": 1, "grace": 30, "max_retry": 1})
    create(url, tmp_path)
    study = optuna.load_study(study_name="recover", storage=url)
    neighbour = study.ask()  # another worker's trial, RUNNING on the same GPU
    neighbour.set_user_attr("worker", f"{socket.gethostname()}:1:cpu")
    finisher = threading.Timer(3.0, lambda: study.tell(neighbour, 0.5))
    real_train_model = train_module.train_model
    calls = []

    def train_model_that_fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            finisher.start()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.01 GiB.")
        return real_train_model(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_model", train_model_that_fails_once)
    try:
        code = run_worker(WorkerOptions(storage=url, study="recover", device="cpu",
                                        data_dir=str(data_dir),
                                        checkpoint_dir=str(tmp_path / "ckpt"), progress=False))
    finally:
        finisher.cancel()
    assert code == 0
    trials = optuna.load_study(study_name="recover", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    finished_neighbour, failed, retry = trials
    assert retry.system_attrs["failed_trial"] == failed.number
    assert retry.datetime_start >= finished_neighbour.datetime_complete
