"""Growing a sweep: re-running it with a larger spec adds trials, space or epochs to what it holds.

The sweep dir's sweep.json records the spec it last ran with. A re-run compares the two before Ray
starts: a change of what the trials measure or train on is refused; more samples, another space or
more epochs grow the sweep. What to add is then counted from Tune's restored trials, not from the
record, so a grow that was killed half-way is completed by the next re-run, and nothing runs twice.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.config.registry import ConfigError
from toolbox.distributed.locations import Place
from toolbox.training.epochlog import read_rows, replace_file
from toolbox.tuning.sweepfile import DEFAULTS, Sweep
from toolbox.tuning.trial_schedulers import TRIAL_SCHEDULERS, trial_scheduler

log = logging.getLogger("toolbox")

RECORD = "sweep.json"
# What the trials measure and train on: a sweep that changes one of these is another sweep.
FIXED = ("metric", "mode", "base", "search", "trial_scheduler", "scheduler_options")


def described(value: Any) -> Any:
    """A JSON form of a sweep field, Tune domains included, that compares equal exactly when the values do."""
    from ray.tune.search.sample import Categorical, Float, Function, Integer

    if isinstance(value, dict):
        return {str(k): described(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [described(v) for v in value]
    if isinstance(value, Categorical):
        return {"choice": described(value.categories)}
    if isinstance(value, (Float, Integer)):
        sampler = type(value.get_sampler()).__name__
        return {type(value).__name__.lower(): [value.lower, value.upper], "sampler": sampler}
    if isinstance(value, Function):
        return {"sample_from": getattr(value.func, "__qualname__", repr(value.func))}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def spec_of(sweep: Sweep) -> dict[str, Any]:
    metrics, modes = zip(*sweep.objectives)
    given = {"metric": list(metrics), "mode": list(modes)} if sweep.multi_objective else {}
    return {
        **{name: described(given.get(name, getattr(sweep, name))) for name in FIXED},
        "num_samples": sweep.num_samples,
        "epochs": sweep.epochs,
        "space": described(sweep.space),
    }


@dataclass
class Record:
    """sweep.json: the spec of the sweep's last run, each growth said, and the budgets of trials left at an earlier one."""

    spec: dict[str, Any]
    rounds: list[dict] = field(default_factory=list)
    budgets: dict[str, int] = field(default_factory=dict)
    pending: bool = False  # a growth said but not yet in Tune's snapshot of the sweep
    reached: int = 0  # with a pending budget growth: the epochs that trials which continue have reached

    @classmethod
    def read(cls, exp: Place) -> Record | None:
        try:
            with exp.fs.open_input_stream(f"{exp.path}/{RECORD}") as source:
                return cls(**json.loads(source.read()))
        except FileNotFoundError:
            return None

    def text(self) -> bytes:
        return json.dumps(self.__dict__, indent=2).encode()

    def write(self, exp: Place) -> None:
        replace_file(exp.local / RECORD, self.text())
        if exp.mirror is not None:
            exp.mirror.push(exp.local, RECORD)


def plan(exp: Place, sweep: Sweep, ran: bool) -> Record:
    """The sweep's record for this run, with a line said per change since its last; refuses what cannot grow.

    ``ran``: the dir holds a Tune experiment of this sweep."""
    now = spec_of(sweep)
    record = Record.read(exp) if ran else None
    if record is None:
        return Record(now)
    changes = _changes(record.spec, now, sweep.name)
    if changes:
        for line in changes:
            log.info("growing sweep %s: %s", sweep.name, line)
        if now["epochs"] > record.spec["epochs"]:
            stopped = _left_at_their_budget(exp, record.budgets, record.spec["epochs"])
            record.budgets |= dict.fromkeys(stopped, record.spec["epochs"])
            record.reached = record.spec["epochs"]
        record.rounds.append({"at": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes})
        record.spec, record.pending = now, True
    return record


def refuse_changes(exp: Place, sweep: Sweep, what: str) -> None:
    """``what`` works on the sweep as it last ran: a spec changed since must grow it first."""
    record = Record.read(exp)
    if record is not None and record.spec != spec_of(sweep):
        changed = [key for key in spec_of(sweep) if record.spec.get(key) != spec_of(sweep)[key]]
        raise ConfigError(
            f"{what}: sweep {sweep.name}'s {', '.join(changed)} changed since it ran; "
            f"re-run it without {what} first (it grows or says why not), or undo the change"
        )


def warm_start(sweep: Sweep, old: Place, old_name: str, record: Record) -> tuple[list[dict], list[float]]:
    """``--grow-from``: the old sweep's trials inside this sweep's space, and their best values, for a searcher to start from."""
    import pyarrow.parquet as pq

    from toolbox.tuning.snapshots import saved_trials

    ran = Record.read(old)
    if ran is None:
        raise ConfigError(f"--grow-from {old_name}: {old.path} holds no finished sweep (no {RECORD})")
    if sweep.multi_objective:
        raise ConfigError(f"--grow-from {old_name}: a multi-objective sweep does not start from another's results")
    if sweep.search != "optuna":
        raise ConfigError(
            f"--grow-from {old_name}: random search draws independent points and has nothing to start from; "
            f'use search = "optuna", or grow {old_name} itself by re-running it with the larger spec'
        )
    for key in ("metric", "mode"):
        if record.spec[key] != getattr(sweep, key):
            raise ConfigError(
                f"--grow-from {old_name}: it ranked by {key} {record.spec[key]!r}, this sweep by {getattr(sweep, key)!r}"
            )
    try:
        with old.fs.open_input_file(f"{old.path}/results.parquet") as source:
            values = {r["trial_id"]: r[sweep.metric] for r in pq.read_table(source).to_pylist()}
    except (FileNotFoundError, KeyError) as exc:
        raise ConfigError(f"--grow-from {old_name}: its results.parquet cannot be read ({exc})") from None
    points, rewards = [], []
    for trial in saved_trials(old.fs, old.path):
        value = values.get(trial.trial_id)
        if value is not None and value == value and in_space(sweep, trial.config):
            points.append(drawn(sweep, trial.config))
            rewards.append(value)
    said = f"grown from sweep {old_name}: the searcher starts from its {len(points)} trials inside this space"
    log.info(said)
    record.rounds.append({"at": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": [said], "from": old.path})
    return points, rewards


def _changes(old: dict, new: dict, name: str) -> list[str]:
    choices = (
        f"re-run with --restart (delete it and start afresh), --name NEW (a sweep beside it), "
        f"or --name NEW --grow-from {name} (a new sweep warm-started from its results)"
    )
    for key in FIXED:
        if old.get(key) != new[key]:
            raise ConfigError(
                f"sweep {name} ran with {key} {_said(old.get(key))}, now {_said(new[key])}: a sweep grows by num_samples, space and epochs only; {choices}"
            )
    for key in ("num_samples", "epochs"):
        if new[key] < old[key]:
            raise ConfigError(f"sweep {name} ran with {key} {old[key]}, now {new[key]}: a sweep does not shrink; {choices}")
    gone = sorted(set(old["space"]) - set(new["space"]))
    if gone:
        raise ConfigError(f"sweep {name}: {', '.join(gone)} left its space: earlier trials drew other values for it; {choices}")
    changes = []
    if new["num_samples"] > old["num_samples"]:
        changes.append(
            f"num_samples {old['num_samples']} -> {new['num_samples']}: new trials are drawn; no finished trial runs again"
        )
    for key in new["space"]:
        if key not in old["space"]:
            changes.append(f"space[{key!r}] added: earlier trials had its base value; only new points run")
        elif new["space"][key] != old["space"][key]:
            changes.append(
                f"space[{key!r}] {_said(old['space'][key])} -> {_said(new['space'][key])}: only new points run; "
                "earlier trials outside the new space stay in the results as 'outside'"
            )
    if new["epochs"] > old["epochs"]:
        changes.append(
            f"epochs {old['epochs']} -> {new['epochs']}: trials that reached {old['epochs']} continue from their last checkpoint "
            "(a schedule over the whole run is re-planned for the new total from the step it reached); early-stopped trials stay stopped"
        )
    return changes


def _said(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _left_at_their_budget(exp: Place, known: dict[str, int], budget: int) -> list[str]:
    """Trials that stopped early under ``budget``: a larger budget does not continue them."""
    from toolbox.tuning.snapshots import saved_trials

    trials = saved_trials(exp.fs, exp.path)
    return [t.trial_id for t in trials if t.trial_id not in known and t.status == "TERMINATED" and _epochs(t) < budget]


def inside(domain: Any, value: Any) -> bool:
    """Whether a trial's drawn ``value`` is one that ``domain`` (a space entry) can draw."""
    from ray.tune.search.sample import Categorical, Float, Function, Integer

    value = _plain(value)
    if isinstance(domain, dict) and set(domain) == {"grid_search"}:
        return value in _plain(domain["grid_search"])
    if isinstance(domain, dict):
        return isinstance(value, dict) and all(inside(d, value.get(k)) for k, d in domain.items())
    if isinstance(domain, Categorical):
        return value in _plain(domain.categories)
    if isinstance(domain, Float):
        return isinstance(value, (int, float)) and domain.lower <= value <= domain.upper
    if isinstance(domain, Integer):
        return isinstance(value, int) and domain.lower <= value < domain.upper
    if isinstance(domain, Function):
        return True  # whatever the user's function draws is its space
    return value == _plain(domain)


def drawn(sweep: Sweep, params: dict | None) -> dict:
    """A trial's values of the sweep's space keys: a key added to the space since had its base value."""
    return {key: {**DEFAULTS, **sweep.base, **(params or {})}.get(key) for key in sweep.space}


def in_space(sweep: Sweep, params: dict | None) -> bool:
    """Whether a trial's drawn values lie in the sweep's space; PBT's trials always do, as it moves them out by design."""
    if sweep.trial_scheduler == "pbt":
        return True
    values = drawn(sweep, params)
    return all(inside(domain, values[key]) for key, domain in sweep.space.items())


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _grid_paths(space: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(space, dict) and set(space) == {"grid_search"}:
        return [prefix]
    if isinstance(space, dict):
        return [path for key, sub in space.items() for path in _grid_paths(sub, (*prefix, key))]
    return []


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _with(tree: dict, path: tuple, value: Any) -> dict:
    head, *rest = path
    return {**tree, head: _with(tree[head], tuple(rest), value) if rest else value}


def grid_points(space: dict) -> Iterator[tuple[dict, dict]]:
    """Each point of the space's grids as (the space with those grids fixed, {path: value}), drawn lazily."""
    paths = _grid_paths(space)
    for values in itertools.product(*(_at(space, path)["grid_search"] for path in paths)):
        fixed = space
        for path, value in zip(paths, values):
            fixed = _with(fixed, path, value)
        yield fixed, dict(zip(paths, values))


class Growth:
    """What a restored sweep gets inside Tune's restore: the current scheduler, with its trials' epochs
    replayed, and the current progress callback; while a growth is pending, also the trials that
    reached an earlier budget continued and the trials the spec misses added, then Tune's snapshot
    taken before the record says the growth is done."""

    def __init__(self, sweep: Sweep, record: Record, exp: Place, progress):
        self.sweep, self.record, self.exp, self.progress = sweep, record, exp, progress

    def before_requeue(self, controller, trials: list) -> None:
        from ray.tune.experiment import Trial

        scheduler = trial_scheduler(self.sweep)  # Tune's restore brings back the first run's, with its max_t and no state
        scheduler.set_search_properties(self.sweep.metric, self.sweep.mode)
        controller._scheduler_alg = scheduler
        callbacks = controller._callbacks._callbacks  # Tune's restore brings back the first run's, pickled
        callbacks[:] = [self.progress if type(c) is type(self.progress) else c for c in callbacks]
        if not self.record.reached:  # no budget growth pending
            return
        more = [
            t
            for t in trials
            if t.status == Trial.TERMINATED
            and self.record.reached <= _epochs(t) < self.sweep.epochs
            and in_space(self.sweep, t.config)
        ]
        for trial in more:
            trial.set_status(Trial.PAUSED)  # Tune resumes unfinished trials from their latest checkpoint
        if more:
            log.info("%d trials continue to %d epochs", len(more), self.sweep.epochs)

    def after_requeue(self, controller) -> None:
        trials = controller.get_trials()
        if TRIAL_SCHEDULERS[self.sweep.trial_scheduler].meta.get("replayed"):
            _replay(controller, trials, [metric for metric, _ in self.sweep.objectives])
        if not self.record.pending:
            return
        counted = [drawn(self.sweep, t.config) for t in trials if in_space(self.sweep, t.config)]
        added = _add_missing(controller, self.sweep, counted)
        if added:
            log.info("%d new trials", added)
            controller.update_max_pending_trials()
        controller.checkpoint(force=True, wait=True)
        self.record.pending, self.record.reached = False, 0
        self.record.write(self.exp)
        # Tune copied the sweep dir into its staging dir on restore, and uploads that copy over the sweep dir.
        replace_file(Path(controller._storage.experiment_driver_staging_path) / RECORD, self.record.text())


def _epochs(trial) -> int:
    return int(trial.last_result.get("training_iteration") or 0)


def _replay(controller, trials: list, metrics: list[str]) -> None:
    """Each restored trial's epochs (their ``metrics``) into the fresh scheduler, so its rungs and medians hold what they held."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining

    scheduler, time_attr = controller._scheduler_alg, "training_iteration"
    epochs = {}
    for trial in trials:
        rows = read_rows(trial.path, trial.storage.storage_filesystem) if trial.path else []
        epochs[trial] = [
            {time_attr: int(r["epoch"]), **{m: r[m] for m in metrics}} for r in rows if all(r.get(m) is not None for m in metrics)
        ]
    if isinstance(scheduler, PopulationBasedTraining):
        _restore_population(scheduler, epochs)
        return
    for trial, results in epochs.items():
        for result in results:
            scheduler.on_trial_result(controller, trial, result)
        if results and trial.status in (Trial.TERMINATED, Trial.ERROR):
            scheduler.on_trial_complete(controller, trial, results[-1])


def _restore_population(pbt, epochs: dict) -> None:
    """PBT's view of each trial as of its last perturbation point (its score there, and its clock), without
    replaying results, which would exploit again; the synchronous clock waits for the next point after them."""
    points = []
    for trial, results in epochs.items():
        state = pbt._trial_state.get(trial)
        reached = [r for r in results if r["training_iteration"] % pbt._perturbation_interval == 0]
        if state is None or not reached:
            continue
        last = reached[-1]
        state.last_score, state.last_result = pbt._metric_op * last[pbt._metric], last
        state.last_train_time = state.last_perturbation_time = last["training_iteration"]
        points.append(state.last_perturbation_time)
    if points:
        pbt._next_perturbation_sync = max(pbt._next_perturbation_sync, min(points) + pbt._perturbation_interval)


def _add_missing(controller, sweep: Sweep, counted: list[dict]) -> int:
    """Adds the trials that the spec asks for and no restored trial inside the space covers; how many.

    Trials that the restored searcher has yet to draw are dropped first: the count covers them."""
    from ray.tune.search.basic_variant import BasicVariantGenerator, _TrialIterator

    search = controller._search_alg
    if isinstance(search, BasicVariantGenerator):
        if not search._iterators:
            return 0
        template, added = search._iterators[0].unresolved_spec, 0
        search._trial_generator, search._trial_iter = [], None
        paths = _grid_paths(sweep.space)
        covered = Counter(_said([_plain(_at(c, p)) for p in paths]) for c in counted)
        search._total_samples = max(iterator.counter for iterator in search._iterators)  # drawn so far: the next trial's number
        for fixed, values in grid_points(sweep.space):
            need = sweep.num_samples - covered[_said(_plain(list(values.values())))]
            if need <= 0:
                continue
            iterator = _TrialIterator(
                uuid_prefix=search._uuid_prefix,
                num_samples=need,
                unresolved_spec={**template, "config": fixed, "num_samples": need},
                constant_grid_search=search._constant_grid_search,
                start=search._total_samples,
                random_state=search._random_state,
            )
            search._iterators.append(iterator)
            search._trial_generator = itertools.chain(search._trial_generator, iterator)
            search._total_samples += need
            added += need
        search._finished = not added
        return added
    need = sweep.total_trials - len(counted)  # a searcher (optuna): its restored study holds every earlier result
    if need > 0:
        search._total_samples, search._finished = search._counter + need, False
        searcher = search.searcher
        while hasattr(searcher, "searcher"):
            searcher = searcher.searcher
        searcher._space = type(searcher).convert_search_space(sweep.space)
    return max(need, 0)
