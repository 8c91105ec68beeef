"""The compose worker service's entrypoint and command, run as its container runs them, stopped
as `docker compose stop` stops it.

No Docker engine here: the entrypoint script and the command line come from docker-compose.yml,
on the CPU (``--device cpu`` for ``all``) against the real PostgreSQL. Docker delivers SIGTERM to
the container's init, which hands it to the entrypoint's process; since the entrypoint execs the
worker, that is the worker itself, which must forward it to its sibling (``--trials-per-gpu 2``),
finish the epoch, checkpoint, queue each trial for retry and exit well inside the compose file's
``stop_grace_period``.
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


def test_sigterm_through_the_entrypoint_checkpoints_both_trials_and_queues_their_retries(
        fresh_postgres_url, data_dir, tmp_path):
    worker = load(COMPOSE_FILE)["services"]["worker"]
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", NKAT_STORAGE=fresh_postgres_url,
               **{k: with_defaults(str(v)) for k, v in worker["environment"].items()
                  if k.startswith(("NKAT_MPS", "CUDA_MPS"))})
    env.pop("NKAT_STORAGE_PASSWORD_FILE", None)  # the suite's server trusts loopback
    created = subprocess.run([sys.executable, "-m", "nkat_search", "study", "create", "--study",
                              str(study_file), "--storage", fresh_postgres_url], env=env,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr

    command = [with_defaults(w) for w in command_words(worker)]
    assert command[0] == "nkat-search"
    command[:1] = [sys.executable, "-m", "nkat_search"]  # the console script, without PATH
    command[command.index("--study") + 1] = STUDY["name"]
    command[command.index("--device") + 1] = "cpu"
    assert command[command.index("--trials-per-gpu") + 1] == "2"
    ckpt = tmp_path / "ckpt"
    command += ["--data-dir", str(data_dir), "--checkpoint-dir", str(ckpt),
                "--checkpoint-interval", "0", "--quiet"]
    entrypoint = [str(REPO / w.replace("/app/", "")) for w in command_words(worker, "entrypoint")]
    log = tmp_path / "worker.log"
    process = subprocess.Popen(["sh", *entrypoint, *command], env=env, stdout=log.open("w"),
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
    assert "MPS not started" in output  # the entrypoint ran, and then the worker in its place

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
