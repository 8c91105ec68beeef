"""Starting nkat-search's own processes, in one place.

``up`` (coordinator, workers, dashboard), ``worker --trials-per-gpu K`` / ``--device all`` (its
siblings), ``benchmarks/scaling.py`` (workers), ``benchmarks/study_wallclock.py`` (``up``) and
``workers/smoke_check.py`` (``smoke``) all start ``python -m nkat_search ...`` here, so the
command, the CPU split and the process group are decided once. Only the standard library is
imported: a benchmark measuring another checkout's code imports this one's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def nkat_command(argv: list[str]) -> list[str]:
    """The command line of ``nkat-search ARGV`` in this interpreter (no console script needed)."""
    return [sys.executable, "-m", "nkat_search", *argv]


def threads_per_process(processes: int, environ: dict | None = None) -> int | None:
    """OpenMP threads for each of ``processes`` processes that share this machine's cores.

    Every process defaulting to every core oversubscribes the CPU (data loading, and the whole run
    with ``--device cpu``). None, inherit unchanged: one process, or ``OMP_NUM_THREADS`` already
    set, which is the user's choice.
    """
    environ = os.environ if environ is None else environ
    if processes <= 1 or environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // processes)


def with_threads(threads: int | None, env: dict | None = None) -> dict | None:
    """``env`` (default: ours) with ``OMP_NUM_THREADS=threads``; None (inherit) when threads is."""
    if threads is None:
        return env
    return dict(os.environ if env is None else env, OMP_NUM_THREADS=str(threads))


def die_with_parent(parent: int):
    """A ``preexec_fn``: the child gets SIGTERM when ``parent`` dies, ``kill -9`` included.

    A child in its own session is out of reach of the terminal's hangup, and a parent killed
    with SIGKILL forwards nothing: without this, ``up``'s dashboard served on forever. SIGTERM
    makes a worker checkpoint after its current step and queue its trial, as a polite stop does.
    Linux's ``PR_SET_PDEATHSIG``; elsewhere nothing is set.
    """
    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def start(argv: list[str], *, env: dict | None = None, log: Path | None = None,
          own_session: bool = True, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``nkat-search ARGV``; with ``log``, its output is appended there and stdin closed.

    ``own_session``: the child does not get the terminal's Ctrl-C; the parent forwards what each
    child should get (one SIGINT, so a worker checkpoints after its current step). The child ends
    with this process (``die_with_parent``). ``cwd``: the child's folder, which ``-m`` puts first
    on its import path (a benchmark runs another checkout's package so).
    """
    command = nkat_command(argv)
    arm = die_with_parent(os.getpid())
    if log is None:
        return subprocess.Popen(command, start_new_session=own_session, env=env, cwd=cwd,
                                preexec_fn=arm)
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=own_session, env=env,
                                cwd=cwd, preexec_fn=arm)


def run(argv: list[str], *, env: dict | None = None) -> int:
    """Run ``nkat-search ARGV`` in the foreground and return its exit code.

    In our session and on our terminal (``up``'s ``study create``): a Ctrl-C reaches it as it
    reaches us.
    """
    return subprocess.run(nkat_command(argv), env=env).returncode


def start_siblings(argv: list[str], count: int, stop, cpu_threads: int | None = None,
                   env: dict | None = None) -> list[subprocess.Popen]:
    """Start ``count`` more workers (``argv``, one trial at a time each) beside this one.

    ``stop`` (the worker's ``StopFlag``) learns of them, so our signals are forwarded to them.
    ``env``: theirs (default: ours), with ``OMP_NUM_THREADS=cpu_threads`` when that is given.
    """
    env = with_threads(cpu_threads, env) or dict(os.environ)
    children = []
    for _ in range(count):
        child = start(argv, env=env)
        children.append(child)
        stop.children.append(child)
    return children
