"""A worker: pull trials from a study and train them on one device until the budget is spent.

The budget (``n_trials`` of the study file) counts configurations, across every worker: each
trial except retries (see ``coordinator.budget_state``). Optuna's ``MaxTrialsCallback`` checks the
count only after a trial ends, so two workers finishing together would both start one more; here
the check and ``study.ask`` happen under one study-wide lock (``storage.StudyLock``), so the count
is exact. Each step is ``study.optimize(n_trials=1)``: Optuna still runs the trial (heartbeat,
pruning, ``tell``); the objective releases the lock as soon as the trial exists.

When the budget is spent but other workers' trials are still running, the worker waits: if one
of them dies, its heartbeat goes stale, Optuna fails it and queues a retry, and this worker runs
the retry. So no trial is lost while at least one worker is alive.

SIGTERM / SIGINT: the current training step finishes and is checkpointed (mid-epoch, resumed
bit-for-bit), the trial ends FAIL with
``error="interrupted: ..."``, and the worker queues its retry itself (the heartbeat callback only
fires for silent workers), then exits with 128 + signal number. A second signal stops at once;
the trial is still queued for retry.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from nkat_search.search import trials as trial_record
from nkat_search.search.coordinator import budget_state, load_study, load_study_spec_from_storage
from nkat_search.search.objective import INTERRUPTED, OUT_OF_MEMORY, Objective, trial_dir
from nkat_search.search.trials import TrialRecord
from nkat_search.search.storage import RetryStaleTrial, StudyLock, open_storage
from nkat_search.search.spec import StudySpec


@dataclass
class WorkerOptions:
    storage: str
    study: str
    device: str = "auto"
    n_trials: int | None = None
    data_dir: str | None = None
    download: bool = False  # may fetch missing datasets into a named data_dir
    checkpoint_dir: str = "runs/checkpoints"
    checkpoint_interval_s: float | None = None  # None: the trainer's default (60 s)
    keep_checkpoints: bool = False
    progress: bool | None = None
    cpu_threads: int | None = None  # torch threads; K workers sharing a CPU must split its cores


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


class QuietInterruptions(logging.Filter):
    """Drops Optuna's log records about interrupted trials (a traceback, "failed with value None").

    An interrupted trial is no crash: the checkpoint is kept and the retry resumes it, which the
    worker's own line for the trial says. Other failures keep Optuna's traceback.
    """

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        from nkat_search.train.loop import TrainingInterrupted

        message = record.getMessage()
        match = re.match(r"Trial (\d+) failed", message)
        if match is None:
            return True
        if record.exc_info and isinstance(record.exc_info[1], TrainingInterrupted):
            self.interrupted.add(int(match.group(1)))
            return False
        return int(match.group(1)) not in self.interrupted


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def identity(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device}"


def run_worker(options: WorkerOptions, stop: StopFlag | None = None, on_ready=None) -> int:
    """Run trials until the budget (or ``options.n_trials``) is spent; returns the exit code.

    ``on_ready()`` runs once the storage and the study have loaded (``--trials-per-gpu`` starts
    its sibling workers there, so a wrong URL is reported once, not K times).
    """
    stop = stop or StopFlag()
    plain = open_storage(options.storage)
    spec = load_study_spec_from_storage(plain, options.study)
    hb = spec.heartbeat
    storage = open_storage(options.storage, heartbeat_interval=hb.interval,
                           grace_period=hb.grace, max_retry=hb.max_retry)
    device = resolve_device(options.device)
    if options.cpu_threads:
        import torch

        torch.set_num_threads(options.cpu_threads)
    worker = identity(device)
    study = load_study(storage, options.study, spec)
    lock = StudyLock(storage, options.study)
    from nkat_search.train.sources import data_location

    objective = Objective(spec, checkpoint_root=options.checkpoint_dir,
                          data_dir=data_location(options.data_dir, options.download),
                          device=device, worker=worker, progress=options.progress,
                          stop_requested=stop, on_start=lock.release,
                          checkpoint_interval_s=options.checkpoint_interval_s)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet = QuietInterruptions()
    for handler in logging.getLogger("optuna").handlers:  # a logger's filter misses its children
        handler.addFilter(quiet)
    print(f"worker {worker}: study '{options.study}', budget {spec.n_trials} trials",
          flush=True)
    if on_ready is not None:
        on_ready()

    ran, waiting = 0, False
    finished: list[optuna.trial.FrozenTrial] = []
    while not stop() and (options.n_trials is None or ran < options.n_trials):
        lock.acquire()
        try:
            action = next_action(study, spec)
            if action == "done":
                break
            if action == "wait":
                lock.release()
                if not waiting:
                    print(f"worker {worker}: budget spent; waiting for the running trials of other "
                          "workers (a dead one's retry runs here)", flush=True)
                waiting = True
                _sleep(hb.interval, stop)
                continue
            waiting = False
            started = time.perf_counter()
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True,
                               callbacks=[lambda _, trial: finished.append(trial)])
            except KeyboardInterrupt:
                _requeue(study, storage, _trial(study, objective.trial_number))
                raise
        finally:
            lock.release()
        ran += 1
        trial = finished.pop()
        print(trial_line(trial, time.perf_counter() - started), flush=True)
        _after_trial(study, storage, trial, options, spec, stop, worker)
    state = budget_state(study)
    print(f"worker {worker}: ran {ran} trial(s); study: {state['used']}/{state['budget']} "
          f"configurations, {state['retries']} retries, states {state['states']}", flush=True)
    return 128 + stop.signum if stop.signum else 0


def next_action(study: optuna.Study, spec: StudySpec) -> str:
    """``run`` (a queued trial, or budget left), ``wait`` (others still running) or ``done``."""
    _fail_stale_trials(study)
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
    if record.resumed_from_epoch:
        parts.append(f"resumed from epoch {record.resumed_from_epoch}")
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


def _trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial | None:
    if number is None:
        return None
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)


def _sleep(seconds: float, stop: StopFlag) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.5, deadline - time.monotonic()))


def _after_trial(study, storage, trial, options: WorkerOptions, spec: StudySpec,
                 stop: StopFlag, worker: str) -> None:
    # The caching allocator keeps a finished trial's memory reserved; a 257-token trial leaves
    # about 25 GiB (40 eager) that a neighbour on the same GPU could not otherwise get.
    _release_gpu_memory()
    error = str(trial.user_attrs.get("error", ""))
    if trial.state == TrialState.FAIL and error.startswith(INTERRUPTED):
        _requeue(study, storage, trial)
    elif trial.state == TrialState.FAIL and error.startswith(OUT_OF_MEMORY):
        # Queue the retry (bounded by heartbeat.max_retry), then let the trials that share this
        # GPU finish before taking it: retrying beside the same neighbour would fail the same way.
        _requeue(study, storage, trial)
        neighbours = gpu_neighbours(study, worker)
        waiting = (f"waiting for trial(s) {', '.join(map(str, neighbours))} on this GPU to finish"
                   if neighbours else "no other trial on this GPU")
        print(f"worker {worker}: trial {trial.number} ran out of GPU memory; retry queued; "
              f"{waiting}", flush=True)
        while neighbours and not stop():
            _sleep(spec.heartbeat.interval, stop)
            _fail_stale_trials(study)  # a dead neighbour must not block us
            neighbours = gpu_neighbours(study, worker)
    elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and not options.keep_checkpoints:
        # Checkpoints exist to resume a trial; a finished one never resumes. The reports stay.
        for path in trial_dir(options.checkpoint_dir, spec.name, trial).glob("*/checkpoint.pt"):
            path.unlink(missing_ok=True)


def _fail_stale_trials(study: optuna.Study) -> None:
    """Dead workers' RUNNING trials -> FAIL, and the retry callback queues their retries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _release_gpu_memory() -> None:
    """Hand the caching allocator's free blocks back (``gc_after_trial`` already collected)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _requeue(study, storage, trial) -> None:
    """Queue a retry of an interrupted trial, exactly as the heartbeat callback would."""
    if trial is None or trial.state != TrialState.FAIL:
        return
    callback = storage.get_heartbeat_stale_trial_callback() or RetryStaleTrial()
    callback(study, trial)


def spawn_siblings(argv: list[str], count: int, stop: StopFlag,
                   cpu_threads: int | None = None) -> list[subprocess.Popen]:
    """Start ``count`` more workers (same command, one trial at a time each) on the same device.

    They run in their own session so a terminal's Ctrl-C reaches them once, forwarded by us.
    """
    env = dict(os.environ)
    if cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    children = []
    for _ in range(count):
        child = subprocess.Popen([sys.executable, "-m", "nkat_search", *argv],
                                 start_new_session=True, env=env)
        children.append(child)
        stop.children.append(child)
    return children


def worst(codes: list[int]) -> int:
    """The exit code of a group of workers: 0 only if every one succeeded."""
    failures = [c for c in codes if c != 0]
    return max(failures) if failures else 0
