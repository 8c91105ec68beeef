"""The compose worker service's command, run as its container runs it, stopped as
`docker compose stop` stops it; and workers/smoke_check.py, the image check of workers/smoke.sh.

No Docker engine here: the command line and the environment come from docker-compose.yml, on the
CPU (``--device cpu`` for ``all``) against the real PostgreSQL. Docker delivers SIGTERM to the
container's init, which hands it to the command's process, the worker, which must forward it to
its sibling (``--trials-per-gpu 2``), checkpoint after the current step, queue each trial for
retry and exit well inside the compose file's ``stop_grace_period``.
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

from test_compose import COMPOSE_FILE, command_words, load, parse_duration, with_defaults

REPO = Path(__file__).resolve().parents[1]
STUDY = {
    "name": "container-stop",
    "n_trials": 2,
    "seed": 1,
    "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0}},
    "fixed": {"conv_stem": "tiny", "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4,
              "epochs": 20, "warmup": 0, "batch_size": 64, "val_fraction": 0.1,
              "train_limit": 512, "test_limit": 128},
    "gate": {"local_tpe": 0.01},
    "stage2": {"datasets": []},
    "sampler": {"type": "tpe", "n_startup_trials": 2},
    "pruner": {"type": "none"},
    "heartbeat": {"interval": 2, "grace": 60, "max_retry": 1},
}


def test_sigterm_checkpoints_both_trials_and_queues_their_retries_in_time(
        fresh_postgres_url, data_dir, tmp_path):
    worker = load(COMPOSE_FILE)["services"]["worker"]
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", NKAT_STORAGE=fresh_postgres_url,
               **{k: str(v) for k, v in worker["environment"].items()
                  if k.startswith("CUDA_MPS")})
    env.pop("NKAT_STORAGE_PASSWORD_FILE", None)  # the suite's server trusts loopback
    created = subprocess.run([sys.executable, "-m", "nkat_search", "study", "create", "--study",
                              str(study_file), "--storage", fresh_postgres_url], env=env,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr

    command = command_words(worker, defaults=True)  # as Compose makes it: .env.example's values
    assert command[:2] == ["nkat-search", "worker"]
    command[:1] = [sys.executable, "-m", "nkat_search"]  # the console script, without PATH
    command[command.index("--study") + 1] = STUDY["name"]
    command[command.index("--device") + 1] = "cpu"
    ckpt = tmp_path / "ckpt"
    command += ["--trials-per-gpu", "2", "--data-dir", str(data_dir), "--checkpoint-dir",
                str(ckpt), "--checkpoint-interval", "0", "--quiet"]
    log = tmp_path / "worker.log"
    process = subprocess.Popen(command, env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, cwd=REPO)
    checkpoints = [ckpt / STUDY["name"] / f"trial-{n}" / "cifar10" / "checkpoint.pt"
                   for n in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not all(p.exists() for p in checkpoints):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no checkpoints yet:\n{log.read_text()}"
            time.sleep(0.1)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)  # what the container's init passes on
        code = process.wait(timeout=120)
        stop_seconds = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert code == 128 + signal.SIGTERM, output
    assert stop_seconds < parse_duration(with_defaults(worker["stop_grace_period"])), stop_seconds

    trials = optuna.load_study(study_name=STUDY["name"], storage=fresh_postgres_url).get_trials()
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    queued = [t for t in trials if t.state.name == "WAITING"]
    assert len(interrupted) == 2 and len(queued) == 2, [(t.number, t.state.name) for t in trials]
    for trial in interrupted:
        assert trial.user_attrs["error"].startswith("interrupted"), trial.user_attrs
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == sorted(
        t.number for t in interrupted)
    # Both processes trained: the sibling got the signal too (its trial was interrupted, not run
    # to the end after the main process left).
    assert len({t.user_attrs["worker"] for t in interrupted}) == 2
    assert all(p.exists() for p in checkpoints)


def test_the_image_check_reports_a_finished_run_and_a_failed_one(data_dir, tmp_path):
    """workers/smoke_check.py on the CPU and eager to be quick here (its defaults, cuda and
    --compile, are overridden by the flags after them)."""
    env = dict(os.environ, NKAT_SMOKE_OUT=str(tmp_path / "out"), OMP_NUM_THREADS="2",
               NKAT_MPS="off")
    flags = ["--device", "cpu", "--no-compile", "--data-dir", str(data_dir), "--train_limit",
             "256", "--test_limit", "128", "--embed_dim", "32", "--depth", "1", "--num_heads", "4"]
    check = [sys.executable, str(REPO / "workers" / "smoke_check.py")]
    done = subprocess.run([*check, *flags], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "image: torch " in done.stdout and "C compiler" in done.stdout
    assert "image OK: 1 epoch(s) trained eager on cpu" in done.stdout, done.stdout
    assert "NO-GO at 45%" in done.stdout and "MPS: not used" in done.stdout

    # A run that cannot train (a config the model refuses) is a failed image check, not "OK".
    broken = subprocess.run([*check, *flags, "--embed_dim", "30"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "FAILED: nkat-search smoke exited with 2" in broken.stderr, broken.stderr
    assert "image OK" not in broken.stdout

    # MPS demanded where there is none (no GPU here): one line, exit 2, nothing trained.
    refused = subprocess.run([*check, *flags], env=dict(env, NKAT_MPS="on"), capture_output=True,
                             text=True, timeout=300, cwd=REPO)
    assert refused.returncode == 2 and "--mps on" in refused.stderr, refused.stderr
    assert "image OK" not in refused.stdout
