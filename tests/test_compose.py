"""Invariants of the Docker deployment, checked without a Docker engine.

CI has no engine, so the compose file is read as YAML and its promises are asserted: secrets only
from .env, start order, GPU reservations, loopback-only dashboard, real CLI subcommands. When a
Compose v2 client is installed, `docker compose config` validates the file against the spec too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nkat_search.cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "workers" / "Dockerfile"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR; "$$" is a literal "$".
VAR_REF = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_]\w*)([:]?[-?+])?[^}]*\}|([A-Za-z_]\w*))")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def strings(node):
    """Every string in a parsed YAML tree (values and keys)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def command_words(service: dict) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(word) for word in command]


def depends_on(service: dict) -> dict:
    deps = service.get("depends_on", {})
    return {name: {} for name in deps} if isinstance(deps, list) else deps


def env_example_vars() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: line without '=': {line!r}"
            values[key.strip()] = value.strip()
    return values


def test_postgres_has_healthcheck_and_named_volume(compose, services):
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(strings(postgres["healthcheck"]["test"]))
    named = [v.split(":")[0] for v in postgres["volumes"] if not v.startswith((".", "/", "$"))]
    assert named, "postgres data must live in a named volume"
    assert set(named) <= set(compose.get("volumes", {}))


def test_no_password_is_written_in_the_compose_file(compose):
    text = COMPOSE_FILE.read_text()
    assert "change-me" not in text
    substitution = re.compile(r"^\$\{[A-Za-z_]\w*(:?\?[^}]*)?\}$")
    for node in _mappings(compose):
        for key, value in node.items():
            if "PASSWORD" in str(key).upper():
                assert isinstance(value, str) and substitution.match(value), (key, value)
    # user:password@host in any URL must take the password from .env
    for url in re.findall(r"://[^@\s\"']*@", text):
        password = url[3:-1].partition(":")[2]
        assert password.startswith("${POSTGRES_PASSWORD"), url
    for ref in re.findall(r"\$\{?POSTGRES_PASSWORD[^}]*\}?", text):
        assert ref.startswith("${POSTGRES_PASSWORD:?"), f"no default may stand in for the password: {ref}"


def _mappings(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _mappings(item)


def test_start_order(services):
    assert depends_on(services["coordinator"])["postgres"]["condition"] == "service_healthy"
    assert str(services["coordinator"].get("restart")) == "no"
    assert (depends_on(services["worker"])["coordinator"]["condition"]
            == "service_completed_successfully")


def test_the_worker_reserves_every_gpu_and_runs_one_process_per_gpu(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    # Docker hands replicas that reserve `count: 1` the same first card (docker/compose#11863), so
    # one container takes all GPUs of its host and `--device all` starts a worker per GPU.
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and d.get("count") == "all" for d in devices)
    command = worker["command"]
    assert command[command.index("--device") + 1] == "all"
    assert "--trials-per-gpu" in command
    assert "NKAT_WORKERS" in str(worker["deploy"]["replicas"])
    assert worker["environment"]["NKAT_DATA_DIR"] == "/data"
    assert any(str(v).endswith(":/data:ro") for v in worker["volumes"]), "data must be read-only"


def test_coordinator_workers_and_exporter_use_one_study_name(services):
    def study_name(command):
        flag = "--name" if "create" in command else "--study"
        return command[command.index(flag) + 1]

    names = {study_name(services[s]["command"]) for s in ("coordinator", "worker", "exporter")}
    assert len(names) == 1, names


def test_the_storage_url_travels_in_the_environment_not_the_command_line(services):
    # A command line is visible to every user of the host; the URL carries the password.
    for name in ("coordinator", "worker", "dashboard", "exporter"):
        service = services[name]
        assert "--storage" not in service["command"], name
        assert "postgres" in str(service["environment"]["NKAT_STORAGE"]), name


def test_dashboard_binds_host_loopback_only(services):
    ports = services["dashboard"]["ports"]
    assert ports
    for port in ports:
        assert str(port).startswith("127.0.0.1:"), f"dashboard port {port!r} is not loopback-only"


def test_exporter_writes_to_an_exports_mount(services):
    exporter = services["exporter"]
    assert "export" in exporter.get("profiles", [])
    assert any(str(v).split(":")[1] == "/exports" for v in exporter["volumes"])
    assert "/exports" in command_words(exporter)


def test_every_nkat_search_subcommand_exists(services):
    known = {name for name, _, _ in COMMANDS}
    used = set()
    for name, service in services.items():
        words = command_words(service)
        for i, word in enumerate(words[:-1]):
            if word == "nkat-search":
                used.add(words[i + 1])
                assert words[i + 1] in known, f"{name}: unknown subcommand {words[i + 1]!r}"
    assert {"study", "worker", "dashboard", "export"} <= used


def test_env_example_defines_every_required_variable(compose):
    defined = env_example_vars()
    required = set()
    for match in VAR_REF.finditer("\n".join(strings(compose))):  # parsed: comments excluded
        name, operator, bare = match.groups()
        if bare or operator is None or "?" in operator:
            required.add(name or bare)
    missing = required - set(defined)
    assert not missing, f".env.example lacks {sorted(missing)}"
    assert defined["POSTGRES_PASSWORD"] == "change-me"


def test_dot_env_is_git_ignored():
    patterns = (REPO / ".gitignore").read_text().split()
    assert ".env" in patterns or "/.env" in patterns


def test_dockerfile_copies_existing_paths_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^ENTRYPOINT\b", text, re.M), "compose gives the command"
    assert re.search(r"^USER\s+(?!root\b)\S+", text, re.M), "the image must not run as root"
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:  # standalone v2 only; v1 does not know this spec
        probe = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return [standalone]
    return None


def test_docker_compose_config_accepts_the_file():
    client = _compose_client()
    if client is None:
        pytest.skip("no Docker Compose v2 client installed")
    base = [*client, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    ok = subprocess.run([*base, "--env-file", str(ENV_EXAMPLE), "config", "-q"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # Without .env the password must be demanded, not silently empty.
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
    bare = subprocess.run([*base, "--env-file", "/dev/null", "config", "-q"],
                          capture_output=True, text=True, env=clean_env)
    assert bare.returncode != 0 and "POSTGRES_" in bare.stderr, bare.stderr
