"""``nkat-search up``: the one-machine form of the compose file.

Coordinator, one worker per GPU, the dashboard, a live summary line (``cli/live_view.py``), then
the final table and the export. Every child is ``sys.executable -m nkat_search ...`` (the exact
interpreter and package of this process), started by ``cli/launch.py``. The coordinator
(``study create``) runs in the foreground; the workers and the dashboard run in sessions of their
own, so a Ctrl-C in the terminal reaches only this process, which forwards exactly one SIGINT to
each worker and waits for them to checkpoint.

What imports optuna or torch (``search.report``, ``search.resilient_storage``, ``search.export``,
``train.device``, ``train.sources``) is imported inside the function that needs it, so that
``nkat-search up --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nkat_search.cli import launch
from nkat_search.cli.checks import check_seconds
from nkat_search.cli.commands.dashboard import check_port, find_free_port, url
from nkat_search.cli.commands.export import DEFAULT_TOP
from nkat_search.cli.commands.storage_arg import (STORAGE_ENV, UP_DEFAULT_OUT, as_url, child_env,
                                                  with_password_file)
from nkat_search.cli.commands.train import add_data_arguments
from nkat_search.cli.commands.worker import (GPU_GIB_PER_TRIAL, GPU_TRIALS_PER_DEVICE,
                                             default_trials_per_device, worker_argv)
from nkat_search.cli.live_view import LiveView
from nkat_search.cli.mps import start_or_join
from nkat_search.config import CHECKPOINT_INTERVAL_S, COMPILE_SCOPES
from nkat_search.errors import UserError
from nkat_search.search.spec import STAGE1_DATASET, load_study_file
from nkat_search.search.storage_url import SQLITE_SCHEME, mask_url, sqlite_path
from nkat_search.search.study_files import write_study_files
from nkat_search.terminal import table_width

HELP = ("Run a whole search on this machine: create the study from --study FILE (the coordinator), "
        "start one worker per visible GPU (CPU only: one worker on cpu unless --workers says more), "
        "serve optuna-dashboard on 127.0.0.1, show a live summary line, and when the workers are "
        "done print the trial table and export the best trials to OUT/STUDY/export/ (exit code 1 "
        "when no trial completed). Storage "
        "defaults to embedded SQLite at OUT/STUDY.db (OUT defaults to runs/); pass --storage for "
        "PostgreSQL. Worker logs: OUT/STUDY/logs/; checkpoints: OUT/checkpoints/. Ctrl-C forwards SIGINT to the workers, waits for "
        "their checkpoints and exits 130 (a second Ctrl-C terminates them). Exit code 1 if any "
        "worker failed.")

REFRESH_SECONDS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, metavar="FILE", help="study file (YAML)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes (default: one per visible GPU, else 1 on cpu); "
                        "with GPUs, worker i runs on cuda:(i mod GPUs)")
    parser.add_argument("--trials-per-gpu", type=int, metavar="K",
                        help="concurrent trials per worker (default: the worker's own: on a GPU "
                        f"one per {GPU_GIB_PER_TRIAL} GiB of its memory, 1 to "
                        f"{GPU_TRIALS_PER_DEVICE}; 1 on the CPU)")
    parser.add_argument("--storage", metavar="URL",
                        help="storage URL (default: sqlite:///OUT/STUDY.db, embedded SQLite)")
    add_data_arguments(parser)
    parser.add_argument("--out", default="runs", metavar="DIR",
                        help="output root: OUT/STUDY.db, OUT/STUDY/{logs,export}, OUT/checkpoints")
    parser.add_argument("--checkpoint-interval", type=float, metavar="S",
                        help="passed to the workers: a trial's checkpoint at most every S seconds "
                        f"(default: the worker's, {CHECKPOINT_INTERVAL_S:g})")
    parser.add_argument("--n-trials", type=int, metavar="N",
                        help="the study's budget (default: the study file's n_trials); run up "
                        "again with a larger N to extend a finished study")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="the workers take no new trial after S seconds and up ends when the "
                        "running ones have finished; run up again to go on with the budget "
                        "(nothing is lost or repeated, unlike a stop that interrupts trials)")
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPES, default=None,
                        help="passed to the workers: how torch.compile covers a trial's model, "
                        "model or blocks (default: the worker's, model; see `nkat-search worker "
                        "--help`)")
    parser.add_argument("--mps", choices=("auto", "on", "off"), default="off",
                        help="CUDA MPS for the trials sharing a GPU. off (default): they take "
                        "turns; auto: start a daemon for this run when nvidia-cuda-mps-control "
                        "is there and a GPU is visible, and stop it at the end; on: the same, "
                        "or an error. MPS helps studies of small models only (see "
                        "`nkat-search worker --help`)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                        help="export the best K trials")
    parser.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                        help="serve optuna-dashboard on 127.0.0.1 while the workers run")
    parser.add_argument("--port", type=int, default=8080,
                        help="dashboard port; if it is taken, the next free one is used")
    parser.add_argument("--refresh", type=float, default=REFRESH_SECONDS, metavar="S",
                        help="seconds between refreshes of the live summary line")


def run(args: argparse.Namespace) -> int:
    _check(args)
    spec = load_study_file(args.study)
    # Stage 1's data is checked before the study is created: a wrong --data-dir is one line,
    # not a study, a table and then the workers' refusal.
    from nkat_search.train.sources import check_present, data_location  # torch: not for --help

    check_present(STAGE1_DATASET, data_location(args.data_dir, args.download),
                  spec.base_config().train.emnist_split)
    out = Path(args.out).resolve()
    run_dir = out / spec.name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    # $NKAT_STORAGE_PASSWORD_FILE fills in a PostgreSQL URL's password, as for the other commands.
    storage = (with_password_file(as_url(args.storage)) if args.storage
               else f"sqlite:///{out / (spec.name + '.db')}")
    return Up(args, spec.name, storage, run_dir).run()


def _check(args: argparse.Namespace) -> None:
    """The numbers argparse cannot check: one line naming the flag."""
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    check_seconds("--checkpoint-interval", args.checkpoint_interval, zero_ok=True)
    check_seconds("--timeout", args.timeout)
    check_port(args.port, low=1)  # up prints the dashboard's address, so it must know the port
    check_seconds("--refresh", args.refresh)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")


class Up:
    """The processes of one ``up`` and the order they start and stop in."""

    def __init__(self, args: argparse.Namespace, study_name: str, storage: str, run_dir):
        self.args = args
        self.study_name = study_name
        self.storage = storage
        self.run_dir = run_dir
        self.workers: list[tuple[str, object, object]] = []  # (label, Popen, log path)
        self.dashboard = None
        self.interrupts = 0
        self.mps = None

    def run(self) -> int:
        print(f"study {self.study_name}: storage {mask_url(self.storage)}", flush=True)
        create = ["study", "create", "--study", self.args.study]
        if self.args.n_trials is not None:
            create += ["--n-trials", str(self.args.n_trials)]
        code = self._child(create)
        if code != 0:
            print(f"nkat-search up: the coordinator (study create) exited with {code}", flush=True)
            return code
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.args.dashboard:
                self._start_dashboard()
            if not self.interrupts:
                self._start_workers()
                self._watch()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        try:
            return self._finish()
        finally:
            from nkat_search.search.storage import fold_sqlite_wal  # optuna: not for --help

            fold_sqlite_wal(self.storage)

    # -- children ---------------------------------------------------------------------------

    def _child(self, argv: list[str]) -> int:
        return launch.run(argv, env=child_env(self.storage))

    def _spawn(self, argv: list[str], log_path, env: dict | None = None):
        # The storage URL travels in NKAT_STORAGE: a command line is readable by every user of
        # the host, and the URL may carry a password. A session of its own: the terminal's
        # Ctrl-C reaches only us, and we decide what the children get.
        return launch.start(argv, env=child_env(self.storage, env), log=log_path)

    def _devices(self) -> list[str]:
        from nkat_search.train.device import gpu_names  # torch: not for --help

        gpus = gpu_names() or ["cpu"]
        count = self.args.workers or len(gpus)
        return [gpus[i % len(gpus)] for i in range(count)]

    def _start_workers(self) -> None:
        # The worker adds <study>/trial-<n>/ below this.
        checkpoints = self.run_dir.parent / "checkpoints"
        devices = self._devices()
        per_device = self.args.trials_per_gpu or default_trials_per_device(devices[0])
        if per_device > 1 or self.args.mps == "on":
            gpus = len({d for d in devices if d.startswith("cuda")})
            self.mps, line = start_or_join(self.args.mps, self.run_dir, gpus)
            print(line, flush=True)
        env = self._worker_env(len(devices) * per_device)
        for i, device in enumerate(devices):
            # Unset flags are left to the worker's defaults.
            argv = worker_argv(self.study_name, device, checkpoints, quiet=True,
                               trials_per_gpu=self.args.trials_per_gpu,
                               checkpoint_interval=self.args.checkpoint_interval,
                               timeout=self.args.timeout, data_dir=self.args.data_dir,
                               download=self.args.download,
                               compile_scope=self.args.compile_scope)
            # This up's own logs: a second up on the same study must not write into them.
            log = self.run_dir / "logs" / f"worker-{i}.up-{os.getpid()}.log"
            self.workers.append((f"worker {i} ({device})", self._spawn(argv, log, env), log))
            print(f"worker {i} on {device}: log {log}", flush=True)

    def _worker_env(self, processes: int) -> dict | None:
        """The workers' environment (None: ours as it is)."""
        # The cores are split over every trial process of this machine, not per worker.
        env = launch.with_threads(launch.threads_per_process(processes))
        if self.mps is not None:
            # The workers' CUDA runtime finds the daemon through these (worker_argv's --mps off
            # only tells them not to start one of their own).
            env = dict(env or os.environ, **self.mps.env())
        return env

    def _start_dashboard(self) -> None:
        host = "127.0.0.1"
        port = find_free_port(host, self.args.port)
        if port != self.args.port:
            print(f"port {self.args.port} is in use; the dashboard takes port {port}", flush=True)
        log = self.run_dir / "logs" / f"dashboard.up-{os.getpid()}.log"
        self.dashboard = self._spawn(["dashboard", "--host", host, "--port", str(port)], log)
        if wait_for_http(url(host, port), self.dashboard, timeout=60) and serving(self.dashboard):
            print(f"dashboard: {url(host, port)}", flush=True)
        else:
            print(f"dashboard did not start (exit {self.dashboard.poll()}); see {log}", flush=True)
            print(tail(log), flush=True)

    # -- the live view and signals ----------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        # Only signals here; the watch loop prints (printing inside a handler can re-enter stdout).
        self.interrupts += 1
        sig = {1: signal.SIGINT, 2: signal.SIGTERM}.get(self.interrupts, signal.SIGKILL)
        for _, process, _ in self.workers:
            if process.poll() is None:
                try:
                    process.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _announce_interrupts(self, announced: int, say) -> int:
        messages = {1: "stopping: the workers checkpoint after their current step "
                       "(Ctrl-C again to terminate them)",
                    2: "terminating the workers (Ctrl-C again to kill them)",
                    3: "killing the workers"}
        for count in range(announced + 1, min(self.interrupts, 3) + 1):
            say(messages[count])
        return max(announced, min(self.interrupts, 3))

    def _workers_running(self) -> bool:
        return any(p.poll() is None for _, p, _ in self.workers)

    def _watch(self) -> None:
        """The live view (``LiveView``) until the workers exit, and what the signals did."""
        view = LiveView(self.study_name)
        study, announced = None, 0
        while self._workers_running():
            announced = self._announce_interrupts(announced, view.say)
            study, report = self._report(study)
            if report is not None:
                view.show(report)
            # The next refresh, unless a signal came or the workers are done before it.
            deadline = time.monotonic() + self.args.refresh
            while (time.monotonic() < deadline and min(self.interrupts, 3) == announced
                   and self._workers_running()):
                time.sleep(0.2)
        self._announce_interrupts(announced, view.say)
        view.close()

    def _report(self, study):
        """(study, ``study_report``); the report is None when the storage is busy this time."""
        # optuna: not for --help.
        from nkat_search.search.report import open_study, study_report
        from nkat_search.search.resilient_storage import is_transient

        try:
            if study is None:
                study = open_study(self.storage, self.study_name)
            return study, study_report(study)
        except Exception as err:  # noqa: BLE001 - a locked or restarting database must not
            if type(err).__name__ not in ("OperationalError", "DatabaseError") and \
                    not is_transient(err):  # stop the watch
                raise
            return study, None

    def _stop_all(self) -> None:
        """Reap every child still alive (only on an error or a Ctrl-C path), dashboard last."""
        for _, process, _ in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in self.workers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.mps is not None:
            self.mps.stop()
        if self.dashboard is not None and self.dashboard.poll() is None:
            self.dashboard.send_signal(signal.SIGINT)
            try:
                self.dashboard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.dashboard.kill()
                self.dashboard.wait()

    # -- the end ----------------------------------------------------------------------------

    def _finish(self) -> int:
        """The table, the export and what to do next; the exit code of ``up``."""
        # optuna: not for --help.
        from nkat_search.search.report import (describe_lost, format_table, open_study,
                                               study_report, summary_line, wrap)
        from nkat_search.search.trials import lost_configurations

        failed = [(label, p.returncode, log) for label, p, log in self.workers if p.returncode != 0]
        study = open_study(self.storage, self.study_name)
        report = study_report(study)
        width = table_width(sys.stdout)
        print(format_table(report["trials"], width))
        print(wrap(summary_line(report["summary"]), width))
        lost = lost_configurations(study.get_trials(deepcopy=False))
        if lost:
            print(describe_lost(lost))
        reach = self._how_to_reach()
        if self.interrupts:
            print(f"interrupted: run the same `nkat-search up` again to resume (interrupted trials "
                  f"continue from their checkpoints); see the study with: nkat-search status "
                  f"{reach}")
            return 130
        exported = self._export(study, report["summary"])
        print(f"this study later: nkat-search status {reach}  (or export, study show)")
        state = report["budget"]  # budget_state(study), read once above
        if (self.args.timeout is not None and state
                and state["used"] < state["budget"]):
            print(f"--timeout {self.args.timeout:g} s: {state['used']} of {state['budget']} "
                  "trials of the budget ran; the same `nkat-search up` goes on with the rest")
        for label, exit_code, log in failed:
            print(f"{label} exited with {exit_code}; last lines of {log}:")
            print(tail(log))
        return 1 if failed or not exported else 0

    def _export(self, study, summary: dict) -> bool:
        """The best trials and the study files into ``RUN/export``; False when none completed."""
        from nkat_search.search.export import NothingToExport, export_best  # optuna: not for --help

        export_dir = self.run_dir / "export"
        try:
            exported = export_best(study, export_dir, top=self.args.top)
            print(exported.describe(export_dir))
        except NothingToExport:
            counts = ", ".join(f"{summary[k]} {k.replace('_', '-')}"
                               for k in ("pruned", "gate_failed", "failed", "interrupted")
                               if summary[k])
            print(f"nkat-search up: no trial completed ({counts or 'no trial ran'}): nothing to "
                  "export; the table above says why each trial stopped", flush=True)
            exported = None
        files = write_study_files(study, export_dir)
        if files.written:
            print(f"wrote {', '.join(p.name for p in files.written)} to {export_dir}")
        for warning in files.warnings:
            print(f"study files: {warning}")
        return exported is not None

    def _how_to_reach(self) -> str:
        """``--study NAME [--storage ...]``: what status / export need to find this study."""
        found_here = as_url(str(Path(UP_DEFAULT_OUT) / f"{self.study_name}.db"))
        if self.storage == found_here and not os.environ.get(STORAGE_ENV):
            return f"--study {self.study_name}"
        if os.environ.get(STORAGE_ENV) and as_url(os.environ[STORAGE_ENV]) == self.storage:
            return f"--study {self.study_name}  (storage from ${STORAGE_ENV})"
        if self.storage.startswith(SQLITE_SCHEME + "://"):
            path = sqlite_path(self.storage)
            try:
                path = path.relative_to(Path.cwd())
            except ValueError:
                pass
            return f"--study {self.study_name} --storage {path}"
        return f"--study {self.study_name} --storage {mask_url(self.storage)}"


def wait_for_http(address: str, process, timeout: float) -> bool:
    """Poll ``address`` until it answers; False if ``process`` exits or time runs out first."""
    # The HTTP client (35 ms, a quarter of `up --help`): when the dashboard starts.
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(address, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered, only not with 200
        except OSError:
            time.sleep(0.2)
    return False


def serving(process, settle_s: float = 1.0) -> bool:
    """True if ``process`` is still alive a moment after its address answered.

    Another process may hold the port (a second up picked the same free port an instant after
    the first): the address answers, but ours exits on "address already in use".
    """
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return process.poll() is None


def tail(path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in text.splitlines()[-lines:])
