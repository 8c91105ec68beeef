"""Study storage: PostgreSQL (the service) or SQLite (one machine), both Optuna ``RDBStorage``.

Both get Optuna's heartbeat: a running trial whose worker stops beating for ``grace_period``
seconds is marked FAIL by the next worker that asks for a trial (``fail_stale_trials`` here, which
also writes why), and ``RetryStaleTrial`` queues a copy of it (same parameters, linked to the
original) that any worker then picks up.

A wrong URL is the user's to fix, so every connection problem at start-up becomes one
``UserError`` line that names the URL (password masked) and the likely fix. Once a worker is
running, a lost connection is an outage, not a mistake: workers open a ``ResilientRDBStorage``,
whose calls wait for the database to come back (with backoff, for a bounded time) instead of
failing the trial that happened to be talking to it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import os
import sqlite3
import threading
import time
import urllib.parse
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nkat_search.config import STORAGE_WAIT_S
from nkat_search.errors import UserError

POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")
SQLITE_SCHEME = "sqlite"
# A worker blocked on another's write must wait, not fail: trials write rarely but the heartbeat
# thread and several workers share one SQLite file.
SQLITE_TIMEOUT_S = 60
POSTGRES_CONNECT_TIMEOUT_S = 10
# TCP keepalives: a connection whose server vanished without a reset (a cut network, a host that
# died) is noticed within idle + interval * count seconds instead of the kernel's two hours.
POSTGRES_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                       "keepalives_count": 3}
# A worker process's connections to PostgreSQL: the study lock's (a session advisory lock, held
# from ``ask`` until the trial's parameters are drawn) and one that the trial's calls and its
# heartbeat thread take turns on (each call holds it for milliseconds). SQLAlchemy's default pool
# (5 + 10 overflow) and a second engine for reading the study file let one process hold 4-5, so a
# host of 8 GPUs at 4 trials each opened about 150 against PostgreSQL's default max_connections
# of 100.
WORKER_CONNECTIONS = 2
# How long a call waits for the pool's connection before it counts as an outage (retried).
POOL_WAIT_S = 30
RETRY_FIRST_S, RETRY_MAX_S = 0.25, 2.0
# System attr of a queued retry: the faults (not polite stops) in its chain so far.
FAULTS_ATTR = "retry_faults"


class StorageError(UserError):
    """The storage URL is wrong or the database cannot be reached; the message names the fix."""


class StorageUnavailable(StorageError):
    """A running worker lost the storage for longer than it waits (``--storage-wait``)."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print and log).

    The user part ends at the *last* ``@`` before the host, so a password with an unencoded ``@``
    is masked whole (SQLAlchemy would cut it at the first one; ``check_url`` refuses such URLs).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{tail}"


def check_url(url: str) -> None:
    """Refuse URLs that the driver would misread in a way that prints part of the password."""
    _, sep, rest = url.partition("://")
    netloc = rest.partition("/")[0] if sep else ""
    if netloc.count("@") > 1:
        raise StorageError(
            f"storage URL {mask_url(url)}: the user or password contains '@'; write it as %40 "
            "(postgresql+psycopg2://user:pass%40word@host:5432/db)")


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = 2, outage_s: float | None = None,
                 storage_class=optuna.storages.RDBStorage, connections: int | None = None):
    """An ``optuna.storages.RDBStorage`` for ``url``, with heartbeat and retries when asked.

    ``heartbeat_interval=None`` opens the storage without heartbeat (the coordinator and read-only
    commands); workers pass the study file's interval, grace and max_retry, and ``outage_s``: how
    long each storage call waits for a database that went away (a ``ResilientRDBStorage``).
    ``connections`` bounds the PostgreSQL connections this storage ever holds at once (workers
    pass ``WORKER_CONNECTIONS``; None: SQLAlchemy's default pool).
    """
    given = url
    check_url(url)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    engine_kwargs: dict = {}
    if scheme in POSTGRES_SCHEMES:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        # pre_ping: a trial can run for an hour between writes, and a database restart leaves
        # every pooled connection dead; each checkout tests its connection and replaces it.
        engine_kwargs = {"pool_pre_ping": True,
                         "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S,
                                          **POSTGRES_KEEPALIVES}}
        if connections is not None:
            engine_kwargs.update(pool_size=connections, max_overflow=0, pool_timeout=POOL_WAIT_S)
    elif scheme == SQLITE_SCHEME:
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        raise StorageError(
            f"storage URL {mask_url(url)}: unsupported scheme {scheme or '(none)'!r}; use "
            "postgresql+psycopg2://user:password@host:5432/db or sqlite:///path/study.db"
        )
    callback = None
    if heartbeat_interval is not None:
        callback = RetryStaleTrial(max_retry=max_retry, inherit_intermediate_values=True)
    kind = storage_class
    extra = {}
    if outage_s is not None:
        kind, extra = ResilientRDBStorage, {"outage_s": outage_s, "given_url": given}
    with warnings.catch_warnings(), _schema_lock(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if scheme == SQLITE_SCHEME:
            # Under the lock too: switching a new file to WAL while another process creates the
            # schema failed at once with "database is locked" (1 in 30 pairs of `study create`).
            _prepare_sqlite(url)
        try:
            return kind(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period, heartbeat_stale_trial_callback=callback,
                        **extra)
        except Exception as err:  # driver, SQLAlchemy and Optuna errors all mean: fix the URL
            raise StorageError(_explain(given, err)) from None


@contextlib.contextmanager
def _schema_lock(url: str):
    """One process at a time opens a SQLite file: Optuna creates the schema on the first open,
    and two at once (two ``up`` on one new study) failed with "table trials already exists" or
    "UNIQUE constraint failed: alembic_version". A ``flock`` beside the database, released when
    the storage is open."""
    path = sqlite_path(url) if url.startswith(SQLITE_SCHEME + "://") else None
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".open-lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise StorageError(
            f"storage URL {url}: cannot create or open the SQLite file {path} ({err.strerror}); "
            "pick a writable path, e.g. sqlite:///runs/study.db") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prepare_sqlite(url: str) -> None:
    """Create the parent folder and switch the file to WAL, failing early on an unusable path.

    WAL lets readers (the dashboard, ``status``) work while a worker writes; the setting is stored
    in the file, so one connection here sets it for every later one.
    """
    path = sqlite_path(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as err:
        raise StorageError(
            f"storage URL {url}: cannot create or open the SQLite file {path} ({err}); pick a "
            "writable path, e.g. sqlite:///runs/study.db"
        ) from None


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, or None for an in-memory database."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/"):
        raise StorageError(f"storage URL {url}: use three slashes, sqlite:///relative/path.db or "
                           "sqlite:////absolute/path.db")
    rest = rest[1:].split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def _explain(url: str, err: Exception) -> str:
    masked = mask_url(url)
    text = " ".join(str(getattr(err, "orig", None) or err).split())
    lower = text.lower()
    if "does not exist" in lower and "database" in lower:
        database = url.rsplit("/", 1)[-1].split("?", 1)[0]
        fix = f"create it first (createdb {database}, or docker compose up starts one)"
    elif "too many clients" in lower or "connection slots are reserved" in lower:
        fix = (f"the server has no connection left (its max_connections); each worker process "
               f"holds at most {WORKER_CONNECTIONS}: run fewer workers, raise max_connections, or "
               "put a connection pooler such as PgBouncer (pool_mode = session) in front of it")
    elif "password authentication failed" in lower or "no password supplied" in lower:
        fix = "check the user and password in the URL"
    elif any(s in lower for s in ("connection refused", "could not connect", "timeout expired",
                                  "could not translate host name", "name or service not known")):
        fix = "is PostgreSQL running and are host and port right?"
    elif isinstance(err, ImportError) or "no module named" in lower:
        fix = "install the driver: pip install psycopg2-binary"
    elif "unable to open database file" in lower:
        fix = "pick a writable path, e.g. sqlite:///runs/study.db"
    else:
        fix = "check the URL (postgresql+psycopg2://user:password@host:5432/db or sqlite:///path.db)"
    reason = redact(text, url)[:300]
    return f"storage URL {masked}: cannot open it ({reason}); {fix}"


def redact(text: str, url: str) -> str:
    """``text`` with the URL's password (as written and percent-decoded) replaced by ``***``."""
    _, sep, rest = url.partition("://")
    userinfo = rest.partition("/")[0].rpartition("@")[0] if sep else ""
    password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
    for secret in {password, urllib.parse.unquote(password)}:
        if secret:
            text = text.replace(secret, "***")
    return text


# -- riding out outages ----------------------------------------------------------------------

def is_transient(err: BaseException | None) -> bool:
    """True when ``err`` (or what caused it) says the connection to the database was lost.

    Optuna wraps SQLAlchemy's errors (``StorageInternalError``), which wrap the driver's, so the
    whole chain is searched. Operational errors are the driver's "the server is not there /
    went away / is starting up" family; SQLite's include a lock held past its timeout.
    """
    import sqlalchemy.exc as sa

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError,
                            sa.TimeoutError, sqlite3.OperationalError)):
            return True
        if isinstance(err, sa.DBAPIError) and err.connection_invalidated:
            return True
        if type(err).__module__.startswith("psycopg2") and type(err).__name__ in (
                "OperationalError", "InterfaceError"):
            return True
        err = err.__cause__ or err.__context__
    return False


def reason(err: BaseException) -> str:
    """The first line of the innermost error of ``err``'s chain (the driver's own words)."""
    inner = err
    while inner.__cause__ is not None or getattr(inner, "orig", None) is not None:
        inner = getattr(inner, "orig", None) or inner.__cause__
    text = str(inner).strip().splitlines()
    return (text[0] if text else type(inner).__name__)[:200]


class StorageHealth:
    """When this process last lost and regained the storage; says so once per outage."""

    def __init__(self, url: str, wait_s: float):
        self._url, self.shown_url, self.wait_s = url, mask_url(url), wait_s
        self._lock = threading.Lock()
        self.down_since: float | None = None
        # A worker judges others' heartbeats only once it has itself been connected for a grace
        # period (see ``fail_stale_trials``); a fresh process counts as just connected.
        self.up_since = time.monotonic()
        self.outages = 0

    def failed(self, err: BaseException) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
            self.outages += 1
        print(f"storage {self.shown_url}: unreachable ({self.why(err)}); "
              f"waiting for it (up to {self.wait_s:.0f} s)", flush=True)

    def why(self, err: BaseException) -> str:
        """The driver's reason, password removed."""
        return redact(reason(err), self._url)

    def ok(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            now = time.monotonic()
            down, self.down_since, self.up_since = now - self.down_since, None, now
        print(f"storage {self.shown_url}: reachable again after {down:.1f} s", flush=True)

    def up_for(self) -> float:
        """Seconds this process has had a working storage (0 while it has none)."""
        with self._lock:
            return 0.0 if self.down_since is not None else time.monotonic() - self.up_since


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose calls wait out an outage: retried with backoff for ``outage_s``.

    Written here because Optuna has no retry layer: its ``RDBStorage`` raises on the first lost
    connection, and ``study.optimize`` then fails the trial (or, when ``tell`` is the call that
    fails, dies with ``UnboundLocalError``). Only the outermost call retries (Optuna's methods
    call each other). A retried ``set_trial_state_values`` whose first attempt was committed but
    not acknowledged finds the state already set and returns True.

    ``interrupt_check``, when set, is called between attempts and after each call: the trial
    heartbeat uses it to stop a trial blocked on the storage (see ``heartbeat.py``).
    """

    def __init__(self, *args, outage_s: float = STORAGE_WAIT_S, given_url: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.outage_s = outage_s
        self.health = StorageHealth(given_url or str(self.url), outage_s)
        self.interrupt_check = None
        self._local = threading.local()
        self._beatless: dict[int, float] = {}

    def in_call(self) -> bool:
        """True while this thread is inside a storage call (the heartbeat waits until it ends)."""
        return bool(getattr(self._local, "active", False))

    def retry(self, fn, name: str = ""):
        """``fn()``, retried through an outage like every storage method."""
        if self.in_call():
            return fn()
        self._local.active = True
        try:
            return self._retry(fn, name)
        finally:
            self._local.active = False

    def _retry(self, fn, name: str):
        delay, deadline, attempts = RETRY_FIRST_S, None, 0
        while True:
            try:
                result = fn()
            except optuna.exceptions.UpdateFinishedTrialError:
                if not (attempts and name == "set_trial_state_values"):
                    raise
                result = None  # resolved below: was the lost attempt committed?
            except Exception as err:
                if not is_transient(err):
                    raise
                self.health.failed(err)
                now = time.monotonic()
                deadline = deadline or now + self.outage_s
                if now >= deadline:
                    raise StorageUnavailable(
                        f"storage {self.health.shown_url}: unreachable for {self.outage_s:.0f} s "
                        f"({self.health.why(err)}); the worker stops "
                        "(--storage-wait sets how long it waits)") from None
                self._interrupt()
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay, attempts = min(2 * delay, RETRY_MAX_S), attempts + 1
                self._interrupt()
                continue
            self.health.ok()
            self._interrupt()
            return result

    def _interrupt(self) -> None:
        if self.interrupt_check is not None:
            self.interrupt_check()

    def _beatless_stale_ids(self, study_id: int) -> list[int]:
        """RUNNING trials that never recorded a heartbeat, seen so by this process for a grace.

        Optuna's stale check skips them, so a worker that died between ``ask`` and its first
        heartbeat would leave a RUNNING trial that no one ever fails. Judged by this process's
        own clock: ``datetime_start`` comes from the clock of whichever host asked.
        """
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        def query() -> list[int]:
            with _create_scoped_session(self.scoped_session) as session:
                rows = (session.query(models.TrialModel.trial_id)
                        .outerjoin(models.TrialHeartbeatModel,
                                   models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                        .filter(models.TrialModel.study_id == study_id,
                                models.TrialModel.state == TrialState.RUNNING,
                                models.TrialHeartbeatModel.trial_id.is_(None))
                        .all())
            return [row[0] for row in rows]

        now, grace = time.monotonic(), self.grace_period or 2 * self.heartbeat_interval
        ids = self.retry(query, "_beatless_stale_ids")
        self._beatless = {i: self._beatless.get(i, now) for i in ids}
        return [i for i, seen in self._beatless.items() if now - seen > grace]


def _retrying(name: str):
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        result = self.retry(lambda: method(self, *args, **kwargs), name)
        if result is None and name == "set_trial_state_values":
            # A retry after a lost acknowledgement: the first attempt did it if the state is set.
            trial_id = args[0] if args else kwargs["trial_id"]
            state = args[1] if len(args) > 1 else kwargs["state"]
            if self.get_trial(trial_id).state != state:
                raise optuna.exceptions.UpdateFinishedTrialError(
                    f"trial {trial_id} was finished by another worker")
            return True
        return result

    return call


# Every storage method Optuna's study and its cache layer call (the cache calls private ones).
_RETRIED = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_all_studies", "create_new_trial", "_create_new_trial",
    "set_trial_param", "_set_trial_param", "get_trial_param", "set_trial_state_values",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials",
    "get_best_trial", "_get_best_trial_id", "get_n_trials", "record_heartbeat",
    "_get_stale_trial_ids",
)
for _name in _RETRIED:
    setattr(ResilientRDBStorage, _name, _retrying(_name))


def backend(storage):
    """The ``RDBStorage`` under Optuna's per-study cache (``study._storage``)."""
    return getattr(storage, "_backend", storage)


# -- retries: faults count, polite stops do not ----------------------------------------------

# Optuna 4.9 renamed RetryFailedTrialCallback to RetryHeartbeatStaleTrialCallback; the old name
# still works but warns on every use.
_RetryBase = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
    optuna.storages.RetryFailedTrialCallback


class RetryStaleTrial(_RetryBase):
    """Optuna's retry callback, with ``max_retry`` counting faults instead of attempts.

    Optuna counts every attempt of a chain (``retry_history``) against ``max_retry``. Here a copy
    queued after a *polite stop* (SIGTERM, Ctrl-C, ``up`` stopping, a storage outage the worker
    survived) does not count: it is the same configuration resumed, and two stops must not drop
    it. Faults do count (a worker that went silent, out of GPU memory): the copy carries the
    chain's fault count in the system attr ``retry_faults``. Chains queued before this rule have
    no such attr and count each attempt, as Optuna did.

    The copy starts clean: the dead run's ``outcome`` and ``error`` describe the crash, not the
    retry, and the objective sets every attribute again. Parameters, the link to the original
    (``failed_trial``, read by ``retried_trial_number``) and the intermediate values are kept.
    """

    def __init__(self, max_retry: int | None = None, inherit_intermediate_values: bool = True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(max_retry=max_retry,
                             inherit_intermediate_values=inherit_intermediate_values)

    @property
    def max_retry(self) -> int | None:
        return self._max_retry

    def __call__(self, study, trial) -> None:
        """The heartbeat's callback: a silent worker is a fault."""
        self.requeue(study, trial, counted=True)

    @staticmethod
    def faults(trial) -> int:
        """Faults in ``trial``'s chain before ``trial`` itself ended."""
        attrs = trial.system_attrs
        return int(attrs.get(FAULTS_ATTR, len(attrs.get("retry_history", []))))

    def would_retry(self, trial, counted: bool = True) -> bool:
        return not counted or self._max_retry is None or self.faults(trial) + 1 <= self._max_retry

    def requeue(self, study, trial, counted: bool = True) -> int | None:
        """Queue a copy of the FAIL ``trial``; its number, or None when the retries are spent."""
        if not self.would_retry(trial, counted):
            return None
        trial = copy.deepcopy(trial)
        system_attrs = {"failed_trial": trial.number, **trial.system_attrs}
        system_attrs["retry_history"] = [*system_attrs.get("retry_history", []), trial.number]
        system_attrs[FAULTS_ATTR] = self.faults(trial) + (1 if counted else 0)
        template = optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={}, system_attrs=system_attrs,
            intermediate_values=trial.intermediate_values if self._inherit_intermediate_values
            else None)
        # study.add_trial, minus its return value of None: the caller prints the copy's number.
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
        return study._storage.get_trial_number_from_id(trial_id)


def retried_trial_number(trial) -> int | None:
    """The number of the first trial of a retry chain, or None when ``trial`` is no retry.

    Takes a ``FrozenTrial`` or a live ``Trial`` (which, since Optuna 5, no longer exposes its
    system attrs; the storage still has them).
    """
    if isinstance(trial, optuna.trial.FrozenTrial):
        system_attrs = trial.system_attrs
    else:
        system_attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    return system_attrs.get("failed_trial")


def fail_stale_trials(study) -> list[int]:
    """Dead workers' RUNNING trials -> FAIL with the reason written, then their retries queued.

    Optuna's ``fail_stale_trials`` is the model; this one differs in three ways. It writes
    ``outcome`` and ``error`` before the state changes (a FAIL trial takes no more attributes), so
    ``status`` can say why. It also fails RUNNING trials that never beat (see
    ``ResilientRDBStorage``). And it judges nobody until this process has had the storage for a
    grace period: after an outage every heartbeat is old, and live workers need that long to beat
    again. Call it under the ``StudyLock`` so that two workers never fail the same trial.
    """
    from nkat_search.search import trials as record

    storage = study._storage
    rdb = backend(storage)
    interval = rdb.get_heartbeat_interval()
    if interval is None:
        return []
    grace = rdb.grace_period or 2 * interval
    health = getattr(rdb, "health", None)
    if health is not None and health.up_for() < grace:
        return []
    stale = list(rdb._get_stale_trial_ids(study._study_id))
    if isinstance(rdb, ResilientRDBStorage):
        stale += [i for i in rdb._beatless_stale_ids(study._study_id) if i not in stale]
    callback = rdb.get_heartbeat_stale_trial_callback()
    failed = []
    for trial_id in stale:
        trial = storage.get_trial(trial_id)
        if trial.state != TrialState.RUNNING:
            continue
        retry = callback is not None and (not isinstance(callback, RetryStaleTrial)
                                          or callback.would_retry(trial))
        note = "retry queued" if retry else _spent(callback, trial)
        who = trial.user_attrs.get("worker", "its worker")
        error = (f"worker lost: no heartbeat from {who} for over {grace} s (killed, or cut off "
                 f"from the storage); {note}")
        try:
            for key, value in record.attrs_of(outcome="failed", error=error).items():
                storage.set_trial_user_attr(trial_id, key, value)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker (or another) finished it first
        failed.append(trial_id)
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))
    return failed


def _spent(callback, trial) -> str:
    if callback is None:
        return "not retried (no retry callback)"
    faults = RetryStaleTrial.faults(trial) + 1
    return (f"not retried: retries spent ({faults} faults, heartbeat.max_retry "
            f"{callback.max_retry}); the configuration has no result")


class StudyLock:
    """A lock held by one worker at a time, across machines, for a study's check-and-ask step.

    PostgreSQL: a session-level advisory lock (the server drops it with the connection, so a
    killed holder never blocks the others). SQLite: ``flock`` on a file beside the database
    (SQLite is one machine only). In-memory SQLite has a single process: no lock needed.
    ``release`` may be called more than once, and never fails: a connection the database lost
    took its lock with it. Taking the lock waits out an outage like any storage call.
    """

    def __init__(self, storage, study_name: str):
        self._url = str(storage.url)
        self._storage = storage
        self._engine = storage.engine
        self._key = zlib.crc32(f"nkat-search:{study_name}".encode()) - 2**31
        self._conn = None
        self._fd: int | None = None

    def acquire(self) -> None:
        scheme = self._url.split("://", 1)[0]
        if scheme in POSTGRES_SCHEMES:
            retry = getattr(self._storage, "retry", None)
            self._conn = retry(self._pg_lock, "lock") if retry else self._pg_lock()
            return
        path = sqlite_path(self._url) if scheme == SQLITE_SCHEME else None
        if path is not None:
            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd

    def _pg_lock(self):
        import sqlalchemy

        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self) -> None:
        if self._conn is not None:
            import sqlalchemy

            conn, self._conn = self._conn, None
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            except Exception:  # noqa: BLE001 - a dead connection's lock died with it
                pass
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
