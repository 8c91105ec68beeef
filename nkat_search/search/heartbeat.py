"""A trial's heartbeat that cannot die silently.

Optuna's heartbeat thread records a beat every ``interval`` seconds and ends, without a word, at
the first exception: after a six-second database blip the trial trains on with no heartbeat, a
grace period later another worker declares it dead, and its retry trains beside it in the same
checkpoint folder. This one keeps beating through errors, and if no beat has succeeded for
nearly the grace period (``stop_after``: a second less, so before any other worker can judge the
trial dead, which takes the whole grace) it stops the trial's training on this worker: the main
thread gets ``HeartbeatLost`` at its next Python instruction, or, when it is inside a storage
call (waiting out the same outage), between that call's attempts or as it returns. The worker
then decides, once the storage answers, whether the trial is still its own to queue again (see
``worker.py``).

Two threads, because a storage call can block for as long as TCP takes to notice a dead peer: the
beater makes the calls, the watchdog only reads the time of the last success.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time

import optuna

from nkat_search.search.resilient_storage import is_transient, reason

# Raised in the main thread through this signal's Python handler (``_thread.interrupt_main`` runs
# the handler as if the signal had arrived, without sending one to the process).
ABORT_SIGNAL = signal.SIGUSR1


# Time the watchdog may take to notice (it looks four times a second) and the main thread to
# stop: the trial stops this long before its grace period could run out.
STOP_MARGIN_S = 1.0


def stop_after(interval: float, grace: float) -> float:
    """Seconds without a recorded beat after which training stops: the grace, less a margin.

    At most half the slack between interval and grace goes to the margin, so a beat that is
    merely late by less than that never stops a trial.
    """
    return grace - min(STOP_MARGIN_S, (grace - interval) / 2)


class HeartbeatLost(BaseException):
    """The trial's heartbeat failed for too long; its training on this worker must stop.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way
    out, in the objective, the trainer or Optuna, mistakes it for a crash of the trial.
    """


class TrialHeartbeat:
    """Beats for one trial while it runs; ``lost`` says why it gave up (None while it holds)."""

    def __init__(self, storage, trial_id: int, interval: float, grace: float):
        self.storage = storage  # the RDBStorage under the study's cache
        self.trial_id = trial_id
        self.interval = interval
        self.deadline_s = stop_after(interval, grace)
        self.lost: str | None = None
        self.transient = True  # False: the heartbeat itself broke, not the storage
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._beat, daemon=True, name="heartbeat"),
                         threading.Thread(target=self._watch, daemon=True, name="heartbeat-watch")]

    def __enter__(self) -> TrialHeartbeat:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        # The beater may be inside a blocked call; it is a daemon and its trial is over.
        self._threads[1].join()

    def _beat(self) -> None:
        health = getattr(self.storage, "health", None)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                # The plain method: this thread retries itself, every interval, and must not sit
                # in the storage's long wait while the deadline passes.
                optuna.storages.RDBStorage.record_heartbeat(self.storage, self.trial_id)
            except Exception as err:  # noqa: BLE001 - every failure is judged by the watchdog
                self._error = err
                self.transient = is_transient(err)
                if health is not None and self.transient:
                    health.failed(err)
                self._stop.wait(min(1.0, self.interval))
                continue
            # The database stamps the beat during the call, so its time is no earlier than this.
            self.last_ok = started
            if health is not None:
                health.ok()
            # Start to start: a slow call must not stretch the gap between beats.
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _watch(self) -> None:
        step = min(0.25, self.interval / 4)
        while not self._stop.wait(step):
            silent = time.monotonic() - self.last_ok
            if silent > self.deadline_s:
                err = self._error
                health = getattr(self.storage, "health", None)
                why = ""
                if err is not None:
                    why = f" ({health.why(err) if health is not None else reason(err)})"
                self.lost = (f"heartbeat not recorded for {silent:.1f} s{why}; training stopped "
                             "before another worker could take the trial over")
                _thread.interrupt_main(ABORT_SIGNAL)
                return


class AbortGuard:
    """Turns a lost heartbeat into ``HeartbeatLost`` in the main thread, at a safe point.

    ``install()`` sets the signal handler (main thread only) and hooks the storage's retry loop;
    ``arm(heartbeat)`` for the span of one trial. Outside a storage call the handler raises at
    once; inside one it leaves the raising to the storage's ``interrupt_check``, so no storage
    code is cut in the middle of a transaction.
    """

    def __init__(self, storage):
        self.storage = storage
        self.heartbeat: TrialHeartbeat | None = None
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(ABORT_SIGNAL, self._on_signal)
        self.storage.interrupt_check = self.check

    def uninstall(self) -> None:
        self.storage.interrupt_check = None
        if self._previous is not None:
            signal.signal(ABORT_SIGNAL, self._previous)
            self._previous = None

    def arm(self, heartbeat: TrialHeartbeat | None) -> None:
        self.heartbeat = heartbeat

    def check(self) -> None:
        beat = self.heartbeat
        if beat is not None and beat.lost and threading.current_thread() is threading.main_thread():
            self.heartbeat = None  # raised once per trial
            raise HeartbeatLost(beat.lost)

    def _on_signal(self, signum, frame) -> None:
        in_call = getattr(self.storage, "in_call", lambda: False)()
        if not in_call:
            self.check()
