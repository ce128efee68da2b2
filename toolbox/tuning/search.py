"""Tune's search algorithm, chosen by name in a sweep file, and the checks of what PBT may mutate."""

from __future__ import annotations

from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from toolbox.config.registry import ConfigError
from toolbox.data.tensors import DataSpec
from toolbox.tuning.sweepfile import Sweep, candidate_params


def search_algorithm(sweep: Sweep, max_concurrent: int, start_from: tuple[list[dict], list[float]] = ((), ())):
    """Concurrency is bounded on the searcher: Tune ignores max_concurrent_trials when one is given.

    ``start_from``: points already evaluated and their values (``--grow-from``), which Optuna's study starts with."""
    seed = sweep.base.get("seed", 0)
    if sweep.search == "optuna":
        points, rewards = start_from
        warm = {"seed": seed, "points_to_evaluate": list(points) or None, "evaluated_rewards": list(rewards) or None}
        if sweep.multi_objective:
            metrics, modes = zip(*sweep.objectives)
            searcher = MultiObjectiveOptuna(metric=list(metrics), mode=list(modes), **warm)
        else:
            searcher = OptunaSearch(**warm)
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


class MultiObjectiveOptuna(OptunaSearch):
    """Optuna's multi-objective study over every objective, while Tune's own metric is the primary one alone."""

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return super().set_search_properties(None, None, config, **spec)


def check_pbt_keeps_shapes(sweep: Sweep, spec: DataSpec, where: str) -> None:
    """PBT loads one trial's checkpoint into another's config: a key whose values build other model
    shapes (``ff_hidden_sizes``, ``arch``) would fail every exploit."""
    from toolbox.training.builders import check_components

    built: dict = {}

    def shapes(params):
        try:
            model = check_components(sweep.trial_config(params), spec, built)
        except ConfigError:  # a mix of values no trial draws together
            return None
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}

    candidates = candidate_params(sweep.space)
    first = candidates[0]
    for key in first:
        for params in candidates:
            if params[key] != first[key] and shapes({**first, key: params[key]}) not in (None, shapes(first)):
                raise ConfigError(
                    f"{where}: pbt cannot mutate {key}: checkpoints do not carry across model shapes "
                    f"({key}={params[key]!r} builds another model than {key}={first[key]!r}); fix it in base, or sweep it without pbt"
                )
