"""The Docker deployment, checked without a Docker engine (CI has none).

Every compose file is validated against the compose specification's JSON schema with
check-jsonschema (schema vendored in tests/schemas/), and read as YAML for the promises the files
make: no password anywhere but in the secret file, start order, one worker container per host
with every GPU, a graceful stop, MPS in the worker container, loopback-only dashboard, a database
published only on purpose, the worker of other hosts equal to the main one. The commands are
parsed by nkat-search's own parser, the healthchecks run as real processes, the Dockerfile goes
through hadolint and the scripts through shellcheck. When a
Compose v2 client is installed, `docker compose config` validates the files too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nkat_search.cli.main import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
WORKER_FILE = REPO / "docker-compose.worker.yml"
PUBLISH_FILE = REPO / "docker-compose.publish-db.yml"
COMPOSE_FILES = sorted(REPO.glob("docker-compose*.yml"))
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "workers" / "Dockerfile"
SCHEMA = REPO / "tests" / "schemas" / "compose-spec.json"
SECRET = "postgres_password"
APP_SERVICES = ("coordinator", "worker", "dashboard", "exporter")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR; "$$" is a literal "$".
VAR_REF = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_]\w*)([:]?[-?+])?[^}]*\}|([A-Za-z_]\w*))")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # resolves the << merge keys of x-app


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def remote_worker() -> dict:
    return load(WORKER_FILE)["services"]["worker"]


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


def mappings(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from mappings(value)
    elif isinstance(node, list):
        for item in node:
            yield from mappings(item)


def with_defaults(text: str) -> str:
    """Compose's interpolation with nothing set: ${VAR:-default} becomes default."""
    return re.sub(r"\$\{[A-Za-z_]\w*:?-([^}]*)\}", r"\1", text)


def command_words(service: dict, key: str = "command", defaults: bool = False) -> list[str]:
    """The argv Compose makes of a command: a string is interpolated first, then split (so an
    empty ${VAR:-} adds no argument); a list item is one argument whatever it holds."""
    command = service.get(key, [])
    if isinstance(command, str):
        return (with_defaults(command) if defaults else command).split()
    return [with_defaults(str(w)) if defaults else str(w) for w in command]


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


def all_services() -> list[tuple[str, str, dict]]:
    return [(path.name, name, service) for path in COMPOSE_FILES
            for name, service in (load(path).get("services") or {}).items()]


# -- the compose specification ---------------------------------------------------------------

def check_jsonschema(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMA),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def test_every_compose_file_follows_the_compose_specification():
    assert {COMPOSE_FILE, WORKER_FILE, PUBLISH_FILE} <= set(COMPOSE_FILES)
    done = check_jsonschema(*COMPOSE_FILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_rejects_a_misspelt_key(tmp_path):
    # The check above can fail: a key the specification does not know is an error.
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_periodd:"))
    done = check_jsonschema(bad)
    assert done.returncode == 1 and "stop_grace_periodd" in done.stdout, done.stdout


# -- secrets -------------------------------------------------------------------------------

def test_no_password_in_any_compose_file_or_container_environment():
    for path in [*COMPOSE_FILES, ENV_EXAMPLE]:
        text = path.read_text()
        assert "change-me" not in text, path.name
        assert not re.search(r"://[^/@\s\"':]+:[^@\s\"']*@", text), f"{path.name}: user:pw@ URL"
    for file, name, service in all_services():
        for env in mappings(service.get("environment", {})):
            for key, value in env.items():
                if "PASSWORD" in str(key).upper():
                    assert str(key).endswith("_PASSWORD_FILE"), (file, name, key)
                    assert value == f"/run/secrets/{SECRET}", (file, name, key, value)
    assert "POSTGRES_PASSWORD" not in env_example_vars()


def test_the_password_is_one_secret_file_that_postgres_and_every_client_mount():
    for path in (COMPOSE_FILE, WORKER_FILE):
        compose = load(path)
        assert compose["secrets"][SECRET] == {
            "file": "${NKAT_DB_PASSWORD_FILE:-./secrets/postgres_password}"}, path.name
        for name, service in compose["services"].items():
            env = service.get("environment", {})
            uses = "NKAT_STORAGE" in env or "POSTGRES_PASSWORD_FILE" in env
            assert uses == (SECRET in service.get("secrets", [])), (path.name, name)
            if "NKAT_STORAGE" in env:
                assert env["NKAT_STORAGE_PASSWORD_FILE"] == f"/run/secrets/{SECRET}", name
    assert load(COMPOSE_FILE)["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] \
        == f"/run/secrets/{SECRET}"
    assert env_example_vars()["NKAT_DB_PASSWORD_FILE"] == "./secrets/postgres_password"


def test_the_storage_url_travels_in_the_environment_not_the_command_line(services, remote_worker):
    # A command line is visible to every user of the host.
    for name in APP_SERVICES:
        assert "--storage" not in command_words(services[name]), name
        assert "@postgres:5432/" in services[name]["environment"]["NKAT_STORAGE"], name
    assert "--storage" not in command_words(remote_worker)
    assert remote_worker["environment"]["NKAT_STORAGE"].startswith("${NKAT_STORAGE:?")


def test_dot_env_and_secrets_are_git_ignored():
    patterns = (REPO / ".gitignore").read_text().split()
    assert ".env" in patterns or "/.env" in patterns
    assert "/secrets/" in patterns or "secrets/" in patterns


def test_the_build_context_is_what_the_dockerfile_copies():
    from docker.utils.build import exclude_paths

    context = exclude_paths(str(REPO), (REPO / ".dockerignore").read_text().splitlines(),
                            dockerfile="workers/Dockerfile")
    for kept in ("pyproject.toml", "nkat_search/cli/main.py", "studies/round2.yaml",
                 "workers/smoke_check.py"):
        assert kept in context, kept
    for path in context:
        assert path.split("/")[0] in {"pyproject.toml", "nkat_search", "studies", "workers",
                                      ".dockerignore"}, f"{path} would be sent to the builder"
        assert "__pycache__" not in path and not path.endswith(".pyc"), path


# -- start order, GPUs, scaling, stopping --------------------------------------------------

def test_postgres_has_healthcheck_and_named_volume(compose, services):
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(strings(postgres["healthcheck"]["test"]))
    named = [v.split(":")[0] for v in postgres["volumes"] if not v.startswith((".", "/", "$"))]
    assert named, "postgres data must live in a named volume"
    assert set(named) <= set(compose.get("volumes", {}))


def test_start_order(services):
    assert depends_on(services["coordinator"])["postgres"]["condition"] == "service_healthy"
    assert str(services["coordinator"].get("restart")) == "no"
    assert (depends_on(services["worker"])["coordinator"]["condition"]
            == "service_completed_successfully")
    # A failed coordinator must not keep the dashboard (which shows every study) from starting.
    assert depends_on(services["dashboard"]) == {"postgres": {"condition": "service_healthy"}}


@pytest.mark.parametrize("path", [COMPOSE_FILE, WORKER_FILE], ids=lambda p: p.name)
def test_one_worker_container_per_host_takes_every_gpu(path):
    worker = load(path)["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    # Docker hands replicas that reserve `count: 1` the same first card (docker/compose#11863), so
    # one container takes all GPUs of its host and `--device all` starts a worker per GPU.
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and d.get("count") == "all" for d in devices)
    command = command_words(worker)
    assert command[command.index("--device") + 1] == "all"
    # K is the worker's own default unless NKAT_WORKER_ARGS says otherwise.
    assert "--trials-per-gpu" not in command and command[-1] == "${NKAT_WORKER_ARGS:-}"
    # A fixed name is what makes Compose refuse `--scale worker=N` (and a second copy from the
    # other file on this host): "Remove the custom name to scale the service".
    assert worker["container_name"] == "nkat-worker"
    assert "replicas" not in worker["deploy"] and "scale" not in worker
    assert worker["environment"]["NKAT_DATA_DIR"] == "/data"
    assert any(str(v).endswith(":/data:ro") for v in worker["volumes"]), "data must be read-only"


def parse_duration(text: str) -> float:
    """A Compose (Go) duration such as 10m, 1m30s, 90s in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("path", [COMPOSE_FILE, WORKER_FILE], ids=lambda p: p.name)
def test_a_stopped_worker_gets_time_to_checkpoint(path):
    worker = load(path)["services"]["worker"]
    grace = worker["stop_grace_period"]
    assert grace.startswith("${NKAT_STOP_GRACE_PERIOD:-")
    # Docker's default is 10 s. The stop is seen after the current step, which may come after a
    # compile: up to 80 s measured for a cold architecture (docker-compose.yml's comment); twice
    # that at least.
    assert parse_duration(with_defaults(grace)) >= 2 * 80
    assert parse_duration(env_example_vars()["NKAT_STOP_GRACE_PERIOD"]) >= 2 * 80
    # An init as PID 1 hands the SIGTERM to the worker, which then checkpoints.
    assert worker["init"] is True


@pytest.mark.parametrize("path", [COMPOSE_FILE, WORKER_FILE], ids=lambda p: p.name)
def test_mps_is_the_workers_own_with_a_fresh_pipe_directory(path):
    worker = load(path)["services"]["worker"]
    command = command_words(worker)
    assert command[command.index("--mps") + 1] == "${NKAT_MPS:-off}"
    assert env_example_vars()["NKAT_MPS"] == "off"  # measured: it starves small trials
    env = worker["environment"]
    # The worker starts the daemon with its pipes here, a tmpfs: no stale socket after a restart.
    assert {env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]} <= set(worker["tmpfs"])
    # No ipc: host needed: the daemon and the workers share the container's IPC namespace.
    assert "ipc" not in worker and "entrypoint" not in worker


@pytest.mark.parametrize("path", [COMPOSE_FILE, WORKER_FILE], ids=lambda p: p.name)
def test_the_caches_are_on_volumes(path):
    compose = load(path)
    mounts = dict(v.split(":")[1::-1] for v in compose["services"]["worker"]["volumes"])
    dockerfile = DOCKERFILE.read_text()
    for variable, volume in [("NKAT_CACHE_DIR", "data-cache"),
                             ("TORCHINDUCTOR_CACHE_DIR", "compile-cache"),
                             ("TRITON_CACHE_DIR", "compile-cache")]:
        value = re.search(rf"\b{variable}=(\S+)", dockerfile).group(1)
        parents = [target for target, source in mounts.items()
                   if source == volume and (value + "/").startswith(target + "/")]
        assert parents, f"{variable}={value} is not on the {volume} volume"
        assert volume in compose["volumes"]
    assert mounts["/app/runs"] == "checkpoints"


@pytest.mark.parametrize("path", [COMPOSE_FILE, WORKER_FILE], ids=lambda p: p.name)
def test_the_checkpoint_store_is_a_host_folder_the_worker_is_told_of(path):
    """NKAT_CHECKPOINT_STORE reaches the worker (empty: none), and /checkpoint-store is the host's
    NKAT_HOST_CHECKPOINT_STORE, the folder to mount from a file server every host shares."""
    worker = load(path)["services"]["worker"]
    assert worker["environment"]["NKAT_CHECKPOINT_STORE"] == "${NKAT_CHECKPOINT_STORE:-}"
    assert "${NKAT_HOST_CHECKPOINT_STORE:-./checkpoint-store}:/checkpoint-store" in worker["volumes"]
    env_example = (REPO / ".env.example").read_text()
    assert "\nNKAT_CHECKPOINT_STORE=\n" in env_example
    assert "\nNKAT_HOST_CHECKPOINT_STORE=" in env_example


def test_the_worker_of_other_hosts_is_the_main_worker(services, remote_worker):
    main = dict(services["worker"])
    remote = dict(remote_worker)
    assert "coordinator" in main.pop("depends_on") and "depends_on" not in remote
    main_env, remote_env = dict(main.pop("environment")), dict(remote.pop("environment"))
    assert main_env.pop("NKAT_STORAGE").startswith("postgresql+psycopg2://")
    assert remote_env.pop("NKAT_STORAGE").startswith("${NKAT_STORAGE:?")
    assert main_env == remote_env
    assert main == remote


def test_the_database_is_published_only_on_purpose(services):
    assert "ports" not in services["postgres"], "docker-compose.publish-db.yml publishes it"
    ports = load(PUBLISH_FILE)["services"]["postgres"]["ports"]
    # The address must be named: no default that would put the database on every interface.
    assert ports == ["${NKAT_DB_PUBLISH_ADDRESS:?set NKAT_DB_PUBLISH_ADDRESS in .env to the "
                     "address the worker hosts reach this host on}:${NKAT_DB_PORT:-5432}:5432"]


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


def test_services_that_run_long_have_healthchecks(services, remote_worker):
    for service in (services["postgres"], services["worker"], services["dashboard"],
                    remote_worker):
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")


# -- the commands are real -----------------------------------------------------------------

def test_coordinator_workers_and_exporter_use_one_study_name(services, remote_worker):
    def study_name(command):
        flag = "--name" if "create" in command else "--study"
        return command[command.index(flag) + 1]

    names = {study_name(command_words(s, defaults=True))
             for s in (services["coordinator"], services["worker"], services["exporter"],
                       remote_worker)}
    names.add(study_name(command_words({"command": services["worker"]["healthcheck"]["test"]},
                                       defaults=True)))
    assert len(names) == 1, names


def nkat_commands():
    """(where, argv after 'nkat-search') of every nkat-search command in every compose file."""
    found = []
    for file, name, service in all_services():
        for key, words in (("command", command_words(service, defaults=True)),
                           ("healthcheck", command_words(service.get("healthcheck", {}), "test",
                                                         defaults=True))):
            for i, word in enumerate(words):
                if word == "nkat-search":
                    found.append((f"{file}:{name}:{key}", words[i + 1:]))
    return found


def test_every_nkat_search_command_parses(monkeypatch):
    # The real parser, so an unknown flag (not only an unknown subcommand) fails here, not in a
    # container that restarts forever.
    monkeypatch.setenv("NKAT_STORAGE", "postgresql+psycopg2://nkat@postgres:5432/nkat")
    monkeypatch.delenv("NKAT_STORAGE_PASSWORD_FILE", raising=False)
    known = {name for name, _, _ in COMMANDS}
    used = set()
    for where, argv in nkat_commands():
        assert argv[0] in known, f"{where}: unknown subcommand {argv[0]!r}"
        used.add(argv[0])
        build_parser(argv[0]).parse_args(argv)  # argparse exits on an unknown flag
    assert {"study", "worker", "dashboard", "export"} <= used


def test_the_worker_healthcheck_passes_only_when_the_study_is_there(fresh_postgres_url, services):
    test = services["worker"]["healthcheck"]["test"]
    argv = [with_defaults(w) for w in test[test.index("nkat-search") + 1:]]
    env = dict(os.environ, NKAT_STORAGE=fresh_postgres_url)
    env.pop("NKAT_STORAGE_PASSWORD_FILE", None)

    def check() -> int:
        return subprocess.run([sys.executable, "-m", "nkat_search", *argv], env=env,
                              capture_output=True, timeout=60).returncode

    assert check() != 0, "healthy without a study"
    # The coordinator's own command, as the compose file runs it (studies/ is /app/studies there).
    create = [w.replace("/app/studies/", f"{REPO}/studies/")
              for w in command_words(services["coordinator"], defaults=True)]
    created = subprocess.run([sys.executable, "-m", "nkat_search", *create[1:]], env=env,
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    assert check() == 0


def test_the_dashboard_healthcheck_sees_a_served_dashboard(services, tmp_path):
    import optuna

    from nkat_search.cli.commands.dashboard import find_free_port

    test = services["dashboard"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    port = find_free_port("127.0.0.1", 18280)
    argv = [sys.executable, *[w.replace(":8080/", f":{port}/") for w in test[2:]]]
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    optuna.create_study(study_name="s", storage=url)
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode != 0, "nothing served"
    log = (tmp_path / "dashboard.log").open("wb")
    dashboard = subprocess.Popen([sys.executable, "-m", "nkat_search", "dashboard", "--storage",
                                  url, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(argv, capture_output=True, timeout=30).returncode != 0:
            assert dashboard.poll() is None, (tmp_path / "dashboard.log").read_text()
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(0.5)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)


def test_env_example_defines_every_required_variable():
    defined = env_example_vars()
    required = set()
    for path in COMPOSE_FILES:
        for match in VAR_REF.finditer("\n".join(strings(load(path)))):  # parsed: no comments
            name, operator, bare = match.groups()
            if bare or operator is None or "?" in operator:
                required.add(name or bare)
    missing = required - set(defined)
    assert not missing, f".env.example lacks {sorted(missing)}"
    # Set on purpose or not at all: empty, so the ${VAR:?} in the files stops Compose.
    assert defined["NKAT_DB_PUBLISH_ADDRESS"] == "" and defined["NKAT_STORAGE"] == ""


# -- the image -----------------------------------------------------------------------------

def test_dockerfile_copies_existing_paths_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^ENTRYPOINT\b", text, re.M), "compose gives the command"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    for line in text.splitlines():
        if line.startswith("COPY "):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_the_image_has_the_torch_ci_tests_and_a_compiler():
    text = DOCKERFILE.read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf"^ARG {arg}=(\S+)$", text, re.M).group(1)
        assert f"{package}=={pinned}" in ci, f"{package} {pinned} is not what .ci/run installs"
    # torch.compile: Inductor's C++ and Triton's launchers need a compiler in the image.
    apt = re.search(r"apt-get install[^\n]*", text).group(0).split()
    assert {"gcc", "g++"} <= set(apt)
    assert "-runtime" not in re.search(r"^FROM\s+(\S+)", text, re.M).group(1)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' brings it", pytrace=False)
    return path


def test_hadolint_accepts_the_dockerfile():
    done = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_accepts_the_worker_scripts():
    scripts = sorted((REPO / "workers").glob("*.sh"))
    assert REPO / "workers" / "smoke.sh" in scripts
    done = subprocess.run([tool("shellcheck"), "-s", "sh", *map(str, scripts)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- a real Compose client, where one is installed -----------------------------------------

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


def test_docker_compose_config_accepts_the_files(tmp_path):
    client = _compose_client()
    if client is None:
        pytest.skip("no Docker Compose v2 client installed")
    secret = tmp_path / "postgres_password"
    secret.write_text("x\n")
    # The two that .env.example leaves empty on purpose, as a user sets them.
    env = dict(os.environ, NKAT_DB_PASSWORD_FILE=str(secret), NKAT_DB_PUBLISH_ADDRESS="10.0.0.1",
               NKAT_STORAGE="postgresql+psycopg2://nkat@10.0.0.1:5432/nkat")
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, PUBLISH_FILE], [WORKER_FILE]):
        base = [*client, "--project-directory", str(REPO),
                *[arg for f in files for arg in ("-f", str(f))]]
        ok = subprocess.run([*base, "--env-file", str(ENV_EXAMPLE), "config", "-q"],
                            capture_output=True, text=True, env=env)
        assert ok.returncode == 0, ok.stderr
    # Without .env the database user must be demanded, not silently empty.
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "NKAT_"))}
    bare = subprocess.run([*client, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE),
                           "--env-file", "/dev/null", "config", "-q"],
                          capture_output=True, text=True, env=clean_env)
    assert bare.returncode != 0 and "POSTGRES_" in bare.stderr, bare.stderr
