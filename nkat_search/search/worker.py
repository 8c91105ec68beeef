"""A worker: pull trials from a study and train them on one device until the budget is spent.

The budget (``n_trials`` of the study file) counts configurations, across every worker: each
trial except retries (see ``coordinator.budget_state``). Optuna's ``MaxTrialsCallback`` checks the
count only after a trial ends, so two workers finishing together would both start one more; here
the check and ``study.ask`` happen under one study-wide lock (``study_lock.StudyLock``), so the
count is exact. A trial's end (``tell``, and queueing its retry) happens under the same lock, so no
worker ever sees a stopped trial without its retry and concludes the study is done.

The trial loop is ask / objective / tell written out rather than ``study.optimize``: Optuna's loop
dies with ``UnboundLocalError`` when ``tell`` meets a lost database, and its heartbeat thread ends
silently at the first error (see ``heartbeat.py`` for the one used here).

Before it takes a trial the worker checks that it can run one (the device works, CIFAR-10 loads,
the checkpoint folder is writable) and exits 2 with one line if not. A worker whose trials fail
the same way ``FAILURE_STREAK`` times in a row is broken, not its configurations: it queues those
trials again for the other workers, names the error and exits ``EXIT_BROKEN``. So one broken
host cannot drain a study.

When the budget is spent but other workers' trials are still running, the worker waits: if one
of them dies, its heartbeat goes stale, this worker fails it and queues a retry, and runs the
retry. So no trial is lost while at least one worker is alive, unless the same configuration
keeps dying: each fault (a silent worker, out of GPU memory) counts against
``heartbeat.max_retry``, and a configuration whose retries are spent is reported (status, the
worker's exit code ``EXIT_LOST``, ``up``'s summary).

Storage outages: every storage call waits for the database to come back, up to
``--storage-wait`` seconds; a trial keeps training through an outage shorter than the heartbeat
grace (less a second), and one longer stops training, is queued again (no retry used) and
resumes from its checkpoint once the database is back.

SIGTERM / SIGINT: the current training step finishes and is checkpointed (mid-epoch, resumed
bit-for-bit), the trial ends FAIL with ``error="interrupted: ..."``, and the worker queues it to
resume (a stop uses no retry), then exits with 128 + signal number. A second signal stops at
once; the trial is still queued.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from nkat_search.config import COMPILE_SCOPE, STORAGE_WAIT_S
from nkat_search.errors import UserError
from nkat_search.search import optuna_private
from nkat_search.search import trials as trial_record
from nkat_search.search.checkpoint_store import CheckpointStore
from nkat_search.search.coordinator import budget_state, load_study, load_study_spec_from_storage
from nkat_search.search.disk import check_room, free_bytes, human, trial_checkpoint_bytes
from nkat_search.search.heartbeat import AbortGuard, HeartbeatLost, TrialHeartbeat
from nkat_search.search.report import describe_lost
from nkat_search.search.resilient_storage import StorageUnavailable
from nkat_search.search.spec import STAGE1_DATASET, StudySpec
from nkat_search.search.stale_trials import (RetryStaleTrial, fail_stale_trials, original_number,
                                             trial_dir)
from nkat_search.search.storage import open_storage
from nkat_search.search.storage_url import WORKER_CONNECTIONS
from nkat_search.search.study_lock import StudyLock
from nkat_search.search.trials import (CHECKPOINT_NOT_WRITTEN, INTERRUPTED, OUT_OF_MEMORY,
                                       TrialRecord)

if TYPE_CHECKING:
    from nkat_search.search.objective import Objective

# Exit codes beyond 0 (done), 2 (a user mistake, one line) and 128 + N (signal N).
EXIT_LOST = 3    # the study has configurations without a result (every attempt failed)
EXIT_BROKEN = 4  # this worker's trials kept failing the same way; it stopped taking trials
FAILURE_STREAK = 3


@dataclass
class WorkerOptions:
    storage: str
    study: str
    device: str = "auto"
    n_trials: int | None = None
    data_dir: str | None = None
    download: bool = False  # may fetch missing datasets into a named data_dir
    checkpoint_dir: str = "runs/checkpoints"
    checkpoint_interval_s: float | None = None  # None: config.CHECKPOINT_INTERVAL_S
    keep_checkpoints: bool = False
    # Optuna artifact store (a folder or s3://) that every host reaches (checkpoint_store.py)
    checkpoint_store: str | None = None
    progress: bool | None = None
    cpu_threads: int | None = None  # torch threads; K workers sharing a CPU must split its cores
    storage_wait_s: float = STORAGE_WAIT_S
    # Take no new trial after this many seconds; the running one finishes (Optuna's timeout).
    timeout_s: float | None = None
    compile_scope: str = COMPILE_SCOPE


@dataclass
class StopFlag:
    """Set by SIGTERM / SIGINT; a second signal raises KeyboardInterrupt to stop at once."""

    signum: int = 0
    children: list = field(default_factory=list)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"worker: {signal.Signals(signum).name}: checkpointing after the current step, then stopping "
              "(send again to stop now)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return bool(self.signum)


def identity(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device}"


def run_worker(options: WorkerOptions, stop: StopFlag | None = None, on_ready=None) -> int:
    """Run trials until the budget (or ``options.n_trials``) is spent; returns the exit code.

    ``on_ready()`` runs once the storage and the study have loaded and the checks passed
    (``--trials-per-gpu`` starts its sibling workers there, so a wrong URL or a missing dataset
    is reported once, not K times).
    """
    stop = stop or StopFlag()
    spec, storage = open_worker_storage(options.storage, options.study, options.storage_wait_s)
    # torch, the objective and train/ load when a worker runs, not with this module (status,
    # study show and the tests import it without training anything).
    import torch

    from nkat_search.search.objective import Objective

    from nkat_search.train.device import device_name
    from nkat_search.train.sources import data_location

    if options.cpu_threads:
        torch.set_num_threads(options.cpu_threads)
    lock = StudyLock(storage, options.study)
    store = None
    if options.checkpoint_store:
        store = CheckpointStore(options.checkpoint_store)
        store.check()
    objective = Objective(spec, checkpoint_root=options.checkpoint_dir,
                          data_dir=data_location(options.data_dir, options.download),
                          device=device_name(options.device), progress=options.progress,
                          stop_requested=stop, on_start=lock.release,
                          checkpoint_interval_s=options.checkpoint_interval_s,
                          checkpoint_store=store, compile_scope=options.compile_scope)
    device = objective.preflight()
    check_checkpoint_dir(options.checkpoint_dir)
    check_room(options.checkpoint_dir, trial_checkpoint_bytes(spec))
    worker = objective.worker = identity(device)
    study = load_study(storage, options.study, spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"worker {worker}: study '{options.study}', budget {spec.n_trials} trials",
          flush=True)
    if on_ready is not None:
        on_ready()

    guard = AbortGuard(storage)
    if threading.current_thread() is threading.main_thread():
        guard.install()
    try:
        return Worker(options, spec, study, storage, lock, objective, guard, stop, worker).run()
    finally:
        guard.uninstall()


def open_worker_storage(url: str, study: str, storage_wait_s: float = STORAGE_WAIT_S):
    """(the study's spec, the worker's storage): heartbeat, retries, outages ridden out, and at
    most ``WORKER_CONNECTIONS`` connections to PostgreSQL for the whole process.

    The study file is read first through a storage without heartbeat (the heartbeat settings are
    in it), whose connection is closed before the worker's own storage opens.
    """
    plain = open_storage(url, connections=WORKER_CONNECTIONS)  # Optuna's schema check takes 2
    try:
        spec = load_study_spec_from_storage(plain, study)
    finally:
        plain.engine.dispose()
    hb = spec.heartbeat
    storage = open_storage(url, heartbeat_interval=hb.interval, grace_period=hb.grace,
                           max_retry=hb.max_retry, outage_s=storage_wait_s,
                           connections=WORKER_CONNECTIONS)
    return spec, storage


def check_checkpoint_dir(root: str | Path) -> None:
    """The checkpoint folder exists (or can be made) and takes a file (its room: ``disk.py``)."""
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"--checkpoint-dir {root}: cannot write there "
                        f"({err.strerror or err}); pick a writable folder") from None


class Worker:
    """The trial loop of one worker process (see the module docstring)."""

    def __init__(self, options: WorkerOptions, spec: StudySpec, study, storage, lock: StudyLock,
                 objective: Objective, guard: AbortGuard, stop: StopFlag, worker: str):
        self.options, self.spec, self.study, self.storage = options, spec, study, storage
        self.lock, self.objective, self.guard, self.stop, self.worker = (
            lock, objective, guard, stop, worker)
        self.retry = storage.get_heartbeat_stale_trial_callback() or RetryStaleTrial()
        self.streak = FailureStreak(FAILURE_STREAK)

    def run(self) -> int:
        options, spec, study, stop = self.options, self.spec, self.study, self.stop
        ran, waiting, code = 0, False, 0
        deadline = (None if options.timeout_s is None
                    else time.monotonic() + options.timeout_s)
        while not stop() and (options.n_trials is None or ran < options.n_trials):
            if deadline is not None and time.monotonic() >= deadline:
                print(f"worker {self.worker}: --timeout {options.timeout_s:g} s reached; no new "
                      "trial taken (run a worker again to go on)", flush=True)
                break
            trial = None
            # Held until the objective has drawn the trial's parameters (its on_start releases
            # it), so a proposal depends on the study's history and the trial number only.
            self.lock.acquire()
            try:
                action = next_action(study, spec)
                if action == "run":
                    with warnings.catch_warnings():
                        # "Heartbeat ... supposed to be used with Study.optimize": this loop
                        # runs the heartbeat itself (heartbeat.py).
                        warnings.simplefilter("ignore", UserWarning)
                        trial = study.ask()
            finally:
                if trial is None:
                    self.lock.release()
            if action == "done":
                break
            if action == "wait":
                if not waiting:
                    print(f"worker {self.worker}: budget spent; waiting for the running trials of "
                          "other workers (a dead one's retry runs here)", flush=True)
                waiting = True
                _sleep(spec.heartbeat.interval, stop)
                continue
            waiting = False
            started = time.perf_counter()
            frozen, ending = self.run_trial(trial)
            ran += 1
            print(trial_line(frozen, time.perf_counter() - started), flush=True)
            if self._after_trial(frozen, ending):
                code = EXIT_BROKEN
                break
        state = budget_state(study)
        print(f"worker {self.worker}: ran {ran} trial(s); study: {state['used']}/{state['budget']} "
              f"configurations, {state['retries']} retries, states {state['states']}", flush=True)
        if code:
            return code
        if stop.signum:
            return 128 + stop.signum
        if state["lost"]:
            print(f"worker {self.worker}: {describe_lost(state['lost'])}", flush=True)
            return EXIT_LOST
        return 0

    # -- one trial -------------------------------------------------------------------------

    def run_trial(self, trial: optuna.Trial) -> tuple[optuna.trial.FrozenTrial, str]:
        """Run an asked trial and end it; (the trial as stored, how it ended).

        The ending is ``complete``, ``pruned``, ``interrupted``, ``oom``, ``failed``, ``lost``
        (the heartbeat gave up: training stopped) or ``taken`` (another worker had declared it
        dead first; its retry carries on).
        """
        hb = self.spec.heartbeat
        outcome, lost = None, None
        beat = TrialHeartbeat(optuna_private.backend(optuna_private.study_storage(self.study)),
                              optuna_private.trial_id(trial), hb.interval, hb.grace)
        try:
            with beat:
                self.guard.arm(beat)
                try:
                    outcome = self._call(trial)
                finally:
                    self.guard.arm(None)
                    self.lock.release()  # still held if the objective failed before drawing
        except HeartbeatLost as err:
            lost = str(err)
        except KeyboardInterrupt:
            # A forced stop: record it and queue the trial, unless the storage is away right now
            # (waiting for it is no stop at once; the heartbeat then tells the others).
            if self.storage.health.down_since is None:
                with self.lock:
                    self._end(trial, (TrialState.FAIL, None), None, beat)
            raise
        gc.collect()
        with self.lock:
            return self._end(trial, outcome, lost, beat)

    def _call(self, trial: optuna.Trial):
        """(state, value) of the objective; exceptions other than a crash propagate."""
        try:
            return TrialState.COMPLETE, self.objective(trial)
        except optuna.TrialPruned:
            return TrialState.PRUNED, None
        except StorageUnavailable:
            raise
        except Exception:  # noqa: BLE001 - a crash ends the trial FAIL; the objective wrote why
            return TrialState.FAIL, None

    def _end(self, trial, outcome, lost: str | None, beat: TrialHeartbeat):
        """Tell the trial's end and queue what must run again; under the study lock."""
        storage = optuna_private.study_storage(self.study)
        frozen = storage.get_trial(optuna_private.trial_id(trial))
        if frozen.state != TrialState.RUNNING:
            print(f"worker {self.worker}: trial {trial.number} was declared dead by another "
                  "worker (its heartbeat was late); its retry carries on, this run's result is "
                  "dropped", flush=True)
            return frozen, "taken"
        if outcome is None:
            # Training stopped on a lost heartbeat and nobody took the trial over: it is still
            # ours. An outage is no fault of the configuration, so its retry is free. The report
            # the outage held up goes in first, so the retry inherits the whole curve.
            try:
                self.objective.resend_report(trial)
            except Exception as err:  # noqa: BLE001 - a gap in a curve is no reason to stop
                print(f"worker {self.worker}: trial {trial.number}: the report held up by the "
                      f"outage was not sent ({err})", file=sys.stderr, flush=True)
            trial_record.write(trial, outcome="failed", error=f"heartbeat lost: {lost}")
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            self._requeue(frozen, counted=not beat.transient, why="heartbeat lost")
            return frozen, "lost"
        state, value = outcome
        if state == TrialState.COMPLETE:
            return self.study.tell(trial, value), "complete"
        if state == TrialState.PRUNED:
            return self.study.tell(trial, state=TrialState.PRUNED), "pruned"
        frozen = self.study.tell(trial, state=TrialState.FAIL)
        error = str(frozen.user_attrs.get("error", ""))
        if error.startswith(INTERRUPTED):
            self._requeue(frozen, counted=False, why="stopped")
            return frozen, "interrupted"
        if error.startswith(CHECKPOINT_NOT_WRITTEN):
            # The host's disk, not the configuration: it resumes elsewhere at no retry cost.
            self._requeue(frozen, counted=False, why="checkpoint not written")
            return frozen, "disk"
        if error.startswith(OUT_OF_MEMORY):
            # With several trials per GPU the memory may have been a neighbour's: a fault, but
            # not necessarily the configuration's. Bounded by heartbeat.max_retry.
            self._requeue(frozen, counted=True, why="out of GPU memory")
            return frozen, "oom"
        return frozen, "failed"

    def _requeue(self, trial, counted: bool, why: str) -> int | None:
        number = self.retry.requeue(self.study, trial, counted=counted)
        if number is None:
            print(f"worker {self.worker}: trial {trial.number} ({why}): not queued again, its "
                  f"retries are spent (heartbeat.max_retry {self.retry.max_retry}); the "
                  "configuration has no result", flush=True)
        else:
            cost = "counts as a retry" if counted else "uses no retry"
            print(f"worker {self.worker}: trial {trial.number} ({why}) queued to resume as trial "
                  f"{number} ({cost})", flush=True)
        return number

    def _after_trial(self, trial, ending: str) -> bool:
        """Clean-up, the out-of-memory wait and the failure streak; True: stop taking trials."""
        options, spec = self.options, self.spec
        # The caching allocator keeps a finished trial's memory reserved; a 257-token trial leaves
        # about 25 GiB (40 eager) that a neighbour on the same GPU could not otherwise get.
        _release_gpu_memory()
        if ending in ("complete", "pruned"):
            self.streak.clear()
            if not options.keep_checkpoints:
                # Checkpoints exist to resume a trial; a finished one never resumes. Reports stay.
                folder = trial_dir(options.checkpoint_dir, spec.name, trial)
                for path in folder.glob("*/checkpoint*"):
                    path.unlink(missing_ok=True)
                store = self.objective.checkpoint_store
                if store is not None:
                    try:
                        store.remove(spec.name, original_number(trial), self.objective.datasets())
                    except Exception as err:  # noqa: BLE001 - leftovers cost room, not results
                        print(f"worker {self.worker}: could not remove trial {trial.number}'s "
                              f"checkpoints from the store ({err})", file=sys.stderr, flush=True)
            return False
        if ending == "disk":
            return self._disk_full()
        if ending not in ("oom", "failed"):
            return False  # a stop or an outage says nothing about this worker
        if self.streak.add(trial) >= self.streak.limit:
            return self._broken()
        if ending == "oom":
            self._wait_for_gpu_neighbours(trial)
        return False

    def _broken(self) -> bool:
        """Queue the streak's trials again for other workers and say why this one stops."""
        with self.lock:
            for failed in self.streak.trials:
                if str(failed.user_attrs.get("error", "")).startswith(OUT_OF_MEMORY):
                    continue  # already queued when it failed
                self._requeue(failed, counted=False, why="failed on a broken worker")
        error = str(self.streak.trials[-1].user_attrs.get("error", "?")).splitlines()[0][:300]
        numbers = ", ".join(str(t.number) for t in self.streak.trials)
        print(f"worker {self.worker}: stopped taking trials: trials {numbers} failed in a row the "
              f"same way on this worker ({error}); fix this host, the trials are queued for the "
              "other workers", flush=True)
        return True

    def _disk_full(self) -> bool:
        """One line naming the checkpoint folder and its free space; the worker stops (exit 4)."""
        fault = self.objective.host_fault
        folder = getattr(fault, "folder", None) or Path(self.options.checkpoint_dir)
        reason = getattr(fault, "reason", None) or str(fault)
        free = free_bytes(folder)
        print(f"worker {self.worker}: stopped taking trials: cannot write checkpoints to "
              f"{folder} ({reason}; {human(free) if free is not None else 'unknown'} free there); "
              "free space or pick another --checkpoint-dir; the trial is queued again at no "
              "retry cost", flush=True)
        return True

    def _wait_for_gpu_neighbours(self, trial) -> None:
        # Retrying beside the same neighbour would fail the same way: let the trials that share
        # this GPU finish first.
        neighbours = gpu_neighbours(self.study, self.worker)
        waiting = (f"waiting for trial(s) {', '.join(map(str, neighbours))} on this GPU to finish"
                   if neighbours else "no other trial on this GPU")
        print(f"worker {self.worker}: trial {trial.number} ran out of GPU memory; {waiting}",
              flush=True)
        while neighbours and not self.stop():
            _sleep(self.spec.heartbeat.interval, self.stop)
            with self.lock:
                fail_stale_trials(self.study)  # a dead neighbour must not block us
            neighbours = gpu_neighbours(self.study, self.worker)


class FailureStreak:
    """The trials that failed in a row on this worker with the same error (numbers aside)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.trials: list = []
        self._signature: str | None = None

    def add(self, trial) -> int:
        signature = failure_signature(str(trial.user_attrs.get("error", "")))
        if signature != self._signature:
            self.trials, self._signature = [], signature
        self.trials.append(trial)
        return len(self.trials)

    def clear(self) -> None:
        self.trials, self._signature = [], None


def failure_signature(error: str) -> str:
    """An error with its numbers blanked: "failed the same way" ignores sizes, ids and addresses."""
    return re.sub(r"0x[0-9a-fA-F]+|\d+(\.\d+)?", "#", error.strip().splitlines()[0] if error.strip()
                  else "")[:200]


def next_action(study: optuna.Study, spec: StudySpec) -> str:
    """``run`` (a queued trial, or budget left), ``wait`` (others still running) or ``done``.

    Call it under the study lock.
    """
    fail_stale_trials(study)
    state = budget_state(study)  # the stored budget: `study create --n-trials` may raise it
    if state["states"].get("WAITING", 0) or state["left"] > 0:
        return "run"
    if state["states"].get("RUNNING", 0):
        return "wait"
    return "done"


def trial_line(trial: optuna.trial.FrozenTrial, seconds: float) -> str:
    """One line per finished trial: number, outcome, Global and Local TPE, why it stopped, time."""
    record = TrialRecord.of(trial)
    kind = trial_record.outcome(trial)
    parts = [f"trial {trial.number:>4}", f"{kind:<11}"]
    if record.global_tpe is not None:
        parts.append(f"global_tpe {record.global_tpe:.4f}")
    if record.local_tpe is not None:
        parts.append(f"local_tpe {record.local_tpe:.4f}")
    if kind == "complete":
        parts.append("feasible" if trial_record.feasible(trial) else "infeasible")
    if record.missing_datasets:
        parts.append(f"missing {','.join(record.missing_datasets)}")
    if record.resumed_from_epoch or record.resumed:
        epochs = {STAGE1_DATASET: record.resumed_from_epoch, **record.resumed}
        parts.append("resumed from epoch " + ", ".join(f"{epoch} ({name})" for name, epoch
                                                       in epochs.items() if epoch))
    if kind == "interrupted":
        # The worker queues the retry right after this line (``_after_trial``).
        parts.append(f"stopped {trial_record.interrupted_where(record)}; its retry resumes "
                     "from the checkpoint")
    else:
        reason = trial_record.stop_reason(trial)
        if reason:
            parts.append(reason)
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def gpu_neighbours(study: optuna.Study, worker: str) -> list[int]:
    """Running trials of other workers on the same host and device as ``worker`` (host:pid:device)."""
    host, pid, device = worker.split(":", 2)
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        other = str(trial.user_attrs.get("worker", ""))
        parts = other.split(":", 2)
        if len(parts) == 3 and parts[0] == host and parts[2] == device and parts[1] != pid:
            found.append(trial.number)
    return found


def _sleep(seconds: float, stop: StopFlag) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.5, deadline - time.monotonic()))


def _release_gpu_memory() -> None:
    """Hand the caching allocator's free blocks back (the trial's objects are collected)."""
    import torch  # loaded at call time, not with this module

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worst(codes: list[int]) -> int:
    """The exit code of a group of workers: 0 only if every one succeeded."""
    failures = [c for c in codes if c != 0]
    return max(failures) if failures else 0
