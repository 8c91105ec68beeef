"""The two-stage objective: CIFAR-10 with pruning and a Local TPE gate, then Global TPE.

Stage 1 trains the trial's config on CIFAR-10 and reports Local TPE@CIFAR10 after every epoch;
the pruner may stop it there. A trial that finishes below the gate ends PRUNED with
``outcome=gate_failed``: it was judged, not broken, and it has no Global TPE to score. Stage 2
trains the survivors on the study's other datasets with the same hyperparameters; the trial's
value is Global TPE over every dataset that ran, and datasets whose files are missing are listed
in ``missing_datasets`` (never silently dropped).

A crash is never a score: any exception sets ``outcome=failed`` and ``error`` and propagates, so
Optuna records FAIL. Whatever the outcome, the trial's ``time_*_s`` attributes say where its wall
time went (data, setup, compile, training steps, evaluation, checkpoints; ``time_trial_s`` is the
whole objective) and ``train_images`` how many images it trained. Checkpoints live in
``<root>/<study>/trial-<n>/<dataset>/``, where ``n`` is the *original* trial of a retry chain, so a
retry continues from the epoch its predecessor finished; a checkpoint that cannot be read is set
aside and that dataset resumes from the one before, or starts over. With a checkpoint store
(``checkpoint_store.py``) each checkpoint is also copied there after its epoch and after a stop,
and a trial takes its checkpoints from there before it trains, so a retry on another host resumes
too. Two exceptions are not
crashes and write nothing: ``HeartbeatLost`` (the worker lost the storage for too long, and
another worker may own the trial by now) and ``StorageUnavailable``.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import optuna
import torch

from nkat_search.config import CHECKPOINT_INTERVAL_S, COMPILE_SCOPE, RunConfig
from nkat_search.search import trials as trial_record
from nkat_search.search.disk import is_host_fault
from nkat_search.search.heartbeat import HeartbeatLost
from nkat_search.search.resilient_storage import StorageUnavailable
from nkat_search.search.space import suggest_config
from nkat_search.search.spec import STAGE1_DATASET, StudySpec
from nkat_search.search.stale_trials import original_number, retried_trial_number, trial_dir
from nkat_search.search.trials import (CHECKPOINT_NOT_WRITTEN, INTERRUPTED, OUT_OF_MEMORY,
                                       DatasetScore)
from nkat_search.terminal import draws_bars
# loop.train_model is looked up when a trial starts, so a stand-in put there is the one trained.
from nkat_search.train import loop
from nkat_search.train.device import torch_device
from nkat_search.train.errors import DeviceError
from nkat_search.train.loop import (CHECKPOINT_NAME, CheckpointNotWritten, CheckpointUnreadable,
                                    Timings, TrainingInterrupted, TrainOptions,
                                    previous_checkpoint)
from nkat_search.train.session import TrainingSession
from nkat_search.train.stage2 import run_stage2, write_report

# Constraint value of a trial that never reached Stage 2. Measured violations stay below it
# (consistency >= 1 - sqrt(3) over 4 datasets, robustness >= 0, so at most ~1.53 and 0.75).
UNMEASURED_VIOLATION = 2.0


class Objective:
    """``objective(trial) -> Global TPE`` for ``study.optimize``.

    ``on_start`` runs once the trial's parameters are drawn (the worker holds the study lock
    until then, so the proposal depends on the study's history and the trial number only);
    ``stop_requested`` is polled after every step (SIGTERM / SIGINT in the worker).
    ``train_fn`` replaces ``train.loop.train_model`` (tests pass a stand-in trainer).
    ``preflight()`` checks that the worker can run a trial at all, before it takes one.
    """

    def __init__(self, spec: StudySpec, *, checkpoint_root: str | Path, data_dir=None,
                 device: str = "auto", worker: str = "", progress: bool | None = None,
                 stop_requested: Callable[[], bool] | None = None,
                 on_start: Callable[[], None] | None = None,
                 checkpoint_interval_s: float | None = None,
                 train_fn: Callable | None = None, checkpoint_store=None,
                 compile_scope: str = COMPILE_SCOPE):
        self.spec = spec
        self.checkpoint_root = Path(checkpoint_root)
        self.data_dir = data_dir
        self.device = device
        self.worker = worker
        self.progress = draws_bars(sys.stderr) if progress is None else progress
        self.stop_requested = stop_requested or (lambda: False)
        self.on_start = on_start
        self.checkpoint_interval_s = checkpoint_interval_s
        self.train_fn = train_fn
        self.checkpoint_store = checkpoint_store  # a CheckpointStore, or None: local folder only
        self.compile_scope = compile_scope
        self._stored: dict[Path, tuple] = {}  # checkpoint file -> what was last copied to the store
        self.trial_number: int | None = None
        self._session = None  # a TrainingSession, made when first needed (the preflight)
        self._where: dict = {}  # the running trial's stage, dataset and epoch, as last written
        self.host_fault: BaseException | None = None  # the last trial's disk error, if any
        # (epoch, Local TPE) of a report the storage did not take (an outage stopped the trial
        # there): the worker sends it once the storage is back, before it queues the retry,
        # which resumes past that epoch and would otherwise leave a gap in the curve.
        self.unsent_report: tuple[int, float] | None = None

    def _options(self, timings):
        """The trial's TrainOptions: this worker's session, the trial's timings accumulator."""
        if self._session is None:
            self._session = TrainingSession()
        interval = (CHECKPOINT_INTERVAL_S if self.checkpoint_interval_s is None
                    else self.checkpoint_interval_s)
        return TrainOptions(session=self._session, timings=timings,
                            checkpoint_interval_s=interval, compile_scope=self.compile_scope)

    def preflight(self) -> str:
        """Check, before any trial is taken, that this worker can run one; returns the device.

        A worker that cannot (a device that does not exist or does not work, CIFAR-10 missing
        or corrupt) would otherwise fail every trial it takes in under a second and drain the
        study's budget. Stage 1's dataset is loaded into the worker's session, where the first
        trial finds it; Stage 2 datasets may be missing (they are reported per trial).
        """
        device = torch_device(self.device)  # DeviceError for a bad name or an absent GPU
        try:
            (torch.ones(8, device=device) * 2).sum().item()
        except Exception as err:  # noqa: BLE001 - a device that cannot add is no device
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DeviceError(self.device, f"the device does not work ({first})") from None
        tc = self.spec.base_config().train
        shape = dict(emnist_split=tc.emnist_split, val_fraction=tc.val_fraction, seed=tc.seed,
                     train_limit=tc.train_limit, test_limit=tc.test_limit)
        self._options(None).session.dataset(STAGE1_DATASET, self.data_dir, device, **shape)
        return str(device)

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_number = trial.number
        self.host_fault = None
        self.unsent_report = None
        timings = Timings()
        started = time.perf_counter()
        self._gate_reached_at = None  # perf_counter() when Stage 1 ended, if it did
        lost = False
        try:
            trial.set_user_attr("worker", self.worker)
            try:
                return self._run(trial, timings)
            except CheckpointUnreadable as err:
                # The damaged files were set aside: the second run resumes from what is left
                # (the other datasets' checkpoints) and trains the damaged one from scratch.
                print(f"trial {trial.number}: {err}", file=sys.stderr, flush=True)
                return self._run(trial, timings)
        except optuna.TrialPruned:
            raise
        except (HeartbeatLost, StorageUnavailable):
            # Nothing more is written: another worker may own the trial by now (worker.py).
            lost = True
            raise
        except KeyboardInterrupt:
            _fail(trial, f"{INTERRUPTED}: forced stop (second signal)")
            raise
        except Exception as err:
            if isinstance(err, TrainingInterrupted):
                try:
                    self._store_checkpoints(trial)
                except Exception as store_err:  # noqa: BLE001 - the retry resumes from an older one
                    print(f"trial {trial.number}: {store_err}", file=sys.stderr, flush=True)
                _fail(trial, f"{INTERRUPTED}: stopped {err.where}, checkpoint kept")
            elif _is_out_of_memory(err):
                _fail(trial, f"{OUT_OF_MEMORY}: {err}")
            elif is_host_fault(err):
                self.host_fault = err
                _fail(trial, f"{CHECKPOINT_NOT_WRITTEN}: {err}")
            else:
                _fail(trial, f"{type(err).__name__}: {err}")
            raise
        finally:
            if not lost:
                stage1_s = (None if self._gate_reached_at is None
                            else self._gate_reached_at - started)
                _record_timings(trial, timings, time.perf_counter() - started, stage1_s)
            if self._session is not None:
                # The next trial is almost always another architecture; its CUDA graphs and
                # memory pool must not wait for it (an out-of-memory neighbour may need them).
                self._session.release_model()

    def _run(self, trial: optuna.Trial, timings) -> float:
        train = self.train_fn or loop.train_model
        spec = self.spec
        cfg = RunConfig.from_dict({"dataset": STAGE1_DATASET}, base=suggest_config(trial, spec))
        if self.on_start is not None:
            self.on_start()
        self._where = {"stage": 1, "dataset": STAGE1_DATASET, "epoch": 0}
        scope = {"compile_scope": self.compile_scope} if cfg.train.compile else {}
        trial_record.write(trial, config=cfg.to_dict(), retry_of=retried_trial_number(trial),
                           **scope, **self._where)
        folder = trial_dir(self.checkpoint_root, spec.name, trial)
        self._restore_checkpoints(trial)
        options = self._options(timings)
        stage1 = train(cfg, data_dir=self.data_dir, device=self.device,
                       out_dir=folder / STAGE1_DATASET,
                       on_epoch=lambda report: self._stage1_epoch(trial, report),
                       stop_requested=self.stop_requested, progress=self.progress,
                       options=options)
        # Stage 1's share of the trial's wall time: what a survivor's Stage 2 costs beside it.
        self._gate_reached_at = time.perf_counter()
        self._gate(trial, stage1)
        report = run_stage2(cfg, self._start_stage2(trial), data_dir=self.data_dir,
                            device=self.device, out_dir=folder, results={STAGE1_DATASET: stage1},
                            progress=self.progress, train_fn=train,
                            train_kwargs={"stop_requested": self.stop_requested,
                                          # Only the last epoch is scored; nothing prunes here.
                                          "options": replace(options, evaluate_every_epoch=False),
                                          "on_epoch": lambda r: self._track(trial, r)})
        write_report(report, folder)
        return self._complete(trial, report)

    def _track(self, trial: optuna.Trial, report) -> None:
        """Where the trial is, for ``up``'s live line: only what changed, once per epoch; the
        epoch's checkpoint, if it wrote one, goes to the checkpoint store."""
        self._store_checkpoints(trial, [report.dataset])
        now = {"dataset": report.dataset, "epoch": report.epoch}
        trial_record.write(trial, **{k: v for k, v in now.items() if self._where.get(k) != v})
        self._where.update(now)

    def _stage1_epoch(self, trial: optuna.Trial, report) -> None:
        """A CIFAR-10 epoch: its Local TPE goes to the pruner, which may stop the trial here."""
        self.unsent_report = (report.epoch, report.tpe)
        self._track(trial, report)
        with warnings.catch_warnings():
            # A retry inherits the epochs its lost attempt reported; one that starts over (the
            # checkpoint stayed on a lost machine) reports them again, and Optuna keeps the
            # first value and warns. Expected here, so not shown.
            warnings.filterwarnings("ignore", message="The reported value is ignored because")
            trial.report(report.tpe, report.epoch)
        self.unsent_report = None
        # After the last epoch the gate decides; pruning there would only hide its verdict.
        if report.epoch < report.epochs and trial.should_prune():
            trial_record.write(trial, outcome="pruned", feasible=False, local_tpe=report.tpe,
                         datasets={STAGE1_DATASET: _score(report)},
                         reason=f"pruned at epoch {report.epoch} of {report.epochs} by the "
                                f"{_pruner_name(trial, self.spec)} (Local TPE {report.tpe:.4f})")
            self._unmeasured(trial, report.tpe)
            raise optuna.TrialPruned(f"Local TPE {report.tpe:.4f} at epoch {report.epoch}")

    def _gate(self, trial: optuna.Trial, stage1) -> None:
        """Record Stage 1; below the gate the trial ends PRUNED (``gate_failed``), and a stop
        asked for in its last step ends it before Stage 2."""
        trial_record.write(trial, local_tpe=stage1.tpe, datasets={STAGE1_DATASET: _score(stage1)},
                     resumed_from_epoch=stage1.resumed_from_epoch)
        gate = self.spec.gate
        if stage1.tpe < gate:
            trial_record.write(trial, outcome="gate_failed", feasible=False,
                         reason=f"gate: Local TPE {stage1.tpe:.4f} < {gate:g}")
            self._unmeasured(trial, stage1.tpe)
            raise optuna.TrialPruned(f"gate: Local TPE@CIFAR10 {stage1.tpe:.4f} < {gate}")
        if self.stop_requested():
            raise TrainingInterrupted(stage1.epochs_run)

    def _start_stage2(self, trial: optuna.Trial) -> list[str]:
        """Stage 2's datasets (CIFAR-10's run is Stage 1's); the trial says it is there now."""
        if self.spec.stage2_datasets:
            first = {"stage": 2, "dataset": self.spec.stage2_datasets[0], "epoch": 0}
            trial_record.write(trial, **first)
            self._where.update(first)
        return [*self.spec.stage2_datasets, STAGE1_DATASET]

    def _complete(self, trial: optuna.Trial, report) -> float:
        """Record the Stage 2 table and the constraints; returns the trial's value, Global TPE."""
        # A retry resumes inside Stage 2 too (CIFAR-10's resume is resumed_from_epoch).
        resumed = {name: result["resumed_from_epoch"] for name, result in report.results.items()
                   if name != STAGE1_DATASET and result["resumed_from_epoch"]}
        if resumed:
            trial_record.write(trial, resumed=resumed)
        table = report.table
        trial_record.write(trial,
                           datasets={row.dataset: DatasetScore(row.accuracy, row.lam, row.tpe)
                                     for row in table.rows},
                           global_tpe=table.global_tpe, consistency=table.consistency,
                           robustness=table.robustness, missing_datasets=sorted(report.missing))
        # Feasible iff every value <= 0 (Optuna's convention); TPE models the good region from
        # feasible trials first, then from the least violating ones.
        measured = {"consistency": table.consistency, "robustness": table.robustness}
        violations = {key: target - measured[key] for key, target in self.spec.constraints.items()}
        for key, value in violations.items():
            trial.set_constraint(key, value)
        trial_record.write(trial, feasible=all(v <= 0 for v in violations.values()),
                           outcome="complete")
        return table.global_tpe

    def resend_report(self, trial: optuna.Trial) -> None:
        """Send the report an outage interrupted (the storage is back; the trial still ours)."""
        if self.unsent_report is not None and self.trial_number == trial.number:
            epoch, value = self.unsent_report
            self.unsent_report = None
            trial.report(value, epoch)

    def datasets(self) -> list[str]:
        """Every dataset a trial of this study trains, CIFAR-10 first."""
        return [STAGE1_DATASET, *[d for d in self.spec.stage2_datasets if d != STAGE1_DATASET]]

    def _restore_checkpoints(self, trial) -> None:
        """The store's checkpoints of this trial (a retry's, maybe from another host) into the
        local folder, where the trainer resumes from them."""
        store = self.checkpoint_store
        if store is None:
            return
        folder = trial_dir(self.checkpoint_root, self.spec.name, trial)
        number = original_number(trial)
        for dataset in self.datasets():
            path = folder / dataset / CHECKPOINT_NAME
            if store.restore(self.spec.name, number, dataset, path.parent, path.name,
                             previous_checkpoint(path).name):
                self._stored[path] = _identity(path)

    def _store_checkpoints(self, trial, datasets=None) -> None:
        """Copy each checkpoint the trainer wrote since the last copy into the store; a store
        that cannot take it is the host's fault, as a full local disk is."""
        store = self.checkpoint_store
        if store is None:
            return
        folder = trial_dir(self.checkpoint_root, self.spec.name, trial)
        number = original_number(trial)
        for dataset in datasets or self.datasets():
            path = folder / dataset / CHECKPOINT_NAME
            now = _identity(path)
            if now is None or self._stored.get(path) == now:
                continue
            try:
                store.upload(self.spec.name, number, dataset, path)
            except Exception as err:  # noqa: BLE001 - a store that fails is the host's trouble
                raise CheckpointNotWritten(Path(store.url), err) from err
            self._stored[path] = now

    def _unmeasured(self, trial: optuna.Trial, local_tpe: float) -> None:
        """Mark a trial stopped before Stage 2 infeasible, behind every measured one.

        Without constraints TPE would rank such a trial (Optuna's PRUNED group) *above* completed
        but infeasible ones, and chase configurations that never pass the gate. A trial that
        never reached Stage 2 is no solution, so it is infeasible: by ``UNMEASURED_VIOLATION``
        plus its shortfall from the gate (0..1), so the nearer misses rank first.
        """
        shortfall = min(1.0, max(0.0, 1.0 - local_tpe / self.spec.gate))
        for key in self.spec.constraints:
            trial.set_constraint(key, UNMEASURED_VIOLATION + shortfall)


def _identity(path: Path):
    """What tells one written checkpoint from the next (a rename gives a new inode)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _pruner_name(trial: optuna.Trial, spec: StudySpec) -> str:
    """Which rule stopped the trial, in words: the gate pruner says whether it was the gate."""
    kind = spec.pruner.get("type", "none")
    if kind != "gate":
        return f"{kind} pruner"
    pruner = getattr(getattr(trial, "study", None), "pruner", None)
    if getattr(pruner, "stopped_by", None) == "rank":
        return f"{spec.pruner['rank']['type']} pruner"
    return "gate pruner (it can no longer reach the gate)"


def _score(result) -> DatasetScore:
    """A dataset's row from a ``TrainResult`` or an ``EpochReport``."""
    return DatasetScore(result.accuracy, result.lam, result.tpe)


def _is_out_of_memory(err: Exception) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError)


def _record_timings(trial: optuna.Trial, timings, trial_seconds: float,
                    stage1_seconds: float | None) -> None:
    """Where the trial's time went, as flat attributes (readable in the dashboard and ``status``);
    ``time_stage1_s`` is the wall time up to the gate, for trials that got there."""
    stage1 = {} if stage1_seconds is None else {"time_stage1_s": stage1_seconds}
    try:
        trial_record.write(trial, timings={**timings.as_attrs(), "time_trial_s": trial_seconds,
                                           **stage1})
    except Exception:  # storage trouble must not mask the trial's own outcome
        pass


def _fail(trial: optuna.Trial, error: str) -> None:
    """Record a failure before Optuna marks the trial FAIL; storage trouble must not mask it."""
    try:
        outcome = "interrupted" if error.startswith(INTERRUPTED) else "failed"
        trial_record.write(trial, outcome=outcome, error=" ".join(error.split())[:1000])
    except Exception:
        pass
