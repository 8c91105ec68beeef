"""``nkat-search dashboard`` as a real process: it serves the studies of a SQLite or PostgreSQL storage."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from nkat_search.cli.commands.dashboard import find_free_port

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dash.db'}"
    return request.getfixturevalue("postgres_url")


def start_dashboard(storage_url: str, port: int, log_path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "nkat_search", "dashboard", "--storage", storage_url,
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def get_json(url: str, process: subprocess.Popen, log_path, timeout: float = 60.0):
    """GET ``url`` once the server answers; fail with its log if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dashboard exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"dashboard did not answer within {timeout} s:\n{log_path.read_text()}")


def test_dashboard_lists_the_study(storage_url, tmp_path, request):
    name = f"dash-{request.node.callspec.id}-{time.time_ns()}"
    study = optuna.create_study(study_name=name, storage=storage_url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = find_free_port("127.0.0.1", 18080)
    log_path = tmp_path / "dashboard.log"
    process = start_dashboard(storage_url, port, log_path)
    try:
        body = get_json(f"http://127.0.0.1:{port}/api/studies", process, log_path)
        names = [s["study_name"] for s in body["study_summaries"]]
        assert name in names
        assert f"http://127.0.0.1:{port}/" in log_path.read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_taken_port_is_one_line_and_exit_2(tmp_path):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    optuna.create_study(study_name="s", storage=url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "nkat_search", "dashboard", "--storage", url, "--port", str(port)],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "--port" in lines[0]


def test_the_dashboard_shows_the_metric_the_constraints_and_the_studys_best_trial(tmp_path):
    """What optuna-dashboard 0.21 showed of a study the service wrote, against what is true.

    It said "Objective 0", listed `constraints: []` (it reads Optuna's older list format), marked
    the infeasible top value "Best Trial" (storage.get_best_trial ignores constraints) and
    plotted pruned trials' last Local TPE as a Global TPE.
    """
    from test_export_status import STUDY, build_study

    storage_url = f"sqlite:///{tmp_path / 'dash.db'}"
    build_study(storage_url, infeasible_top=True)
    port = find_free_port("127.0.0.1", 18280)
    log_path = tmp_path / "dashboard.log"
    process = start_dashboard(storage_url, port, log_path)
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", process, log_path)
        study_id = next(s["study_id"] for s in studies["study_summaries"]
                        if s["study_name"] == STUDY)
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}", process, log_path)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/bundle.js",
                                    timeout=10) as response:
            bundle = response.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert detail["objective_names"] == ["Global TPE"]
    assert [t["number"] for t in detail["best_trials"]] == [1]
    trials = {t["number"]: t for t in detail["trials"]}
    assert trials[1]["constraints"] == pytest.approx([-0.1, -0.05])
    assert trials[7]["constraints"] == pytest.approx([-0.1, 0.25])  # robustness missed
    assert trials[3]["state"] == "Pruned" and "values" not in trials[3]  # never scored
    attrs = {a["key"]: a["value"] for a in trials[1]["user_attrs"]}
    assert attrs["accuracy_mnist"] == "0.99" and attrs["tpe_cifar10"] == "0.63"
    assert attrs["feasible"] == "True" and attrs["outcome"] == "complete"
    assert {a["key"] for a in trials[3]["user_attrs"]} >= {"outcome", "reason", "feasible"}
    study_attrs = {a["key"] for a in detail["user_attrs"]}
    assert "study_file" not in study_attrs and "study_file_hash" in study_attrs

    # The learning-curves chart draws pruned trials too, on an axis named for what it plots.
    assert 'yaxis:{title:"Local TPE@CIFAR10"' in bundle and 'xaxis:{title:"Epoch"' in bundle
    assert '!n&&"Pruned"===e.state||' in bundle and "(pruned)" in bundle
    assert trials[4]["intermediate_values"] == [{"step": 1, "value": 0.2}]
    # A trial's page: what a person looks for first at the top, constraints with feasibility.
    keys = [a["key"] for a in trials[3]["user_attrs"]]
    assert keys[:3] == ["outcome", "reason", "feasible"], keys
    keys = [a["key"] for a in trials[7]["user_attrs"]]
    assert keys[:2] == ["outcome", "feasible"] and "config" not in keys, keys
    assert keys.index("constraint_robustness") < keys.index("accuracy_cifar10") < keys.index(
        "worker")
    attrs = {a["key"]: a["value"] for a in trials[7]["user_attrs"]}
    assert attrs["constraint_robustness"] == "0.2500 (missed)"
    assert attrs["constraint_consistency"] == "-0.1000 (met)"
    # The whole config is the trial's note, as YAML, with the verdict and the constraints.
    note = trials[7]["note"]["body"]
    assert note.startswith("**complete**: infeasible: robustness 0.50 < 0.75\n")
    assert "| robustness | 0.2500 | 0.5000 |" in note
    assert " · embed_dim: 128 · depth: 1 · " in note
