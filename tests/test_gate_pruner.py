"""The gate pruner on real Optuna studies with hand-made curves (search/gate_pruner.py).

Every expected epoch below is worked out by hand from the rule
``best(e) * (1 + safety * (R(e) - 1)) < gate`` with the stated prior.
"""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from nkat_search.config import ConfigError
from nkat_search.search.coordinator import build_pruner
from nkat_search.search.gate_pruner import GatePruner, largest_rises, prior_rise, rise_factors
from nkat_search.search.spec import parse_study_text

optuna.logging.set_verbosity(optuna.logging.WARNING)

GATE = 0.60
EPOCHS = 4
# After epoch 1 a trial rose at most 2x, after 2 1.5x, after 3 1.2x (epoch 4 is the last).
PRIOR = (2.0, 1.5, 1.2)


def run_curve(study: optuna.Study, curve: list[float]) -> int:
    """Report ``curve`` as the objective does; the epochs trained (pruned before the last one)."""
    trial = study.ask()
    for epoch, value in enumerate(curve, start=1):
        trial.report(value, epoch)
        if epoch < len(curve) and trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return epoch
    if curve[-1] < GATE:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, curve[-1])
    return len(curve)


def gate_study(**kwargs) -> optuna.Study:
    pruner = GatePruner(GATE, EPOCHS, prior=kwargs.pop("prior", PRIOR), prior_epochs=EPOCHS,
                        **kwargs)
    return optuna.create_study(direction="maximize", pruner=pruner)


def test_the_prior_applies_before_any_trial_has_finished():
    # Epoch 1: 0.25 * 2.0 = 0.50 < 0.60, so it cannot reach the gate: stopped at once.
    assert run_curve(gate_study(), [0.25, 0.30, 0.35, 0.40]) == 1


def test_a_trial_is_stopped_at_the_first_epoch_the_rule_allows():
    # Epoch 1: 0.31 * 2.0 = 0.62 (can); epoch 2: 0.38 * 1.5 = 0.57 < 0.60 (cannot).
    study = gate_study()
    assert run_curve(study, [0.31, 0.38, 0.45, 0.50]) == 2
    assert study.pruner.stopped_by == "gate"


def test_a_trial_that_can_still_pass_is_never_stopped():
    # Exactly at the largest rise every epoch: 0.30 * 2 = 0.40 * 1.5 = 0.50 * 1.2 = 0.60.
    study = gate_study()
    assert run_curve(study, [0.30, 0.40, 0.50, 0.60]) == EPOCHS
    assert study.trials[-1].state == TrialState.COMPLETE


def test_every_curve_behind_the_prior_that_passes_is_kept():
    curves = [[0.20, 0.45, 0.55, 0.61], [0.40, 0.42, 0.50, 0.62], [0.50, 0.55, 0.58, 0.59]]
    prior = largest_rises([dict(enumerate(c, start=1)) for c in curves], EPOCHS)
    for curve in curves:
        study = gate_study(prior=prior)
        assert (run_curve(study, curve) == EPOCHS) or curve[-1] < GATE


def test_the_best_value_so_far_counts_not_a_dip():
    # Epoch 2 dips to 0.30, but the best so far is 0.45: 0.45 * 1.5 = 0.675, it trains on.
    assert run_curve(gate_study(), [0.45, 0.30, 0.52, 0.61]) == EPOCHS


def test_the_studys_own_curves_widen_the_prior():
    study = gate_study()
    # A finished trial (trained with pruning off) that rose 3x after epoch 1: R(1) is 3.0 now.
    study.add_trial(optuna.trial.create_trial(
        value=0.63, intermediate_values={1: 0.21, 2: 0.40, 3: 0.55, 4: 0.63}))
    # 0.25 * 3.0 = 0.75: it may still pass, so epoch 1 no longer stops it; epoch 2: 0.30 * 1.575
    # (the finished trial's 0.63 / 0.40) = 0.4725 < 0.60 stops it.
    assert run_curve(study, [0.25, 0.30, 0.35, 0.40]) == 2


def test_safety_stretches_the_rise():
    # safety 1.2 at epoch 2: 0.38 * (1 + 1.2 * 0.5) = 0.608 >= 0.60, trains on; epoch 3:
    # 0.45 * (1 + 1.2 * 0.2) = 0.558 < 0.60, stopped.
    assert run_curve(gate_study(safety=1.2), [0.31, 0.38, 0.45, 0.50]) == 3


def test_without_a_prior_the_study_decides_only_from_min_curves_of_its_own():
    study = gate_study(prior=(), min_curves=2)
    assert run_curve(study, [0.02, 0.02, 0.02, 0.02]) == EPOCHS  # no evidence: trains on
    study.add_trial(optuna.trial.create_trial(
        value=0.62, intermediate_values={1: 0.31, 2: 0.50, 3: 0.60, 4: 0.62}))
    # Two full curves now; the flat one rose 1.0x, the other 2.0x after epoch 1: R(1) = 2.0.
    assert run_curve(study, [0.25, 0.30, 0.35, 0.40]) == 1


def test_a_rank_pruner_behind_the_gate_stops_what_it_ranks_low():
    rank = optuna.pruners.ThresholdPruner(lower=0.5, n_warmup_steps=0)
    study = gate_study(rank=rank)
    # The gate lets it train (0.45 * 2.0 = 0.9), the threshold does not (0.45 < 0.5).
    assert run_curve(study, [0.45, 0.60, 0.62, 0.65]) == 1
    assert study.pruner.stopped_by == "rank"


def test_the_rank_pruner_never_stops_a_queued_trial_but_the_gate_does():
    rank = optuna.pruners.ThresholdPruner(lower=0.5, n_warmup_steps=0)
    study = gate_study(rank=rank)
    # Queued (the study file's enqueue): the threshold ranks it low, it trains on and passes.
    study.enqueue_trial({})
    assert run_curve(study, [0.45, 0.60, 0.62, 0.65]) == EPOCHS
    assert study.trials[-1].state == TrialState.COMPLETE
    # The same curve not queued is stopped by the rank pruner, as above.
    assert run_curve(study, [0.45, 0.60, 0.62, 0.65]) == 1
    # Queued but hopeless: the gate stops it (0.25 * 2.0 = 0.50 < 0.60).
    study.enqueue_trial({})
    assert run_curve(study, [0.25, 0.30, 0.35, 0.40]) == 1
    assert study.pruner.stopped_by == "gate"


def test_successive_halving_still_ranks_others_against_a_queued_trial():
    rank = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    study = gate_study(rank=rank)
    study.enqueue_trial({})
    assert run_curve(study, [0.55, 0.60, 0.62, 0.65]) == EPOCHS  # the queued reference
    # Below the reference at the first rung: successive halving stops it, so the reference's
    # rung value was recorded although its own verdict was ignored.
    assert run_curve(study, [0.40, 0.55, 0.60, 0.62]) == 1
    assert study.pruner.stopped_by == "rank"


def test_rise_factors_and_the_prior_at_another_length():
    assert rise_factors({1: 0.2, 2: 0.5, 3: 0.4, 4: 0.6}, 4) == pytest.approx(
        {1: 3.0, 2: 1.2, 3: 1.2})
    assert rise_factors({1: 0.2, 2: 0.5}, 4) == {}
    # 2 epochs read the 4-epoch prior at the same share: epoch 1 of 2 is epoch 2 of 4.
    assert prior_rise(1, 2, PRIOR, 4) == 1.5
    # 8 epochs: epoch 3 of 8 is 1.5 of 4, read at the earlier epoch 1 (the larger rise).
    assert prior_rise(3, 8, PRIOR, 4) == 2.0


def _spec(pruner: dict):
    return parse_study_text(yaml.safe_dump({
        "name": "gate-test", "n_trials": 2,
        "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0}},
        "fixed": {"epochs": 8, "warmup": 0}, "gate": {"local_tpe": 0.55}, "pruner": pruner,
    }), file_name="gate-test.yaml")


def test_a_study_file_selects_the_gate_pruner_with_a_rank_pruner():
    spec = _spec({"type": "gate", "safety": 1.1,
                  "rank": {"type": "successive_halving", "min_resource": 2, "reduction_factor": 3}})
    pruner = build_pruner(spec)
    assert isinstance(pruner, GatePruner)
    assert (pruner.gate, pruner.epochs, pruner.safety) == (0.55, 8, 1.1)
    assert isinstance(pruner.rank, optuna.pruners.SuccessiveHalvingPruner)


@pytest.mark.parametrize("pruner, words", [
    ({"type": "gate", "safety": 0.9}, "pruner.safety: must be >= 1"),
    ({"type": "gate", "rank": {"type": "gate"}}, "pruner.rank.type: expected one of"),
    ({"type": "gate", "rank": {"type": "median", "patience": 2}}, "pruner.rank.patience"),
    ({"type": "successive_halving", "reduction_factor": 1}, "pruner.reduction_factor"),
])
def test_bad_gate_pruner_settings_are_one_line_naming_the_key(pruner, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        _spec(pruner)
