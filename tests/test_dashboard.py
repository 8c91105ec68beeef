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
