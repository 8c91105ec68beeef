"""A study on many hosts (issue 24): a full checkpoint disk, database connections per process,
study names, two ``up`` on one study, ``up``'s children after a ``kill -9``.

Real processes and real faults: a real small file system (a tmpfs, mounted here; skipped where
this user cannot mount one), a real PostgreSQL with a small ``max_connections``, real signals.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reliability import (cli, create, finish, load_trials, start_worker, text, wait_until,
                              write_study)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB, mounted for the test: ``mount(size_mib) -> Path``."""
    mounted = []

    def mount(size_mib: int) -> Path:
        where = tmp_path / f"disk-{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): the "
                        "disk-full test needs a real small file system")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """A file that takes all of ``folder``'s free space but ``leave`` bytes."""
    hog = folder / "hog"
    free = shutil.disk_usage(folder).free
    with open(hog, "wb") as out:
        out.write(b"\0" * max(0, free - leave))
    return hog


def test_start_up_check_needs_real_free_space(postgres_url, data_dir, tmp_path, small_disk):
    """A 2 MiB disk cannot hold this study's checkpoints (3 files of 1.1 MB): one line, exit 2,
    no trial taken. (On main the check wrote an empty file, passed, and every trial failed with
    ENOSPC: exit 3, the configurations lost.)"""
    disk = small_disk(2)
    name = "roomless"
    create(postgres_url, write_study(tmp_path, name, n_trials=2, epochs=2))
    done = cli("worker", "--storage", postgres_url, "--study", name, "--device", "cpu",
               "--data-dir", str(data_dir), "--checkpoint-dir", str(disk), "--quiet",
               env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and str(disk) in lines[0] and "MiB free" in lines[0], done.stderr
    assert not load_trials(postgres_url, name), "a trial was taken"


def test_disk_full_mid_trial_requeues_at_no_cost(postgres_url, data_dir, tmp_path, small_disk):
    """The checkpoint disk fills after a trial's first checkpoint (another process's file): the
    worker queues the trial again at no retry cost, says which folder and how much is free in
    one line, and exits 4. Space freed, the next worker resumes the trial from that checkpoint;
    no configuration is lost, and no finished trial leaves a checkpoint behind."""
    disk = small_disk(5)
    name = "diskfull"
    create(postgres_url, write_study(tmp_path, name, n_trials=2, epochs=4, train_limit=1024,
                                     max_retry=0))
    first = tmp_path / "worker-0.log"
    worker = start_worker(postgres_url, name, data_dir, disk, first)
    checkpoint = disk / name / "trial-0" / "cifar10" / "checkpoint.pt"
    wait_until(checkpoint.exists, "the first checkpoint", 120, [worker])
    hog = fill(disk)
    code = finish([worker], 120)[0]
    log = text(first)
    assert code == 4, log
    line = [x for x in log.splitlines() if "cannot write checkpoints to" in x]
    assert len(line) == 1 and str(disk / name / "trial-0" / "cifar10") in line[0], log
    assert " free there" in line[0] and "no retry cost" in line[0], log
    trials = load_trials(postgres_url, name)
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"], log
    assert trials[1].system_attrs["retry_faults"] == 0

    hog.unlink()
    second = tmp_path / "worker-1.log"
    code = finish([start_worker(postgres_url, name, data_dir, disk, second)], 180)[0]
    assert code == 0, text(second)
    trials = load_trials(postgres_url, name)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 2, text(second)
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == 0)
    assert retry.user_attrs["resumed_from_epoch"] >= 1, text(second)
    assert not list(disk.glob(f"{name}/trial-*/*/checkpoint*")), "finished trials' checkpoints"
