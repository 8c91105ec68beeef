"""A pruner that stops a trial once its Local TPE can no longer reach the study's gate.

Hyperparameter-search pruners we know of (Optuna's median, percentile, successive halving and
Hyperband; Ray Tune's ASHA and PBT; Hyperopt; Vizier's early stopping) rank a trial against the
others: they stop what looks worse than its peers. None prunes against a hard threshold that the
*final* value must pass, which is what Round 2's gate is: a trial whose last Local TPE@CIFAR10 is
below it is thrown away whatever its rank, so every epoch it trains once it cannot get there is
wasted, even if it is the best of a bad lot. Optuna's ``ThresholdPruner`` compares the current
value with a fixed bound, which is the wrong question mid-training: what matters is where the
curve can still go.

The rule. Let ``b(e)`` be the trial's best Local TPE up to epoch ``e`` of ``E``. Every recorded
full curve ``c`` says how far a trial rose after ``e``: ``r_c(e) = v_c(E) / b_c(e)``. Because
TPE is accuracy / log10(1 + lambda) and lambda is fixed for a trial, this rise factor is the rise
in accuracy, and holds across model sizes (an additive rise in TPE would not). The largest rise
seen, ``R(e) = max_c r_c(e)``, is taken over the curves shipped with the project (``PRIOR_RISE``,
recorded with pruning off, ``benchmarks/round2_curves.yaml``) and every curve of the study itself
that reached its last epoch, so the prior holds before any trial has finished and the study can
only widen it. Without a shipped prior, nothing is stopped until the study has ``MIN_CURVES``
full curves of its own. The trial is stopped at epoch ``e < E`` iff

    b(e) * (1 + safety * (R(e) - 1)) < gate

``safety >= 1`` stretches the largest rise seen. With any safety, no trial whose curve is among
those behind ``R`` is stopped if it would have passed (its own rise is at most ``R(e)``);
``benchmarks/pruner_replay.py`` measures how that carries over to curves left out.

A ranking pruner can be put behind it (``rank``): a trial is stopped when either says so, except
that the rank pruner never stops a trial the study file queued (``enqueue``: the user's baseline,
reference configurations). Those are the references the user asked to see trained in full, and a
ranking pruner would often stop them early for being slower than their peers at a rung (the
baseline's curve ranks in the middle of Round 2's); the gate still applies to them.
"""

from __future__ import annotations

import math
from typing import Sequence

import optuna
from optuna.trial import FrozenTrial

from nkat_search.search import gate_prior
from nkat_search.search.gate_prior import PRIOR_EPOCHS, PRIOR_RISE

# Without a prior, the study's own full curves decide only once there are this many.
MIN_CURVES = 5


def rise_factors(curve: dict[int, float], epochs: int) -> dict[int, float]:
    """``{e: v(E) / best(v(1..e))}`` for a curve that reached epoch ``epochs``; {} otherwise."""
    if epochs not in curve:
        return {}
    final = curve[epochs]
    best = -math.inf
    out = {}
    for step in sorted(curve):
        if step >= epochs:
            break
        best = max(best, curve[step])
        if best > 0 and math.isfinite(final):
            out[step] = final / best
    return out


def largest_rises(curves, epochs: int) -> tuple[float, ...]:
    """``R(e)`` for e = 1 .. epochs - 1 over full ``curves`` (``{epoch: Local TPE}`` each)."""
    rises = [r for r in (rise_factors(curve, epochs) for curve in curves) if r]
    if not rises:
        return ()
    return tuple(max(r.get(e, 0.0) for r in rises) for e in range(1, epochs))


def prior_rise(epoch: int, epochs: int, prior: Sequence[float] = PRIOR_RISE,
               prior_epochs: int = PRIOR_EPOCHS) -> float | None:
    """The shipped rise factor at ``epoch`` of ``epochs``, read at the same share of training.

    The prior was recorded at ``prior_epochs``; another length reads it at the same fraction,
    rounded down to an earlier epoch, whose rise is the larger (a curve's rise factor never grows
    with the epoch), so the mapping errs on the side of training on. None without a prior.
    """
    if not prior:
        return None
    index = max(1, math.floor(prior_epochs * epoch / epochs))
    return prior[min(index, len(prior)) - 1]


class GatePruner(optuna.pruners.BasePruner):
    """Stops a trial whose Local TPE cannot reach ``gate`` by epoch ``epochs`` (module docstring).

    ``prior`` is the rise factor per epoch (index 0 is epoch 1 of ``prior_epochs``; default the
    shipped one, ``gate_prior.PRIOR_RISE``);
    ``rank`` an optional pruner asked as well. ``stopped_by`` names, after a ``prune`` that
    returned True, which rule stopped the trial (for the trial's recorded reason).
    """

    def __init__(self, gate: float, epochs: int, *, safety: float = 1.0,
                 prior: Sequence[float] | None = None, prior_epochs: int | None = None,
                 min_curves: int = MIN_CURVES, rank: optuna.pruners.BasePruner | None = None):
        if safety < 1:
            raise ValueError(f"safety must be >= 1, got {safety}")
        self.gate = gate
        self.epochs = epochs
        self.safety = safety
        # None: the shipped prior, read now (not at import) so that tests can replace it.
        self.prior = tuple(gate_prior.PRIOR_RISE if prior is None else prior)
        self.prior_epochs = gate_prior.PRIOR_EPOCHS if prior_epochs is None else prior_epochs
        self.min_curves = min_curves
        self.rank = rank
        self.stopped_by: str | None = None
        # Rise factors of finished curves, by trial number: a finished trial never changes.
        self._finished: dict[int, dict[int, float]] = {}

    def largest_rise(self, study: optuna.Study, epoch: int) -> float:
        """``R(epoch)``: the largest of the prior's rise and those of the study's full curves.

        Infinite (nothing is stopped) while there is no prior and fewer than ``min_curves`` full
        curves: the largest rise of one or two curves says little about the next.
        """
        own = []
        for trial in study.get_trials(deepcopy=False):
            if trial.number not in self._finished:
                if not (trial.state.is_finished() and self.epochs in trial.intermediate_values):
                    continue
                self._finished[trial.number] = rise_factors(trial.intermediate_values,
                                                            self.epochs)
            own.append(self._finished[trial.number].get(epoch))
        rises = [r for r in own if r is not None]
        prior = prior_rise(epoch, self.epochs, self.prior, self.prior_epochs)
        if prior is None and len(rises) < self.min_curves:
            return math.inf
        return max(rises + ([prior] if prior is not None else []))

    def cannot_pass(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """The gate rule alone."""
        step = trial.last_step
        if step is None or step >= self.epochs:
            return False
        best = max(trial.intermediate_values.values())  # every step reported so far is <= step
        if not best > 0:
            return False
        reach = best * (1 + self.safety * (self.largest_rise(study, step) - 1))
        return reach < self.gate

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        self.stopped_by = None
        if self.cannot_pass(study, trial):
            self.stopped_by = "gate"
        elif self.rank is not None:
            # Asked even for a queued trial: successive halving records its rung values then,
            # so the other trials are still ranked against the references.
            ranked_low = self.rank.prune(study, trial)
            if ranked_low and "fixed_params" not in trial.system_attrs:
                self.stopped_by = "rank"
        return self.stopped_by is not None
