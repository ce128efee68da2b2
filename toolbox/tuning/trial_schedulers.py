"""Trial schedulers (Tune's early stopping), chosen by ``trial_scheduler`` in a sweep file.

A trial scheduler is one function ``fn(sweep, /, *, <options>) -> TrialScheduler``: its keyword-only
parameters are the ``scheduler_options`` a sweep file may set, checked by their type hints like a
component's. It raises a ``ConfigError`` for a sweep it cannot schedule; it is built once when the
sweep file is checked, so that happens before Ray starts. One registered with ``replayed=True`` is fed each
restored trial's epochs again when a sweep is re-run (Tune's restore drops a scheduler's state), to rebuild
its rungs or medians from them.

In a multi-objective sweep (``metric`` a list), ``moasha`` ranks by every objective; ``asha`` refuses one,
``median_stopping`` compares the objective its ``objective`` option names, and the others rank by the primary
objective (the first), as Tune does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from toolbox.config.registry import ConfigError, NonNegativeFloat, PositiveFloat, PositiveInt, Range, Registry, UnitInterval

if TYPE_CHECKING:
    from ray.tune.schedulers import TrialScheduler

    from toolbox.tuning.sweepfile import Sweep

TRIAL_SCHEDULERS = Registry("trial scheduler", selector="trial_scheduler")
TIME_ATTR = "training_iteration"  # one iteration is one epoch: a trial reports once per epoch
ReductionFactor = Annotated[float, Range(gt=1)]


def trial_scheduler(sweep: Sweep) -> TrialScheduler:
    """The sweep's trial scheduler, with its ``scheduler_options``."""
    return TRIAL_SCHEDULERS[sweep.trial_scheduler].build(sweep, config=sweep.scheduler_options)


@TRIAL_SCHEDULERS.register("asha", replayed=True)
def asha(
    sweep: Sweep, /, *, grace_period: PositiveInt = 1, reduction_factor: ReductionFactor = 3.0, brackets: PositiveInt = 1
) -> TrialScheduler:
    """Asynchronous successive halving: trials behind at a rung stop there.

    Args:
        grace_period: epochs every trial runs before it can be stopped.
        reduction_factor: each rung keeps 1 / reduction_factor of the trials.
        brackets: brackets of rungs, each with its own grace period.
    """
    from ray.tune.schedulers import ASHAScheduler

    if sweep.multi_objective:
        raise ConfigError(f"asha ranks by one metric, and this sweep has {len(sweep.objectives)}: use trial_scheduler 'moasha'")
    if grace_period > sweep.epochs:
        raise ConfigError(f"scheduler_options['grace_period'] {grace_period} is more than the {sweep.epochs} epochs a trial runs")
    return ASHAScheduler(
        time_attr=TIME_ATTR, max_t=sweep.epochs, grace_period=grace_period, reduction_factor=reduction_factor, brackets=brackets
    )


@TRIAL_SCHEDULERS.register("fifo")
def fifo(sweep: Sweep, /) -> TrialScheduler:
    """No early stopping: every trial runs all its epochs."""
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


@TRIAL_SCHEDULERS.register("hyperband")
def hyperband(sweep: Sweep, /, *, reduction_factor: ReductionFactor = 3.0, stop_last_trials: bool = True) -> TrialScheduler:
    """Synchronous HyperBand: trials pause at each rung until its bracket is there, and the worst stop.

    Args:
        reduction_factor: each rung keeps 1 / reduction_factor of the trials.
        stop_last_trials: stop the trials that reach max_t (the sweep's epochs).
    """
    from ray.tune.schedulers import HyperBandScheduler

    return HyperBandScheduler(
        time_attr=TIME_ATTR, max_t=sweep.epochs, reduction_factor=reduction_factor, stop_last_trials=stop_last_trials
    )


@TRIAL_SCHEDULERS.register("median_stopping", replayed=True)
def median_stopping(
    sweep: Sweep,
    /,
    *,
    grace_period: NonNegativeFloat = 1.0,
    min_samples_required: PositiveInt = 3,
    min_time_slice: NonNegativeFloat = 0.0,
    hard_stop: bool = True,
    objective: str = "",
) -> TrialScheduler:
    """Stops a trial whose best result is worse than the median of the others' running averages.

    Args:
        grace_period: epochs before a trial can be stopped.
        min_samples_required: trials to compare with before stopping any.
        min_time_slice: epochs a trial runs at least each time it runs.
        hard_stop: stop the trial (else pause it).
        objective: the objective compared, one of a multi-objective sweep's metrics (default: the first).
    """
    from ray.tune.schedulers import MedianStoppingRule

    modes = dict(sweep.objectives)
    if objective and objective not in modes:
        raise ConfigError(f"scheduler_options['objective'] {objective!r} is not one of the sweep's metrics: {', '.join(modes)}")

    class MedianOnOneObjective(MedianStoppingRule):
        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True  # Tune passes every scheduler the primary objective: this one keeps its own

    return MedianOnOneObjective(
        time_attr=TIME_ATTR,
        metric=objective or sweep.metric,
        mode=modes[objective or sweep.metric],
        grace_period=grace_period,
        min_samples_required=min_samples_required,
        min_time_slice=min_time_slice,
        hard_stop=hard_stop,
    )


@TRIAL_SCHEDULERS.register("pbt", replayed=True)
def pbt(
    sweep: Sweep,
    /,
    *,
    perturbation_interval: PositiveFloat = 2.0,
    burn_in_period: NonNegativeFloat = 0.0,
    quantile_fraction: Annotated[float, Range(gt=0, le=0.5)] = 0.25,
    resample_probability: UnitInterval = 0.25,
    perturbation_factors: tuple[PositiveFloat, PositiveFloat] = (1.2, 0.8),
    synch: bool = False,
) -> TrialScheduler:
    """Population based training: the worst trials continue from the best ones' checkpoints, their values perturbed.

    Args:
        perturbation_interval: epochs between perturbations.
        burn_in_period: epochs before the first perturbation.
        quantile_fraction: the fraction of trials that are the worst, and of those that are the best.
        resample_probability: the chance a value is drawn from the space again rather than perturbed.
        perturbation_factors: the factors a number is perturbed by (one drawn at random).
        synch: perturb all trials at once, when all are at the interval.
    """
    from ray.tune.schedulers import PopulationBasedTraining

    if not sweep.trials_in_process:
        raise ConfigError("pbt needs in-process trials (workers_per_trial = 1): it swaps trial checkpoints")
    if sweep.search == "optuna":
        raise ConfigError("search 'optuna' cannot run with trial_scheduler 'pbt', which picks the configs itself")
    mutations = {k: m for k, m in ((k, _mutation(v)) for k, v in sweep.space.items()) if m is not None}
    return PopulationBasedTraining(
        time_attr=TIME_ATTR,
        perturbation_interval=perturbation_interval,
        burn_in_period=burn_in_period,
        hyperparam_mutations=mutations,
        quantile_fraction=quantile_fraction,
        resample_probability=resample_probability,
        perturbation_factors=perturbation_factors,
        synch=synch,
    )


def _mutation(value: Any) -> Any:
    """PBT perturbs numbers by factors: categorical values must go to it as lists (it shifts along them)."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, dict):
        if set(value) == {"grid_search"}:
            return list(value["grid_search"])
        nested = {k: _mutation(v) for k, v in value.items()}
        return {k: v for k, v in nested.items() if v is not None} or None
    return value if isinstance(value, Domain) else None


@TRIAL_SCHEDULERS.register("moasha", replayed=True)
def moasha(sweep: Sweep, /, *, grace_period: PositiveInt = 1, reduction_factor: ReductionFactor = 3.0) -> TrialScheduler:
    """Multi-objective asynchronous successive halving: trials dominated at a rung stop there.

    A rung ranks its trials by Pareto fronts over the sweep's objectives, ties in a front broken by
    crowding distance; a trial outside the top 1 / reduction_factor stops, unless none dominates it.

    Args:
        grace_period: epochs every trial runs before it can be stopped.
        reduction_factor: each rung keeps 1 / reduction_factor of the trials, and its whole first front.
    """
    from toolbox.tuning.moasha import MultiObjectiveASHA

    if not sweep.multi_objective:
        raise ConfigError(
            f"moasha ranks by several objectives, and this sweep has one ({sweep.metric!r}): use trial_scheduler 'asha'"
        )
    if grace_period > sweep.epochs:
        raise ConfigError(f"scheduler_options['grace_period'] {grace_period} is more than the {sweep.epochs} epochs a trial runs")
    return MultiObjectiveASHA(sweep.objectives, TIME_ATTR, sweep.epochs, grace_period, reduction_factor)
