"""Eight worker processes on one study: no trial lost, none duplicated, and nothing assumes 2 GPUs.

The end-to-end test runs 8 real ``nkat-search worker`` processes against the real PostgreSQL of
conftest on a study too small to measure anything (one epoch on 128 images, Stage 1 only), so the
time goes where the risk is: 8 processes racing for the budget lock and the trial numbers. On a
2-core CI box most of its wall time is 8 interpreters importing torch at once.

The unit checks give the device assignment of ``up`` and ``worker --device all`` 8 visible GPUs
(``torch.cuda.device_count`` patched), so a hard-coded pair of devices, log names or sibling
counts would show here without a GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKERS = 8
BUDGET = 12


def tiny_study_file(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "studies" / "quick.yaml").read_text())
    data.update({
        "name": "many",
        "n_trials": BUDGET,
        "fixed": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4, "epochs": 1,
                  "warmup": 0, "batch_size": 64, "val_fraction": 0.1, "train_limit": 128,
                  "test_limit": 64},
        "search": {"conv_stem": {"type": "categorical", "choices": ["tiny", "small"]},
                   "lr": {"type": "float", "low": 5.0e-4, "high": 2.0e-3, "log": True}},
        "gate": {"local_tpe": 1e-6},  # must be > 0; every trial passes and completes
        "stage2": {"datasets": []},   # Stage 1 only: CIFAR-10 is the whole Global TPE
        "pruner": {"type": "none"},
        # 8 processes share 2 cores: a heartbeat thread can be starved for seconds, and a live
        # trial declared dead would be retried (an extra trial, which this test would rightly flag).
        "heartbeat": {"interval": 2, "grace": 60, "max_retry": 1},
    })
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_eight_workers_lose_and_duplicate_no_trial(fresh_postgres_url, data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 8 processes, 2 cores: one thread each
    env.pop("CUDA_VISIBLE_DEVICES", None)
    created = subprocess.run(
        [sys.executable, "-m", "nkat_search", "study", "create", "--study",
         str(tiny_study_file(tmp_path)), "--storage", fresh_postgres_url],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert created.returncode == 0, created.stdout

    logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    started = time.monotonic()
    workers = [subprocess.Popen(
        [sys.executable, "-m", "nkat_search", "worker", "--storage", fresh_postgres_url,
         "--study", "many", "--device", "cpu", "--data-dir", str(data_dir),
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs]
    try:
        codes = [w.wait(timeout=150) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    wall = time.monotonic() - started
    output = "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)
    assert codes == [0] * WORKERS, output

    trials = optuna.load_study(study_name="many", storage=fresh_postgres_url).get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(BUDGET)), output  # exactly the budget, each number once
    states = {t.state.name for t in trials}
    assert states == {"COMPLETE"}, (states, output)
    assert all(t.user_attrs["outcome"] == "complete" for t in trials)
    # Each trial was started by exactly one worker, and the worker lines agree with the storage.
    assert sum(output.count(f"trial {n:>4}  complete") for n in numbers) == BUDGET, output
    print(f"{WORKERS} workers, {BUDGET} trials: {wall:.1f} s wall, "
          f"{len({t.user_attrs['worker'] for t in trials})} workers ran a trial")


def test_up_gives_eight_gpus_eight_devices_and_eight_logs(monkeypatch, tmp_path):
    import torch

    from nkat_search.cli.commands import up

    monkeypatch.setattr(torch.cuda, "device_count", lambda: WORKERS)
    spawned = []
    monkeypatch.setattr(up.Up, "_spawn",
                        lambda self, argv, log, env=None: spawned.append((argv, log, env)) or None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)  # the flags as up parses them, defaults and all
    args = parser.parse_args(["--study", "s.yaml", "--trials-per-gpu", "2"])
    runner = up.Up(args, "s", "sqlite:///x.db", tmp_path / "s")
    assert runner._devices() == [f"cuda:{i}" for i in range(WORKERS)]
    runner._start_workers()
    devices = [argv[argv.index("--device") + 1] for argv, _, _ in spawned]
    assert devices == [f"cuda:{i}" for i in range(WORKERS)]
    assert len({log for _, log, _ in spawned}) == WORKERS
    assert all(argv[argv.index("--trials-per-gpu") + 1] == "2" for argv, _, _ in spawned)
    # The cores are split over all 8 workers x 2 trials, not over each worker's 2 alone.
    assert all(env["OMP_NUM_THREADS"] == str(64 // (2 * WORKERS)) for _, _, env in spawned)
    from nkat_search.cli.launch import threads_per_process

    assert threads_per_process(1) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(16) is None  # the user's setting is inherited as it is

    # More workers than GPUs wrap round; none on a device that does not exist.
    runner.args.workers = 12
    assert runner._devices() == [f"cuda:{i % WORKERS}" for i in range(12)]


def test_worker_device_all_starts_one_worker_per_gpu_of_eight(monkeypatch):
    import torch

    from nkat_search.cli import launch
    from nkat_search.cli.commands import worker as command
    from nkat_search.search import worker

    monkeypatch.setattr(torch.cuda, "device_count", lambda: WORKERS)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NKAT_STORAGE", raising=False)
    monkeypatch.delenv("NKAT_STORAGE_PASSWORD_FILE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    seen = {}

    def fake_run_worker(options, stop, on_ready=None):
        seen["device"], seen["threads"] = options.device, options.cpu_threads
        on_ready()
        return 0

    spawned, envs = [], []

    def fake_spawn(argv, count, stop, cpu_threads=None, env=None):
        spawned.append((argv, count, cpu_threads))
        envs.append(env)
        return []

    monkeypatch.setattr(worker, "run_worker", fake_run_worker)
    monkeypatch.setattr(launch, "start_siblings", fake_spawn)
    monkeypatch.setattr(worker.StopFlag, "install", lambda self: None)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--storage", "sqlite:///x.db", "--study", "s", "--device", "all",
                              "--trials-per-gpu", "2"])
    assert command.run(args) == 0

    assert seen == {"device": "cuda:0", "threads": 64 // (2 * WORKERS)}
    # cuda:0 runs here plus one sibling; cuda:1..7 each get one worker that starts its own sibling.
    assert spawned[0][1] == 1 and spawned[0][0][spawned[0][0].index("--device") + 1] == "cuda:0"
    others = spawned[1:]
    assert [argv[argv.index("--device") + 1] for argv, _, _ in others] == \
        [f"cuda:{i}" for i in range(1, WORKERS)]
    assert all(count == 1 and argv[argv.index("--trials-per-gpu") + 1] == "2"
               for argv, count, _ in others)
    assert all(threads == 64 // (2 * WORKERS) for _, _, threads in spawned)
    # The siblings get the storage in their environment; ours is left as it was.
    assert all(env["NKAT_STORAGE"] == "sqlite:///x.db" for env in envs)
    assert "NKAT_STORAGE" not in os.environ


def test_trials_per_device_default_follows_the_gpus_memory_and_is_one_on_the_cpu(monkeypatch):
    import types

    import torch

    from nkat_search.cli.commands import worker as command

    def gpu_of(gib):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: types.SimpleNamespace(total_memory=gib * 2**30))

    gpu_of(140)  # an H200: the measured best, 4
    assert command.default_trials_per_device("cuda:3") == command.GPU_TRIALS_PER_DEVICE == 4
    gpu_of(80)   # an H100 80GB: three 257-token trials fit
    assert command.default_trials_per_device("cuda") == 3
    gpu_of(24)   # a 24 GiB card: one at a time
    assert command.default_trials_per_device("cuda:0") == 1
    assert command.default_trials_per_device("cpu") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert command.default_trials_per_device("auto") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu_of(50)
    assert command.default_trials_per_device("auto") == 2

    # Without --trials-per-gpu, `worker --device all` on 8 GPUs of 50 GiB packs 2 onto each.
    from nkat_search.cli import launch
    from nkat_search.search import worker

    monkeypatch.setattr(torch.cuda, "device_count", lambda: WORKERS)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawned = []
    monkeypatch.setattr(worker, "run_worker", lambda options, stop, on_ready=None: on_ready() or 0)
    monkeypatch.setattr(launch, "start_siblings",
                        lambda argv, count, stop, cpu_threads=None, env=None:
                        spawned.append((argv, count)) or [])
    monkeypatch.setattr(worker.StopFlag, "install", lambda self: None)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--storage", "sqlite:///x.db", "--study", "s",
                                          "--device", "all"])) == 0
    assert spawned[0][1] == 1  # one sibling beside this process on cuda:0
    # Each of cuda:1..7 gets a worker told to run 2 (itself and one sibling).
    assert len(spawned) == WORKERS
    assert all(argv[argv.index("--trials-per-gpu") + 1] == "2" for argv, _ in spawned[1:])
