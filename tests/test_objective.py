"""The two-stage objective with a stand-in trainer: the gate, the constraints, missing datasets.

The trainer is the only part replaced (``Objective(train_fn=...)``): it reports epochs and returns
results with the accuracies a test asks for, so the gate's boundary and the constraint values are
exact. The study, its storage (a SQLite file), the sampler, the pruner, Stage 2's table and the
trial record are the real ones.
"""

from __future__ import annotations

import math
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from nkat_search.search.coordinator import create_study
from nkat_search.search.objective import UNMEASURED_VIOLATION, Objective
from nkat_search.search.spec import parse_study_text
from nkat_search.search.storage import open_storage
from nkat_search.search.trials import TrialRecord, feasible, outcome
from nkat_search.train import metrics
from nkat_search.train.loop import EpochReport, TrainResult
from nkat_search.train.sources import DataError

optuna.logging.set_verbosity(optuna.logging.WARNING)

# lambda 9 makes log10(1 + lambda) exactly 1, so a TPE is exactly its accuracy.
LAM = 9.0


def spec_text(epochs: int = 2, pruner: dict | None = None, gate: float = 0.60) -> str:
    return yaml.safe_dump({
        "name": "objective-test", "n_trials": 4, "seed": 0,
        "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0}},
        "fixed": {"epochs": epochs, "warmup": 0},
        "gate": {"local_tpe": gate},
        "stage2": {"datasets": ["mnist", "fashion_mnist", "emnist"]},
        "sampler": {"type": "random", "constraints": {"consistency": 0.80, "robustness": 0.75}},
        "pruner": pruner or {"type": "none"},
    })


class StandInTrainer:
    """``train_model``'s signature; every epoch reports the dataset's final accuracy.

    A dataset without an accuracy is missing: its files are "not found", as ``load_split`` says.
    """

    def __init__(self, accuracy: dict[str, float]):
        self.accuracy = accuracy
        self.calls: list[str] = []

    def __call__(self, cfg, *, data_dir=None, device="auto", out_dir=None, on_epoch=None,
                 stop_requested=None, progress=True, resume=True, options=None) -> TrainResult:
        name = cfg.train.dataset
        self.calls.append(name)
        if name not in self.accuracy:
            raise DataError(f"{name}: not found under {data_dir} (stand-in)")
        accuracy = self.accuracy[name]
        tpe = metrics.tpe(accuracy, LAM)
        epochs = cfg.train.epochs
        for epoch in range(1, epochs + 1):
            if on_epoch is not None:
                on_epoch(EpochReport(epoch, epochs, name, 1.0, accuracy, LAM, tpe, 0.1, 100.0))
        return TrainResult(dataset=name, eval_split="val", accuracy=accuracy, parameters=9_000_000,
                           lam=LAM, tpe=tpe, epochs_run=epochs, resumed_from_epoch=0,
                           train_seconds=0.1 * epochs, images_per_s=100.0,
                           epoch_seconds=[0.1] * epochs, config=cfg.to_dict())


def run_one(tmp_path, trainer: StandInTrainer, **spec_kwargs) -> tuple[optuna.Study, object]:
    spec = parse_study_text(spec_text(**spec_kwargs), file_name="objective-test.yaml")
    study, _, _ = create_study(spec, open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    objective = Objective(spec, checkpoint_root=tmp_path / "ckpt", device="cpu", progress=False,
                          train_fn=trainer)
    study.optimize(objective, n_trials=1, catch=())
    return study, study.trials[-1]


def test_a_local_tpe_of_exactly_the_gate_passes_it(tmp_path):
    trainer = StandInTrainer({"cifar10": 0.60, "mnist": 0.60, "fashion_mnist": 0.60})
    _, trial = run_one(tmp_path, trainer, gate=0.60)
    assert metrics.tpe(0.60, LAM) == 0.60  # the boundary itself, not a value near it
    assert trial.state == TrialState.COMPLETE and outcome(trial) == "complete"
    assert trainer.calls == ["cifar10", "mnist", "fashion_mnist", "emnist"]


def test_below_the_gate_is_gate_failed_infeasible_and_never_reaches_stage_2(tmp_path):
    trainer = StandInTrainer({"cifar10": 0.5999})
    study, trial = run_one(tmp_path, trainer, gate=0.60)
    record = TrialRecord.of(trial)
    assert trial.state == TrialState.PRUNED and outcome(trial) == "gate_failed"
    assert trainer.calls == ["cifar10"]
    assert record.local_tpe == pytest.approx(0.5999) and record.reason == (
        "gate: Local TPE 0.5999 < 0.6")
    assert record.feasible is False and feasible(trial) is False
    shortfall = 1 - 0.5999 / 0.60
    assert trial.constraints == pytest.approx({"consistency": UNMEASURED_VIOLATION + shortfall,
                                               "robustness": UNMEASURED_VIOLATION + shortfall})
    assert record.global_tpe is None and record.datasets["cifar10"].accuracy == 0.5999
    assert (record.stage, record.dataset, record.epoch) == (1, "cifar10", 2)


def test_constraint_values_are_target_minus_measured(tmp_path):
    """Feasible when consistency >= 0.80 and robustness >= 0.75, as Optuna reads the signs."""
    accuracy = {"cifar10": 0.70, "mnist": 0.80, "fashion_mnist": 0.75}
    _, trial = run_one(tmp_path, StandInTrainer(accuracy), gate=0.60)
    record = TrialRecord.of(trial)
    tpes = [accuracy[n] for n in ("mnist", "fashion_mnist", "cifar10")]  # TPE = accuracy here
    mean = sum(tpes) / 3
    std = math.sqrt(sum((t - mean) ** 2 for t in tpes) / 3)
    assert record.consistency == pytest.approx(1 - std / mean)
    assert record.robustness == pytest.approx(min(tpes) / mean)
    assert trial.constraints == pytest.approx({"consistency": 0.80 - record.consistency,
                                               "robustness": 0.75 - record.robustness})
    assert all(v < 0 for v in trial.constraints.values())  # both met: negative values
    assert record.feasible is True and feasible(trial) is True
    assert trial.value == pytest.approx(mean / math.log10(1 + LAM))


def test_a_trial_that_misses_robustness_is_complete_but_infeasible(tmp_path):
    accuracy = {"cifar10": 0.60, "mnist": 0.99, "fashion_mnist": 0.99}
    study, trial = run_one(tmp_path, StandInTrainer(accuracy), gate=0.60)
    record = TrialRecord.of(trial)
    assert trial.state == TrialState.COMPLETE and record.robustness < 0.75
    assert trial.constraints["robustness"] == pytest.approx(0.75 - record.robustness)
    assert trial.constraints["robustness"] > 0
    assert record.feasible is False and feasible(trial) is False
    with pytest.raises(ValueError, match="No feasible trials"):
        study.best_trial


def test_a_missing_dataset_is_named_and_left_out_of_global_tpe(tmp_path):
    accuracy = {"cifar10": 0.70, "mnist": 0.90, "fashion_mnist": 0.80}
    _, trial = run_one(tmp_path, StandInTrainer(accuracy), gate=0.60)
    record = TrialRecord.of(trial)
    assert record.missing_datasets == ["emnist"] and "emnist" not in record.datasets
    assert set(record.datasets) == {"cifar10", "mnist", "fashion_mnist"}
    assert record.global_tpe == pytest.approx(sum(accuracy.values()) / 3)
    # Flat attributes, one per dataset and number, readable in optuna-dashboard.
    assert trial.user_attrs["accuracy_mnist"] == 0.90 and trial.user_attrs["tpe_cifar10"] == 0.70
    assert "datasets" not in trial.user_attrs
    assert (record.stage, record.dataset) == (2, "fashion_mnist")


def test_the_pruner_stops_a_trial_before_its_last_epoch_and_says_why(tmp_path):
    trainer = StandInTrainer({"cifar10": 0.65})
    _, trial = run_one(tmp_path, trainer, epochs=3,
                       pruner={"type": "threshold", "lower": 0.7, "n_warmup_steps": 0})
    record = TrialRecord.of(trial)
    assert trial.state == TrialState.PRUNED and outcome(trial) == "pruned"
    assert record.reason == "pruned at epoch 1 of 3 by the threshold pruner (Local TPE 0.6500)"
    assert record.feasible is False and trial.last_step == 1


def test_the_gate_pruner_stops_a_hopeless_trial_in_its_first_epoch_and_says_so(tmp_path,
                                                                              monkeypatch):
    """A prior of 3 epochs that never rose more than 1.5x: a flat Local TPE of 0.30 cannot reach
    0.60 (0.30 x 1.5 = 0.45), so the gate pruner stops it after its first epoch."""
    monkeypatch.setattr("nkat_search.search.gate_prior.PRIOR_RISE", (1.5, 1.2))
    monkeypatch.setattr("nkat_search.search.gate_prior.PRIOR_EPOCHS", 3)
    _, trial = run_one(tmp_path, StandInTrainer({"cifar10": 0.30}), epochs=3, gate=0.60,
                       pruner={"type": "gate"})
    record = TrialRecord.of(trial)
    assert outcome(trial) == "pruned" and trial.last_step == 1
    assert record.reason == ("pruned at epoch 1 of 3 by the gate pruner (it can no longer reach "
                             "the gate) (Local TPE 0.3000)")


def test_the_gate_pruner_lets_a_trial_that_can_still_pass_train_to_the_gate(tmp_path,
                                                                            monkeypatch):
    """0.45 x 1.5 = 0.675 >= 0.60 after epoch 1 and 0.45 x 1.2 = 0.54 < 0.60 after epoch 2:
    stopped there, one epoch later than the hopeless one."""
    monkeypatch.setattr("nkat_search.search.gate_prior.PRIOR_RISE", (1.5, 1.2))
    monkeypatch.setattr("nkat_search.search.gate_prior.PRIOR_EPOCHS", 3)
    _, trial = run_one(tmp_path, StandInTrainer({"cifar10": 0.45}), epochs=3, gate=0.60,
                       pruner={"type": "gate"})
    assert outcome(trial) == "pruned" and trial.last_step == 2


def test_after_the_last_epoch_the_gate_decides_not_the_pruner(tmp_path):
    """A one-epoch trial above the gate but below the pruner's threshold completes."""
    trainer = StandInTrainer({"cifar10": 0.65, "mnist": 0.65, "fashion_mnist": 0.65})
    _, trial = run_one(tmp_path, trainer, epochs=1,
                       pruner={"type": "threshold", "lower": 0.7, "n_warmup_steps": 0})
    assert trial.state == TrialState.COMPLETE


class SlowStandInTrainer(StandInTrainer):
    """A stand-in that takes a set wall time per dataset (CIFAR-10 and each Stage 2 dataset)."""

    def __init__(self, accuracy: dict[str, float], seconds: dict[str, float]):
        super().__init__(accuracy)
        self.seconds = seconds

    def __call__(self, cfg, **kwargs) -> TrainResult:
        time.sleep(self.seconds.get(cfg.train.dataset, 0.0))
        return super().__call__(cfg, **kwargs)


def test_a_trial_records_its_wall_time_up_to_the_gate_apart_from_stage_2(tmp_path):
    accuracy = {"cifar10": 0.70, "mnist": 0.80, "fashion_mnist": 0.75}
    trainer = SlowStandInTrainer(accuracy, {"cifar10": 0.3, "mnist": 0.5, "fashion_mnist": 0.5})
    _, trial = run_one(tmp_path, trainer, gate=0.60)
    timings = TrialRecord.of(trial).timings
    assert trial.state == TrialState.COMPLETE
    assert 0.3 <= timings["time_stage1_s"] < 0.3 + 1.0
    assert timings["time_trial_s"] - timings["time_stage1_s"] >= 1.0  # Stage 2's two datasets


def test_a_pruned_trial_has_no_stage_1_time_and_a_gate_failed_one_has(tmp_path):
    (tmp_path / "pruned").mkdir()
    (tmp_path / "failed").mkdir()
    _, pruned = run_one(tmp_path / "pruned", StandInTrainer({"cifar10": 0.65}), epochs=3,
                        pruner={"type": "threshold", "lower": 0.7, "n_warmup_steps": 0})
    _, failed = run_one(tmp_path / "failed", StandInTrainer({"cifar10": 0.5999}), gate=0.60)
    assert outcome(pruned) == "pruned" and "time_stage1_s" not in TrialRecord.of(pruned).timings
    assert outcome(failed) == "gate_failed" and "time_stage1_s" in TrialRecord.of(failed).timings
