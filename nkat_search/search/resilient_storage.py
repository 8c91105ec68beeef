"""A storage that rides out database outages (``ResilientRDBStorage``), how it tells an outage
from an error (``is_transient``) and how it says so (``StorageHealth``).

A wrong URL is a mistake (``storage_url.StorageError`` at start-up); once a worker is running, a
lost connection is an outage, not a mistake. Workers open a ``ResilientRDBStorage``, whose calls
wait for the database to come back (with backoff, for a bounded time) instead of failing the trial
that happened to be talking to it; ``StorageHealth`` says once per outage when it went and came
back.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time

import optuna
import sqlalchemy.exc as sa

from nkat_search.config import STORAGE_WAIT_S
from nkat_search.search import optuna_private
from nkat_search.search.storage_url import StorageError, mask_url, redact

RETRY_FIRST_S, RETRY_MAX_S = 0.25, 2.0


class StorageUnavailable(StorageError):
    """A running worker lost the storage for longer than it waits (``--storage-wait``)."""


def is_transient(err: BaseException | None) -> bool:
    """True when ``err`` (or what caused it) says the connection to the database was lost.

    Optuna wraps SQLAlchemy's errors (``StorageInternalError``), which wrap the driver's, so the
    whole chain is searched. Operational errors are the driver's "the server is not there /
    went away / is starting up" family; SQLite's include a lock held past its timeout.
    """
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

    def beatless_stale_ids(self, study_id: int) -> list[int]:
        """RUNNING trials that never recorded a heartbeat, seen so by this process for a grace.

        Optuna's stale check skips them, so a worker that died between ``ask`` and its first
        heartbeat would leave a RUNNING trial that no one ever fails. Judged by this process's
        own clock: ``datetime_start`` comes from the clock of whichever host asked.
        """
        now, grace = time.monotonic(), self.grace_period or 2 * self.heartbeat_interval
        ids = self.retry(lambda: optuna_private.running_trial_ids_without_heartbeat(self, study_id),
                         "beatless_stale_ids")
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
    "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
    "get_trial", "get_all_trials", "get_best_trial", "get_n_trials", "record_heartbeat",
    *optuna_private.CACHE_PRIVATE_CALLS,
)
for _name in _RETRIED:
    setattr(ResilientRDBStorage, _name, _retrying(_name))

