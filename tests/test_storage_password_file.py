"""The storage password from a file (``NKAT_STORAGE_PASSWORD_FILE``), as the compose files use it.

The suite's shared PostgreSQL trusts every loopback connection, so it would accept any password;
these tests start a server of their own that checks passwords (SCRAM), with a password that needs
URL quoting. Real CLI processes read the file; a wrong password, a missing file and a URL with a
password of its own are one line and exit code 2; a worker's sibling processes never carry the
password on their command lines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import PG_USER, _as_postgres, _find_pg_bindir, _free_port, _in_ci, _run

REPO = Path(__file__).resolve().parents[1]
# '@', ':', '/', '%', '#', '?' and a space all break an unquoted URL.
PASSWORD = "p@ss:w/rd %41#? x"


@pytest.fixture(scope="module")
def scram_server():
    """(port, password file) of a PostgreSQL server that checks passwords on TCP connections."""
    bindir = _find_pg_bindir()
    if bindir is None:
        if _in_ci():
            pytest.fail("CI must test against real PostgreSQL: no initdb found", pytrace=False)
        pytest.skip("PostgreSQL server binaries not found")
    root = Path(tempfile.mkdtemp(prefix="nkat-pg-scram-", dir="/tmp"))
    pwfile = root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, user=PG_USER)
        shutil.chown(pwfile, user=PG_USER)
    data, log = root / "data", root / "setup.log"
    port = _free_port()
    started = False
    try:
        _run([str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "-E", "UTF8",
              "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
              "--no-sync", "--no-instructions"], cwd=root, log=log)
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} "
                   f"-c unix_socket_directories={root} -c fsync=off")
        started = True
        _run([str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(root / "server.log"),
              "-w", "-t", "60", "-o", options], cwd=root, log=log)
        secret = Path(tempfile.mkdtemp(prefix="nkat-secret-")) / "postgres_password"
        secret.write_text(PASSWORD + "\n")  # echo's trailing newline, as a user writes it
        yield port, secret
    finally:
        if started:
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m",
                                         "fast", "-w", "-t", "60"]), cwd=root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90)
        shutil.rmtree(root, ignore_errors=True)


def cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nkat_search", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, cwd=REPO)


def client_env(port: int, secret: Path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               NKAT_STORAGE=f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/postgres",
               NKAT_STORAGE_PASSWORD_FILE=str(secret))
    env.update(extra)
    return env


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_the_server_refuses_the_url_without_the_file(scram_server):
    # Guards the tests below: without the file, this server must say no.
    port, secret = scram_server
    env = client_env(port, secret)
    del env["NKAT_STORAGE_PASSWORD_FILE"]
    done = cli("study", "show", "--study", "nothing", env=env)
    assert done.returncode == 2
    assert "password" in one_line(done.stderr)


def test_commands_read_the_password_from_the_file(scram_server, tmp_path):
    port, secret = scram_server
    env = client_env(port, secret)
    created = cli("study", "create", "--study", "studies/quick.yaml", "--name", "pwfile-quick",
                  env=env)
    assert created.returncode == 0, created.stderr
    assert "created study 'pwfile-quick'" in created.stdout
    shown = cli("status", "--study", "pwfile-quick", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    for output in (created.stdout, created.stderr, shown.stdout, shown.stderr):
        assert PASSWORD not in output


def test_a_wrong_password_in_the_file_is_one_line(scram_server, tmp_path):
    port, _ = scram_server
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    done = cli("status", "--study", "x", env=client_env(port, wrong))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "password authentication failed" in line and "not-the-password" not in line


def test_a_missing_file_is_one_line_naming_the_variable(scram_server, tmp_path):
    port, _ = scram_server
    done = cli("status", "--study", "x", env=client_env(port, tmp_path / "absent"))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "NKAT_STORAGE_PASSWORD_FILE" in line and str(tmp_path / "absent") in line


def test_a_url_with_its_own_password_and_the_file_is_refused(scram_server):
    port, secret = scram_server
    env = client_env(port, secret,
                     NKAT_STORAGE=f"postgresql+psycopg2://{PG_USER}:other@127.0.0.1:{port}/postgres")
    done = cli("status", "--study", "x", env=env)
    assert done.returncode == 2
    assert "has a password too" in one_line(done.stderr)


def test_sqlite_urls_ignore_the_file(tmp_path):
    from nkat_search.cli.commands.storage_arg import with_password_file

    os.environ["NKAT_STORAGE_PASSWORD_FILE"] = str(tmp_path / "absent")
    try:
        url = f"sqlite:///{tmp_path / 'x.db'}"
        assert with_password_file(url) == url
    finally:
        del os.environ["NKAT_STORAGE_PASSWORD_FILE"]


def tiny_study(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load((REPO / "studies" / "quick.yaml").read_text())
    data.update({
        "name": name, "n_trials": 2,
        "fixed": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4, "epochs": 1,
                  "warmup": 0, "batch_size": 64, "val_fraction": 0.1, "train_limit": 128,
                  "test_limit": 64},
        "search": {"lr": {"type": "float", "low": 5.0e-4, "high": 2.0e-3, "log": True}},
        "gate": {"local_tpe": 1e-6}, "stage2": {"datasets": []}, "pruner": {"type": "none"},
        "heartbeat": {"interval": 2, "grace": 60, "max_retry": 1},
    })
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_worker_siblings_authenticate_without_the_password_on_a_command_line(
        scram_server, data_dir, tmp_path):
    """An explicit ``--storage URL`` (no password) plus the file: the sibling gets the URL back
    without the password and reads the file itself; no process's argv ever holds the password."""
    port, secret = scram_server
    env = client_env(port, secret)
    url = env.pop("NKAT_STORAGE")
    created = cli("study", "create", "--study", str(tiny_study(tmp_path, "pwfile-siblings")),
                  "--storage", url, env=env)
    assert created.returncode == 0, created.stderr
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "nkat_search", "worker", "--storage", url, "--study",
         "pwfile-siblings", "--device", "cpu", "--trials-per-gpu", "2", "--data-dir",
         str(data_dir), "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    quoted = "p%40ss"  # the start of the URL-quoted form
    leaks, workers_seen = set(), set()
    deadline = time.monotonic() + 240
    try:
        while worker.poll() is None and time.monotonic() < deadline:
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    argv = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "pwfile-siblings" in argv and "worker" in argv:
                    workers_seen.add(proc.name)
                    if PASSWORD in argv or quoted in argv:
                        leaks.add(argv.replace("\0", " "))
            time.sleep(0.1)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    assert worker.returncode == 0, log.read_text()
    assert len(workers_seen) >= 2, f"the sibling was never seen: {workers_seen}"
    assert not leaks, leaks
    trials = optuna.load_study(study_name="pwfile-siblings",
                               storage=_with_password(url)).get_trials()
    # A sibling that could not authenticate would have failed the group's exit code above.
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]


def _with_password(url: str) -> str:
    from urllib.parse import quote

    return url.replace(f"{PG_USER}@", f"{PG_USER}:{quote(PASSWORD, safe='')}@")
