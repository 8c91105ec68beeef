"""``nkat-search up`` end to end as a real process: coordinator, a worker, dashboard, table, export.

Most tests cut studies/quick.yaml down further (two trials of one epoch, Stage 2 on MNIST only,
the gate near 0 so trials reach Stage 2 and complete); one runs it as shipped, the README's job.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from nkat_search.cli.commands.dashboard import find_free_port

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 2


def tiny_study_file(tmp_path: Path, n_trials: int = N_TRIALS, fixed: dict | None = None,
                    **top: object) -> tuple[Path, str]:
    """studies/quick.yaml cut down; ``fixed`` updates its recipe, ``top`` replaces top-level keys."""
    data = yaml.safe_load((REPO / "studies" / "quick.yaml").read_text())
    name = f"{data['name']}-up-test"
    data["name"] = name
    data["n_trials"] = n_trials
    data["fixed"] |= {"epochs": 1, "warmup": 0, "train_limit": 256, "test_limit": 128}
    data["fixed"] |= fixed or {}
    data["gate"] = {"local_tpe": 1e-6}  # must be > 0; every trial goes on to Stage 2
    data["stage2"] = {"datasets": ["mnist"]}
    data["pruner"] = {"type": "none"}
    data |= top
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, name


def up_command(study_file: Path, out: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nkat_search", "up", "--study", str(study_file),
            "--out", str(out), "--data-dir", str(data_dir), "--workers", "1", "--refresh", "1",
            *extra]


def check_finished_run(out: Path, name: str, stdout: str) -> None:
    assert (out / f"{name}.db").is_file()
    assert "trial  outcome" in stdout and "complete," in stdout  # the table and the summary line
    # A bare path is a storage too, and up says how to reach its study afterwards.
    assert f"this study later: nkat-search status --study {name}" in stdout
    status = subprocess.run([sys.executable, "-m", "nkat_search", "status", "--study", name,
                             "--storage", str(out / f"{name}.db"), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)["summary"]
    assert summary["running"] == 0 and summary["failed"] == 0
    if summary["complete"]:
        best = yaml.safe_load((out / name / "export" / "best.yaml").read_text())
        assert best["study"]["trial"] == summary["best_trial"]
        assert f"exported {min(summary['complete'], 3)} trial(s)" in stdout


@pytest.fixture
def env() -> dict:
    # The CPU path on a 2-core budget, even on a machine with a GPU.
    return os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}


def test_up_runs_a_tiny_study_to_the_export(tmp_path, data_dir, env):
    study_file, name = tiny_study_file(tmp_path)
    out = tmp_path / "runs"
    result = subprocess.run(up_command(study_file, out, data_dir, "--no-dashboard"),
                            capture_output=True, text=True, timeout=170, env=env)
    logs = "".join(p.read_text() for p in (out / name / "logs").glob("*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    check_finished_run(out, name, result.stdout)
    assert (out / name / "export" / "best.yaml").is_file(), result.stdout + logs
    # up's final export writes the study's files too: a CSV row per trial, the plots as PNG.
    with (out / name / "export" / "trials.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == summary_total(out, name)
    assert (out / name / "export" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def summary_total(out: Path, name: str) -> int:
    import optuna

    return len(optuna.load_study(study_name=name,
                                 storage=f"sqlite:///{out / (name + '.db')}").trials)


def test_up_serves_the_dashboard_on_the_next_free_port(tmp_path, data_dir, env):
    study_file, name = tiny_study_file(tmp_path)
    out = tmp_path / "runs"
    taken = find_free_port("127.0.0.1", 18180)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        process = subprocess.Popen(up_command(study_file, out, data_dir, "--port", str(taken)),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env)
        lines, address = [], None
        try:
            for line in process.stdout:
                lines.append(line)
                if line.startswith("dashboard: "):
                    address = line.split()[1]
                    with urllib.request.urlopen(address + "api/studies", timeout=10) as response:
                        studies = json.loads(response.read())["study_summaries"]
                    assert name in [s["study_name"] for s in studies]
                    break
            rest, _ = process.communicate(timeout=170)
        finally:
            if process.poll() is None:
                process.kill()
    stdout = "".join(lines) + rest
    assert process.returncode == 0, stdout
    assert f"port {taken} is in use" in stdout
    assert address is not None and address != f"http://127.0.0.1:{taken}/"
    check_finished_run(out, name, stdout)


def test_the_quick_study_as_shipped_completes_and_exports(tmp_path, data_dir, env):
    """The README's main job, run as a user runs it: from a folder, with the default out dir.

    It once ran 8 trials that all drew the slow small stem and failed the gate, ended with
    "nothing to export yet" and exit 0; the sampler's seed then depended on the worker's PID.
    """
    result = subprocess.run(
        [sys.executable, "-m", "nkat_search", "up", "--study", str(REPO / "studies" / "quick.yaml"),
         "--data-dir", str(data_dir), "--no-dashboard", "--workers", "1"],
        # 2m11s on a 2-core CPU at load average 3; the limit leaves room for a loaded machine.
        capture_output=True, text=True, timeout=2400, env=env | {"PYTHONPATH": str(REPO)},
        cwd=tmp_path)
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / "nkat-quick" / "logs").glob("*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert (tmp_path / "runs" / "nkat-quick" / "export" / "best.yaml").is_file()
    # From the folder up ran in, status finds the study by its name alone.
    assert "this study later: nkat-search status --study nkat-quick  (or" in result.stdout
    status = subprocess.run([sys.executable, "-m", "nkat_search", "status", "--study",
                             "nkat-quick", "--json"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO)})
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["summary"]["complete"] >= 1 and report["summary"]["failed"] == 0
    assert report["budget"]["used"] == 8 and report["summary"]["running"] == 0
    assert "Traceback" not in logs


def test_up_exits_1_when_no_trial_completed(tmp_path, data_dir, env):
    """A study whose every trial fails the gate has nothing to export: that is not success."""
    study_file, name = tiny_study_file(tmp_path, n_trials=1, gate={"local_tpe": 1e6})
    out = tmp_path / "runs"
    result = subprocess.run(up_command(study_file, out, data_dir, "--no-dashboard"),
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no trial completed (1 gate-failed): nothing to export" in result.stdout
    assert "gate: Local TPE" in result.stdout  # the table says why


def test_a_bad_study_file_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\n")
    result = subprocess.run([sys.executable, "-m", "nkat_search", "up", "--study", str(path),
                             "--out", str(tmp_path / "runs"), "--no-dashboard"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "n_trials" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_up_timeout_ends_after_the_running_trial_and_the_next_up_goes_on(tmp_path, data_dir, env):
    """``--timeout``: no new trial after S seconds, the running one finishes, nothing is lost.

    A study run in windows (a GPU lent for ten minutes at a time) must neither interrupt trials
    nor run one twice: the second up takes the rest of the budget.
    """
    study_file, name = tiny_study_file(tmp_path, n_trials=3)
    out = tmp_path / "runs"
    first = subprocess.run(up_command(study_file, out, data_dir, "--no-dashboard",
                                      "--timeout", "0.01"),
                           capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "--timeout 0.01 s: 1 of 3 trials of the budget ran" in first.stdout
    study_url = f"sqlite:///{out / (name + '.db')}"
    import optuna

    trials = optuna.load_study(study_name=name, storage=study_url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"]  # the one it took ran to its end

    second = subprocess.run(up_command(study_file, out, data_dir, "--no-dashboard"),
                            capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    trials = optuna.load_study(study_name=name, storage=study_url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3


def test_an_interrupted_trial_on_a_fresh_machine_starts_over_and_nothing_is_lost(
        tmp_path, data_dir, env):
    """A window cut short by Ctrl-C, then only the SQLite file carried to a new machine (the
    trial's checkpoint stayed behind): the retry trains from epoch 0, every configuration ends
    once, and the epochs the lost attempt reported raise no warning when reported again."""
    import optuna

    study_file, name = tiny_study_file(tmp_path, fixed={"epochs": 4, "train_limit": 1024})
    first_out, second_out = tmp_path / "machine-1", tmp_path / "machine-2"
    study_url = f"sqlite:///{first_out / (name + '.db')}"
    first = subprocess.Popen(up_command(study_file, first_out, data_dir, "--no-dashboard",
                                        "--checkpoint-interval", "0"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not any(t.intermediate_values for t in _trials(study_url, name)):
            assert first.poll() is None and time.monotonic() < deadline, "no epoch reported"
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        stdout, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, stdout
    (interrupted,) = [t for t in _trials(study_url, name) if t.state.name == "FAIL"]
    second_out.mkdir()
    # The file alone is the study: up folded SQLite's write-ahead log into it before exiting.
    wal = first_out / f"{name}.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    shutil.copy(first_out / f"{name}.db", second_out / f"{name}.db")
    second = subprocess.run(up_command(study_file, second_out, data_dir, "--no-dashboard"),
                            capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    trials = optuna.load_study(study_name=name,
                               storage=f"sqlite:///{second_out / (name + '.db')}").get_trials()
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == interrupted.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == interrupted.params
    assert retry[0].user_attrs.get("resumed_from_epoch", 0) == 0  # nothing to resume from
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * N_TRIALS + ["FAIL"]
    logs = "".join(p.read_text() for p in (second_out / name / "logs").glob("*.log"))
    assert "reported value is ignored" not in logs + second.stdout + second.stderr


def _trials(url: str, name: str) -> list:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=url).get_trials()
    except Exception:  # noqa: BLE001 - the study or its file is not created yet
        return []


def test_up_passes_the_compile_scope_to_its_workers(tmp_path, data_dir, env):
    """``up --compile-scope blocks``: the trial compiles each Block (recorded on the trial) and
    completes, its compiled code kept under the cache dir; a scope that does not exist is
    argparse's one line."""
    import optuna

    # CIFAR-10 only: one compile on the CPU is enough to see the scope.
    study_file, name = tiny_study_file(tmp_path, n_trials=1, fixed={"compile": True},
                                       stage2={"datasets": []})
    out = tmp_path / "runs"
    # Its own cache dir, and no Inductor cache set: the compiled graphs must land under it
    # (train/compile_cache.py), where a study resumed after a reboot finds them.
    cache = tmp_path / "cache"
    env = {k: v for k, v in env.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["NKAT_CACHE_DIR"] = str(cache)
    result = subprocess.run(up_command(study_file, out, data_dir, "--no-dashboard",
                                       "--compile-scope", "blocks"),
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = [p for p in (cache / "compile").rglob("*") if p.is_file()]
    assert compiled, "nothing compiled under the cache dir"
    (trial,) = optuna.load_study(study_name=name,
                                 storage=f"sqlite:///{out / (name + '.db')}").get_trials()
    assert trial.state.name == "COMPLETE"
    assert trial.user_attrs["compile_scope"] == "blocks"
    assert trial.user_attrs["time_compile_s"] > 0
    bad = subprocess.run(up_command(study_file, out, data_dir, "--compile-scope", "layers"),
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) <= 3, bad.stderr
    assert "invalid choice: 'layers'" in bad.stderr


def test_a_bad_timeout_is_one_line(tmp_path):
    study_file, _ = tiny_study_file(tmp_path)
    result = subprocess.run([sys.executable, "-m", "nkat_search", "up", "--study", str(study_file),
                             "--out", str(tmp_path / "runs"), "--timeout", "-5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("nkat-search up: error: --timeout: must be a number of "
                                     "seconds > 0, got -5.0")


def test_two_ups_on_one_study_share_its_budget_and_keep_their_own_logs(tmp_path, data_dir, env):
    """Two ``up`` started at once on one new SQLite study, one folder, one port: both run, the
    budget is shared (N_TRIALS trials, each once), a printed dashboard address is one that its
    own up served (never the other's), and each up writes its own worker and dashboard logs."""
    study_file, name = tiny_study_file(tmp_path)
    out = tmp_path / "runs"
    port = find_free_port("127.0.0.1", 18280)
    processes = [subprocess.Popen(up_command(study_file, out, data_dir, "--port", str(port)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, stdout in zip(processes, outputs):
        assert p.returncode == 0, stdout
    addresses = [line.split()[1] for stdout in outputs for line in stdout.splitlines()
                 if line.startswith("dashboard: ")]
    assert len(addresses) == len(set(addresses)), outputs
    import optuna

    numbers = sorted(t.number for t in optuna.load_study(
        study_name=name, storage=f"sqlite:///{out / (name + '.db')}").trials)
    assert numbers == list(range(N_TRIALS)), outputs
    logs = sorted(p.name for p in (out / name / "logs").glob("*.log"))
    for p in processes:
        assert f"worker-0.up-{p.pid}.log" in logs and f"dashboard.up-{p.pid}.log" in logs, logs
