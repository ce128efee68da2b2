"""Sweep files: plain Python modules in sweeps/, read into a checked ``Sweep``.

A sweep file sets module-level names (every one is optional except ``space``)::

    from ray import tune
    base = {"dataset": "MNIST", "mnist_download": True}       # toolbox.run keys, fixed for all trials
    space = {"optimizer": tune.choice(["adamw", "sgd"]),      # the same keys, with Tune domains
             "lr": tune.loguniform(1e-4, 1e-2),
             "momentum": tune.uniform(0.8, 0.99)}             # only trials whose optimizer takes it get it
    metric, mode, num_samples, epochs = "val_top_1_accuracy", "max", 16, 10   # mode unset: the metric's own
    # or several objectives, one mode each: metric, mode = ["val_top_1_accuracy", "params"], ["max", "min"]
    trial_scheduler = "asha"   # a registered one: fifo, hyperband, median_stopping, moasha, pbt, or your own
    range_test = {"steps": 50} # the ramp of the LR range tests that "lr": "range_test" asks for (see below)
    search = "random"          # random (grid_search values are crossed), optuna
    workers_per_trial, cpus_per_worker, gpus_per_trial = 1, 1, 0

``"lr": "range_test"`` (or ``{"adamw": "range_test", ...}`` per optimizer) has an LR range test of each such
optimizer set its lr's loguniform bounds before the trials start (``toolbox.tuning.range_tests``).

Everything is checked here, before Ray starts: a typo must not cost a 30-minute sweep. Every value a grid
or choice lists is checked by its key's rule, and up to 512 of their crossings as whole trials; every trial
checks its own values as it draws them, and one refused fails alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from toolbox.components.datasets import DATASETS
from toolbox.components.metrics import mode_of
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.config import user_code
from toolbox.config.registry import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    nearest,
    one_line,
)
from toolbox.config.resolve import IMPORTS, KINDS, TRAINING_OPTIONS, all_keys, coerce, flag, resolve
from toolbox.data.tensors import DataSpec
from toolbox.distributed.locations import check_name
from toolbox.training.lr_range import RAMP_RULES, Ramp
from toolbox.tuning.trial_schedulers import TRIAL_SCHEDULERS, trial_scheduler

DEFAULTS = {o.key: o.default for o in TRAINING_OPTIONS}
COSTS = ("params", "epoch_s")  # what every trial reports of its cost (the model's parameter count, an epoch's seconds)
Mode = Literal["min", "max"]
MAX_FUSE = 1024
RANGE_TEST, LR_KEY = "range_test", "lr"  # "lr": "range_test" in a space: its bounds come from an LR range test


@dataclass
class Sweep:
    """A sweep file's fields; each annotation is that field's value rule."""

    space: dict[str, Any]
    name: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    # A list: a multi-objective sweep; ``metric`` and ``mode`` then hold its first, the primary, which Tune ranks
    # by, and ``objectives`` every (metric, mode).
    metric: str | tuple[str, ...] = "val_top_1_accuracy"
    mode: Mode | tuple[Mode, ...] | None = None  # not set: the metric's own ("min" for losses, errors and costs)
    num_samples: PositiveInt = 16
    epochs: PositiveInt = 10
    trial_scheduler: str = "asha"  # a name in TRIAL_SCHEDULERS
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # its keyword-only parameters, e.g. {"grace_period": 2}
    search: Literal["random", "optuna"] = "random"
    workers_per_trial: PositiveInt = 1
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_trial: NonNegativeFloat = 0.0
    max_concurrent: NonNegativeInt = 0  # 0: as many as the resources allow
    max_failures: NonNegativeInt = 2  # retries of a trial whose process dies, each from its own checkpoint
    # Train up to this many one-worker trials as one stacked model per device (0, 1: off); far fewer fit a device.
    fuse: Annotated[int, Range(ge=0, le=MAX_FUSE)] = 0
    # One-worker trials run the loop in the trial's own process, with no worker group to start.
    # False runs them through a TorchTrainer, like multi-worker trials.
    in_process: bool = True
    range_test: dict[str, Any] = field(default_factory=dict)  # the ramp of its LR range tests: start_lr, end_lr, steps

    def __post_init__(self) -> None:
        self.objectives = objectives(self.metric, self.mode)
        self.metric, self.mode = self.objectives[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def total_trials(self) -> int:
        """num_samples times the size of every grid_search in the space."""
        return self.num_samples * math.prod(len(v["grid_search"]) for v in self.space.values() if _is_grid(v))

    @property
    def ramp(self) -> Ramp:
        return Ramp(**self.range_test)

    @property
    def trials_in_process(self) -> bool:
        return self.in_process and self.workers_per_trial == 1

    @property
    def trials_fused(self) -> bool:
        return self.fuse > 1 and self.trials_in_process

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's full run config from its sampled params (keys its components don't take are dropped)."""
        return resolve(pick_per_component({**self.base, **params, "epochs": self.epochs}), strict=False)

    def shown_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """``trial_config``, or for a trial whose values were refused (it errored), its values as drawn."""
        try:
            return self.trial_config(params)
        except ConfigError:
            return pick_per_component({**self.base, **params, "epochs": self.epochs})


def objectives(metric: str | tuple[str, ...], mode: str | tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    """The sweep's (metric, mode) pairs; a mode not given is its metric's own."""
    metrics = list(metric) if isinstance(metric, (list, tuple)) else [metric]
    modes = list(mode) if isinstance(mode, (list, tuple)) else [None] * len(metrics) if mode is None else [mode]
    if not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"metric: expected a metric or a non-empty list of them, got {metric!r}")
    if len(modes) != len(metrics):
        raise ConfigError(
            f"mode: {mode!r} is not one mode per metric of {metric!r}: give {len(metrics)}, or none (each metric's own)"
        )
    twice = next((m for m in metrics if metrics.count(m) > 1), None)
    if twice is not None:
        raise ConfigError(f"metric: {twice!r} is named twice in {metric!r}")
    bad = next((m for m in modes if m not in ("min", "max", None)), None)
    if bad is not None:
        raise ConfigError(f"mode: {bad!r} is not one of min, max{nearest(str(bad), ['min', 'max'])}")
    return tuple((m, given or ("min" if m in COSTS else mode_of(m))) for m, given in zip(metrics, modes))


FIELDS = {f.name: f for f in dataclasses.fields(Sweep)}
FIELD_RULES = typing.get_type_hints(Sweep, include_extras=True)


def range_tested(sweep: Sweep) -> list[str]:
    """The optimizers whose lr bounds an LR range test sets: every one the sweep may choose for a plain
    ``"lr": "range_test"``, those marked so in a per-optimizer lr."""
    value = sweep.space.get(LR_KEY)
    if _is_range_test(value):
        selector = OPTIMIZERS.selector
        chosen = _values(sweep.space[selector]) if selector in sweep.space else []
        return list(dict.fromkeys(chosen or [sweep.base.get(selector, DEFAULTS[selector])]))
    if isinstance(value, dict) and not _is_grid(value):
        return [optimizer for optimizer, sub in value.items() if _is_range_test(sub)]
    return []


def with_lr_bounds(sweep: Sweep, bounds: dict[str, list[float]]) -> dict[str, Any]:
    """The sweep's space with each ``"range_test"`` replaced by its optimizer's ``tune.loguniform(low, high)``."""
    from ray import tune

    tested = range_tested(sweep)
    if not tested:
        return sweep.space
    given = sweep.space[LR_KEY] if isinstance(sweep.space[LR_KEY], dict) else {}
    lr = {**given, **{optimizer: tune.loguniform(*bounds[optimizer]) for optimizer in tested}}
    return {**sweep.space, LR_KEY: lr}


def _is_range_test(value: Any) -> bool:
    return isinstance(value, str) and value == RANGE_TEST


def owner(key: str):
    """The registry whose components take ``key`` (None for general keys)."""
    return next((registry for registry in KINDS if registry.owners(key)), None)


def pick_per_component(params: dict[str, Any]) -> dict[str, Any]:
    """Resolve per-component values: ``{"lr": {"adamw": 1e-3, "sgd": 0.05}}`` -> the chosen optimizer's lr."""
    out = dict(params)
    for key, value in params.items():
        registry = owner(key)
        if isinstance(value, dict) and registry is not None:
            chosen = params.get(registry.selector, DEFAULTS[registry.selector])
            if chosen in value:
                out[key] = value[chosen]
            else:
                del out[key]
    return out


def load(path: str | Path, overrides: dict[str, Any] | None = None, base_overrides: dict[str, Any] | None = None) -> Sweep:
    """Import a sweep file, apply CLI overrides of fields (None: left alone) and of base keys, and check it."""
    path = Path(path)
    values = _import(path)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown sweep field {unknown[0]!r}{nearest(unknown[0], list(FIELDS))}; fields: {', '.join(FIELDS)}"
        )
    if "space" not in values:
        raise ConfigError(f"{path}: no `space` defined (a dict of run keys to Tune domains)")
    values.setdefault("name", path.stem)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    chosen = values.get("trial_scheduler", FIELDS["trial_scheduler"].default)
    if given.get("trial_scheduler", chosen) != chosen:
        values.pop("scheduler_options", None)  # they were the file's scheduler's, not the one given instead
    values.update(given)
    for name, value in values.items():
        values[name] = coerce(name, FIELD_RULES[name], value, label=f"{path}: {name}")
    file_base, base_overrides = values.get("base", {}), base_overrides or {}
    values["base"] = {**file_base, **base_overrides}
    imports = tuple(  # the file's and the command line's, both
        name
        for given, label in ((file_base, f"{path}: base[{IMPORTS.key!r}]"), (base_overrides, flag(IMPORTS.key)))
        for name in coerce(IMPORTS.key, IMPORTS.type, given.get(IMPORTS.key, ()), label=label)
    )
    if user_code.registers(path):  # components of its own, or of modules it imports: every trial imports it too
        imports = (*imports, str(path))
    if imports:  # as absolute paths: a trial's process has another working directory
        values["base"][IMPORTS.key] = user_code.canonical(imports)
        user_code.load(values["base"][IMPORTS.key])  # what they register, before the checks below name it
    values["name"] = check_name(values["name"], f"{path}: name")
    try:
        sweep = Sweep(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    check(sweep, str(path))
    return sweep


def import_sweep_file(path: Path):
    """The sweep file's module, executed once in this process: its components (and its imports') registered."""
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    return user_code.import_file(path, f"toolbox_sweep_{path.stem}", failing="cannot import the sweep file")


def _import(path: Path) -> dict[str, Any]:
    module = import_sweep_file(path)
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and not isinstance(v, type(dataclasses)) and not callable(v)
    }


def check(sweep: Sweep, where: str) -> None:
    """Every key known, every value accepted by its component, the metric reported, resources sane."""
    keys = all_keys()
    for key in list(sweep.base) + list(sweep.space):
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r}{nearest(key, list(keys))}")
    _check_range_test_marks(sweep, where)
    for key, value in sweep.space.items():
        registry = owner(key)
        _check_domain(value, f"{where}: space[{key!r}]")
        _check_listed_values(key, value, f"{where}: space[{key!r}]")
        if isinstance(value, dict) and not _is_grid(value):
            takers = registry.owners(key) if registry else []
            for component in value:
                if component not in takers:
                    raise ConfigError(
                        f"{where}: space[{key!r}] is per-component, but {component!r} is not a "
                        f"{registry.kind if registry else 'component'} that takes {key!r}"
                        f"{nearest(str(component), takers)}; those are: {', '.join(takers) or 'none'}"
                    )
    if "epochs" in sweep.base or "epochs" in sweep.space:
        raise ConfigError(f"{where}: set the trials' epochs with the sweep field `epochs`, not in base/space")
    dataset_keys = {p.key for d in DATASETS for p in d.params} | {"dataset", "seed"}
    swept_data = sorted(dataset_keys & set(sweep.space))
    if swept_data:
        raise ConfigError(f"{where}: {swept_data[0]!r} cannot be swept: the data is loaded once and shared by all trials")
    _check_fields(sweep, where)
    metrics = set()
    for params in candidate_params(sweep.space):
        with _in_trial(where, params):
            metrics.update(sweep.trial_config(params)["metrics"])  # every value meets its rules
    reported = {"val_loss", "train_loss", "lr", *COSTS} | {f"val_{m}" for m in metrics}
    for metric, _ in sweep.objectives:
        if metric not in reported:
            raise ConfigError(
                f"{where}: metric {metric!r} is never reported{nearest(metric, sorted(reported))}; "
                f"trials report {', '.join(sorted(reported))} (metrics come from {flag('metrics')})"
            )


def _check_range_test_marks(sweep: Sweep, where: str) -> None:
    """``"range_test"`` only as the lr in the space, plain or per optimizer; any other text there is a typo."""
    for key, value in sweep.base.items():
        if _is_range_test(value):
            raise ConfigError(f"{where}: base[{key!r}]: {RANGE_TEST!r} goes in `space` (as the lr), not in base")
    for key, value in sweep.space.items():
        per_component = isinstance(value, dict) and not _is_grid(value)
        for component, sub in value.items() if per_component else [(None, value)]:
            at = f"{where}: space[{key!r}]" + (f"[{component!r}]" if per_component else "")
            if _is_range_test(sub) and key != LR_KEY:
                raise ConfigError(f"{at}: an LR range test sets the bounds of {LR_KEY!r} only, not of {key!r}")
            if key == LR_KEY and isinstance(sub, str) and not _is_range_test(sub):
                raise ConfigError(
                    f"{at}: {sub!r} is no lr{nearest(sub, [RANGE_TEST])}; "
                    f"the one text it takes is {RANGE_TEST!r} (bounds from an LR range test)"
                )


def check_trials(sweep: Sweep, spec: DataSpec, where: str) -> None:
    """Every component of every candidate trial builds for the data's shape (each distinct one once)."""
    from toolbox.training.builders import check_components

    built: dict = {}
    for params in candidate_params(sweep.space):
        with _in_trial(where, params):
            check_components(sweep.trial_config(params), spec, built)


@contextlib.contextmanager
def _in_trial(where: str, params: dict[str, Any]):
    """A ConfigError raised inside names the sweep file and the trial's values."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc} (in a trial with {_short(params)})") from None


def _check_domain(value: Any, where: str) -> None:
    """A space entry Tune can sample from: a non-empty choice or grid, an ordered range, or a plain value."""
    from ray.tune.search.sample import Categorical, Float, Integer

    if _is_grid(value) and (not isinstance(value["grid_search"], (list, tuple)) or not value["grid_search"]):
        raise ConfigError(f"{where}: tune.grid_search needs a non-empty list, got {value['grid_search']!r}")
    if isinstance(value, Categorical) and not value.categories:
        raise ConfigError(f"{where}: tune.choice([]) has no values to choose from")
    if isinstance(value, (Float, Integer)):
        low, high = value.lower, value.upper
        if not (math.isfinite(low) and math.isfinite(high)) or (high <= low if isinstance(value, Integer) else high < low):
            raise ConfigError(f"{where}: the range [{low}, {high}) is empty or not finite")
    if isinstance(value, dict) and not _is_grid(value):
        for component, sub in value.items():
            _check_domain(sub, f"{where}[{component!r}]")


def _check_listed_values(key: str, domain: Any, where: str, component: str | None = None) -> None:
    """Each value a grid or choice lists, once, by its key's rule: a list of any length is checked whole here,
    its crossings with the other keys point by point as trials draw them."""
    from ray.tune.search.sample import Categorical

    if isinstance(domain, dict) and not _is_grid(domain):  # per-component values: each by its component's rule
        for name, sub in domain.items():
            _check_listed_values(key, sub, f"{where}[{name!r}]", name)
        return
    values = domain["grid_search"] if _is_grid(domain) else domain.categories if isinstance(domain, Categorical) else []
    rules = _rules(key, component)
    checked: set[str] = set()
    for value in values:
        if repr(value) in checked:
            continue
        checked.add(repr(value))
        refusals = []
        for rule in rules:
            try:
                coerce(key, rule, value)
                break
            except ConfigError as exc:
                refusals.append(exc)
        else:
            if refusals:
                raise ConfigError(f"{where}: {refusals[0]}")


def _rules(key: str, component: str | None = None) -> list:
    """The value rules of ``key``: its option's, or those of the components that take it (``component``'s alone if given)."""
    option = next((o for o in TRAINING_OPTIONS if o.key == key), None)
    if option is not None:
        return [option.type]
    return [
        p.annotation
        for registry in KINDS
        for taker in registry
        if component is None or taker.name == component
        for p in taker.params
        if p.key == key
    ]


def _check_fields(sweep: Sweep, where: str) -> None:
    try:
        _check_trial_scheduler(sweep)
        _check_range_test_options(sweep)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if sweep.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{where}: search 'optuna' needs optuna: pip install 'toolbox[optuna]'")
        if any(_is_grid(v) for v in sweep.space.values()):
            raise ConfigError(f"{where}: optuna cannot take tune.grid_search values; use tune.choice")


def _check_trial_scheduler(sweep: Sweep) -> None:
    """The trial scheduler is registered, its options are its keyword-only parameters (coerced by their rules), and it builds."""
    scheduler = TRIAL_SCHEDULERS[sweep.trial_scheduler]
    rules = {p.name: p.annotation for p in scheduler.params}
    for option, value in sweep.scheduler_options.items():
        if option not in rules:
            raise ConfigError(
                f"scheduler_options: {scheduler.name} takes no option {option!r}{nearest(option, list(rules))}; "
                f"it takes: {', '.join(rules) or 'none'}"
            )
        sweep.scheduler_options[option] = coerce(option, rules[option], value, label=f"scheduler_options[{option!r}]")
    try:
        trial_scheduler(sweep)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's scheduler, or Tune refusing its options: one line
        raise ConfigError(f"trial_scheduler {scheduler.name!r} does not build: {one_line(exc)}") from None


def _check_range_test_options(sweep: Sweep) -> None:
    """The range test's options are the ramp's settings, each by its rule, and make a ramp."""
    for option, value in sweep.range_test.items():
        if option not in RAMP_RULES:
            raise ConfigError(
                f"range_test: no option {option!r}{nearest(option, list(RAMP_RULES))}; it takes: {', '.join(RAMP_RULES)}"
            )
        sweep.range_test[option] = coerce(option, RAMP_RULES[option], value, label=f"range_test[{option!r}]")
    refusal = sweep.ramp.refusal()
    if refusal:
        raise ConfigError(f"range_test: {refusal}")


def _is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"grid_search"}


def _values(domain: Any) -> list[Any]:
    """Representative values of one space entry: every category or grid value, a range's two ends."""
    from ray.tune.search.sample import Categorical, Float, Integer

    if _is_grid(domain):
        return list(domain["grid_search"])
    if isinstance(domain, dict):  # per-component values: every component's ends together
        ends = {component: _values(sub) for component, sub in domain.items()}
        return [{c: v[0] for c, v in ends.items() if v}, {c: v[-1] for c, v in ends.items() if v}]
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if _is_range_test(domain):
        return []  # its bounds come from the range test, before any trial draws from them
    if isinstance(domain, Float):
        return [domain.lower, domain.upper]
    if isinstance(domain, Integer):
        return [domain.lower, domain.upper - 1]
    if hasattr(domain, "sample") and hasattr(domain, "domain_str"):
        return []  # sample_from and friends: checked when the trial resolves it
    return [domain]


def candidate_params(space: dict[str, Any], limit: int = 512) -> list[dict[str, Any]]:
    """Trial params covering every categorical choice, pairing each with the ranges' ends."""
    keys = [k for k in space if _values(space[k])]
    columns = [_values(space[k]) for k in keys]
    combos = itertools.islice(itertools.product(*columns), limit)
    return [dict(zip(keys, combo)) for combo in combos]


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())
