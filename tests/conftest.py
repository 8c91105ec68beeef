"""Shared fixtures: a real PostgreSQL server for the session, the dataset dir, a private cache dir.

The service runs on PostgreSQL in production, so the tests do too (STYLE.md principle 8): SQLite
hides locking, connection-count and transaction differences that the coordinator and the workers
depend on. The server is throwaway: initdb into /tmp, fsync off, trust auth on loopback only.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_USER = "postgres"
PG_DB = "nkat_test"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _find_pg_bindir() -> Path | None:
    """The bin dir of the newest installed PostgreSQL (Debian layout: /usr/lib/postgresql/N/bin)."""
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    candidates = [d for d in candidates if (d / "pg_ctl").exists()]

    def version(bindir: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in bindir.parent.name.split("."))
        except ValueError:
            return (0,)

    return max(candidates, key=version) if candidates else None


def _free_port() -> int:
    # The port is released before postgres binds it; the race is harmless on a CI box.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs the tests as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *cmd]
    return cmd


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    # Output goes to a file, never a pipe: the postmaster inherits pg_ctl's stdout and would keep a
    # pipe open forever. The cwd must be readable by postgres (root's home is not).
    with open(log, "ab") as out:
        result = subprocess.run(_as_postgres(cmd), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=120)
    if result.returncode != 0:
        server_log = log.with_name("server.log")
        tail = log.read_text()[-3000:]
        if server_log.exists():
            tail += server_log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{tail}")


def _admin_connect(port: int, dbname: str = "postgres"):
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname=dbname)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    return conn


def _url(port: int, dbname: str) -> str:
    return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/{dbname}"


class PostgresServer:
    """One throwaway PostgreSQL cluster in a temp folder: initdb, start, stop, databases.

    ``stop`` and ``start`` keep the data folder and the port, so tests can restart the database
    under running workers (``pg_ctl stop -m fast`` ends every connection, as a real restart does).
    """

    def __init__(self, bindir: Path, prefix: str = "nkat-pg-"):
        self.bindir = bindir
        # mkdtemp gives mode 0700; /tmp is world-traversable, so postgres can reach it once it
        # owns it.
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        if os.geteuid() == 0:
            shutil.chown(self.root, user=PG_USER)
        # setup.log gets the tools' output (written by us); server.log is the postmaster's own
        # (by postgres, so it must not exist beforehand with our ownership).
        self.data = self.root / "data"
        self.log, self.server_log = self.root / "setup.log", self.root / "server.log"
        self.port = _free_port()
        self.running = False
        self.settings: dict[str, str] = {}  # server settings of one test module (max_connections)

    def init(self) -> None:
        _run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, "-E", "UTF8",
              "--auth-local=trust", "--auth-host=trust", "--no-sync", "--no-instructions"],
             cwd=self.root, log=self.log)

    def start(self) -> None:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "200",  # 8 worker processes, each with its own pool, plus tests
            "fsync": "off",            # durability is worthless for a throwaway server
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        self.running = True  # from here on a half-started server must still be stopped
        _run([str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l",
              str(self.server_log), "-w", "-t", "60", "-o", options], cwd=self.root, log=self.log)

    def stop(self, mode: str = "fast") -> None:
        _run([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w",
              "-t", "60"], cwd=self.root, log=self.log)
        self.running = False

    def create_database(self, name: str) -> str:
        conn = _admin_connect(self.port)  # not "with conn": psycopg2 would open a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return _url(self.port, name)

    def close(self) -> None:
        if self.running:
            subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "stop", "-D",
                                         str(self.data), "-m", "immediate", "-w", "-t", "60"]),
                           cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL, timeout=90)
        shutil.rmtree(self.root, ignore_errors=True)


def _require_pg_bindir() -> Path:
    bindir = _find_pg_bindir()
    if bindir is None:
        reason = ("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                  "(apt-get install postgresql)")
        if _in_ci():
            pytest.fail(f"CI must test against real PostgreSQL: {reason}", pytrace=False)
        pytest.skip(reason)
    return bindir


@pytest.fixture(scope="session")
def postgres_server():
    """(port, bindir) of a PostgreSQL server that lives for the whole test session."""
    server = PostgresServer(_require_pg_bindir())
    try:
        server.init()
        server.start()
        server.create_database(PG_DB)
        yield server.port, server.bindir
    finally:
        server.close()


@pytest.fixture(scope="module")
def private_postgres():
    """A ``PostgresServer`` of this test module alone, which its tests may stop and start.

    The session server is shared by every test; stopping it would fail the others.
    """
    server = PostgresServer(_require_pg_bindir(), prefix="nkat-pg-private-")
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """SQLAlchemy URL of the session database ``nkat_test`` (shared by all tests)."""
    port, _ = postgres_server
    return _url(port, PG_DB)


@pytest.fixture
def fresh_postgres_url(postgres_server):
    """SQLAlchemy URL of a new empty database for one test, so studies never leak between tests."""
    port, _ = postgres_server
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = _admin_connect(port)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield _url(port, name)
        # FORCE ends connections a test left open (worker subprocesses, pooled engines).
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


@pytest.fixture(scope="session")
def benchmark_script():
    """``load(name)``: ``benchmarks/NAME.py`` imported as a module, once per session (the
    benchmarks are scripts, not a package)."""
    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(
                name, REPO_ROOT / "benchmarks" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]
    return load


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The dataset root: $NKAT_DATA_DIR, else <repo>/../shared/datasets.

    Absent, the tests that train skip on a developer's machine and fail under CI=true: a CI run
    that skipped every test with data would pass without having tested anything.
    """
    env = os.environ.get("NKAT_DATA_DIR")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "datasets"
    path = path.resolve()
    if not path.is_dir():
        missing_data(f"dataset dir {path} not found (set NKAT_DATA_DIR)")
    return path


def missing_data(reason: str) -> None:
    """Skip a test that needs data, except under CI, where the missing data fails it."""
    if _in_ci():
        pytest.fail(f"CI must test with the datasets: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Point NKAT_CACHE_DIR at a session temp dir so tests never write into the home directory."""
    previous = os.environ.get("NKAT_CACHE_DIR")
    os.environ["NKAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("nkat-cache"))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("NKAT_CACHE_DIR", None)
        else:
            os.environ["NKAT_CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def _no_network():
    """Every HTTP(S) request of the tests and their subprocesses goes to a closed local port.

    Tests never reach the network (a download nobody asked for fails fast and shows as a failed
    test, not as a 560 MB fetch). urllib, which torchvision's downloads use, honours these
    variables in every child process; loopback (the dashboard tests) is left direct.
    """
    closed = "http://127.0.0.1:9"
    names = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
    previous = {name: os.environ.get(name) for name in names}
    for name in names[:4]:
        os.environ[name] = closed
    for name in names[4:]:
        os.environ[name] = "127.0.0.1,localhost,::1"
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
