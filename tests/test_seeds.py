"""A study file's seed makes a one-worker search repeatable, whichever process runs it.

Each run is a real worker process (``run_worker``, its own PID) on a fresh SQLite study; only the
trainer is a stand-in whose accuracy is a fixed function of the parameters, so TPE sees the same
history in both runs. Before the sampler was seeded per trial, the seed mixed in the worker's
``host:pid:device`` and two runs of one file proposed different trials from trial 0 on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

STUDY = {
    "name": "seeds", "n_trials": 6, "seed": 7,
    "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0},
               "depth": {"type": "int", "low": 1, "high": 4},
               "conv_stem": {"type": "categorical", "choices": ["off", "tiny", "small"]}},
    "fixed": {"epochs": 1, "warmup": 0},
    "gate": {"local_tpe": 0.01},
    "stage2": {"datasets": ["mnist"]},
    "sampler": {"type": "tpe", "n_startup_trials": 3},
    "heartbeat": {"interval": 1, "grace": 5},
}

WORKER = r"""
import sys

import nkat_search.train.loop as loop
from nkat_search.train import metrics


def train_model(cfg, *, on_epoch=None, **kwargs):
    # Deterministic in the parameters: the same proposals get the same results.
    accuracy = 0.3 + 0.5 * (cfg.model.temperature - 0.6) + 0.02 * cfg.model.depth
    lam = 9.0
    tpe = metrics.tpe(accuracy, lam)
    if on_epoch is not None:
        on_epoch(loop.EpochReport(1, 1, cfg.train.dataset, 1.0, accuracy, lam, tpe, 0.1, 1.0))
    return loop.TrainResult(cfg.train.dataset, "val", accuracy, 9_000_000, lam, tpe, 1, 0, 0.1,
                            1.0, [0.1], cfg.to_dict())


loop.train_model = train_model
from nkat_search.search.worker import WorkerOptions, run_worker  # noqa: E402

# The worker's preflight loads CIFAR-10 (the trainer is the stand-in): from the data folder, never
# a download.
sys.exit(run_worker(WorkerOptions(storage=sys.argv[1], study="seeds", device="cpu",
                                  checkpoint_dir=sys.argv[2], data_dir=sys.argv[3],
                                  download=False, progress=False)))
"""


def one_run(tmp_path: Path, name: str, data_dir: Path) -> list[dict]:
    folder = tmp_path / name
    folder.mkdir()
    study_file = folder / "seeds.yaml"
    study_file.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    url = f"sqlite:///{folder / 'study.db'}"
    created = subprocess.run([sys.executable, "-m", "nkat_search", "study", "create", "--study",
                              str(study_file), "--storage", url], capture_output=True, text=True,
                             timeout=120)
    assert created.returncode == 0, created.stderr
    worker = subprocess.run([sys.executable, "-c", WORKER, url, str(folder / "ckpt"),
                             str(data_dir)], capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    trials = optuna.load_study(study_name="seeds", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * STUDY["n_trials"], worker.stdout
    return [t.params for t in trials]


def test_two_runs_of_one_study_file_propose_the_same_trials(tmp_path, data_dir):
    first, second = one_run(tmp_path, "first", data_dir), one_run(tmp_path, "second", data_dir)
    assert first == second, json.dumps([first, second], indent=1)
    assert len({json.dumps(p, sort_keys=True) for p in first}) == len(first)  # a search, not a loop


def test_trial_seeds_depend_on_the_file_seed_and_the_trial_number_only():
    from nkat_search.search.coordinator import trial_seed

    assert trial_seed(7, 0) == trial_seed(7, 0)
    assert len({trial_seed(7, n) for n in range(100)}) == 100
    assert trial_seed(7, 3) != trial_seed(8, 3)
