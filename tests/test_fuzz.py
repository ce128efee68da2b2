"""Generated input (Hypothesis) for toolbox.run's flags and for sweep files: it is accepted or refused
with one ConfigError (exit code 2), never another exception. No Ray starts: only the checks run.

Each failure these found is kept as a case in tests/test_refusals.py.
"""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolbox.components.datasets import DATASETS
from toolbox.components.metrics import METRICS
from toolbox.components.models import MODELS
from toolbox.components.optimizers import OPTIMIZERS
from toolbox.components.schedulers import SCHEDULERS
from toolbox.config.registry import ConfigError
from toolbox.run import build_parser, prepare
from toolbox.tuning.sweepfile import check_trials, load

ACTIONS = {
    action.option_strings[0]: action
    for action in build_parser()._actions
    if action.option_strings
    and action.dest != "help"
    and action.option_strings[0]
    not in ("--help", "--storage", "--name", "--resume", "--address", "--mnist-root", "--mnist-download", "--verbose")
}
NAMES = {"--arch": MODELS, "--dataset": DATASETS, "--optimizer": OPTIMIZERS, "--scheduler": SCHEDULERS, "--metrics": METRICS}
SMALL_SIZES = (
    "--dummy-n-samples",
    "--dummy-val-n-samples",
    "--dummy-input-shape",
    "--ff-hidden-sizes",
    "--cnn-channels",
    "--cnn-hidden-size",
)

# Mostly values of the flag's own type, at and beyond its edges; sometimes anything at all.
INTS = st.one_of(st.integers(-3, 12), st.sampled_from(["0", "-1", "99999999999999999999", "1e3"]))
FLOATS = st.one_of(
    st.sampled_from(["0", "-0.0", "1e-9", "0.5", "1", "1.5", "nan", "inf", "-inf", "1e308"]),
    st.floats(-3, 3, allow_subnormal=False).map(repr),
)
ANY = st.one_of(st.text(max_size=5), st.sampled_from(["none", "None", "True", ""]))


def _value(flag: str, action):
    if flag in NAMES:
        return st.one_of(st.sampled_from(NAMES[flag].names()), ANY)
    if action.choices:
        return st.one_of(st.sampled_from([str(c) for c in action.choices]), ANY)
    if action.type is int or (getattr(action.type, "__name__", "") == "int"):
        return st.integers(1, 12).map(str) if flag in SMALL_SIZES else st.one_of(INTS.map(str), ANY)
    if action.type is float or (getattr(action.type, "__name__", "") == "float"):
        return st.one_of(FLOATS, ANY)
    return ANY


@st.composite
def argv(draw) -> list[str]:
    words: list[str] = []
    for flag in draw(st.lists(st.sampled_from(sorted(ACTIONS)), max_size=5)):
        action = ACTIONS[flag]
        if action.nargs == 0:  # --nesterov / --no-nesterov and friends
            words.append(draw(st.sampled_from(action.option_strings)))
            continue
        count = {None: 1, "+": draw(st.integers(0, 3))}.get(action.nargs, action.nargs)
        words += [flag, *(draw(_value(flag, action)) for _ in range(count if isinstance(count, int) else 1))]
    return words


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(words=argv())
def test_generated_run_flags_are_accepted_or_refused_in_one_line(words, tmp_path, ray_never_starts):
    try:
        prepare([*words, "--storage", str(tmp_path / "out"), "--epochs", "1"])
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)
    except SystemExit as exc:  # argparse's own one-line refusals
        assert exc.code == 2


FIELD_VALUES = {
    "num_samples": st.one_of(
        st.integers(-2, 4), st.floats(allow_nan=True, allow_subnormal=False), st.text(max_size=3), st.none()
    ),
    "epochs": st.one_of(st.integers(-2, 4), st.just(2.5), st.just("3")),
    "mode": st.sampled_from(["min", "max", "maximize", 1, None]),
    "metric": st.sampled_from(["val_loss", "val_top_1_accuracy", "acc", 3]),
    "trial_scheduler": st.sampled_from(["asha", "fifo", "hyperband", "median_stopping", "pbt", "bohb", ""]),
    "cpus_per_worker": st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.integers(-1, 2)),
    "gpus_per_trial": st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.integers(-1, 1)),
    "max_concurrent": st.integers(-2, 3),
    "scheduler_options": st.one_of(
        st.dictionaries(
            st.sampled_from(["grace_period", "reduction_factor", "brackets", "quantile_fraction", "bogus"]),
            st.one_of(st.integers(-1, 5), st.floats(allow_nan=True, allow_subnormal=False), st.text(max_size=2)),
            max_size=2,
        ),
        st.just([1]),
    ),
}
SPACE_VALUES = st.sampled_from(
    [
        "tune.choice([])",
        "tune.choice(['adamw', 'sgd'])",
        "tune.uniform(0.1, 0.01)",
        "tune.loguniform(1e-4, 1e-2)",
        "tune.randint(3, 3)",
        "tune.grid_search([])",
        "tune.grid_search([0.1, 0.2])",
        "{'adamw': tune.loguniform(1e-4, 1e-3), 'sgd': 0.1}",
        "{'adagrad': 0.1}",
        "float('nan')",
        "-1",
        "'fast'",
        "(0,)",
        "[64, 'x']",
        "None",
    ]
)
SPACE_KEYS = st.sampled_from(
    ["lr", "optimizer", "momentum", "ff_hidden_sizes", "batch_size", "ff_dropout", "lrr", "dummy_n_samples"]
)


@st.composite
def sweep_file(draw) -> str:
    space = draw(
        st.one_of(
            st.dictionaries(SPACE_KEYS, SPACE_VALUES, max_size=3).map(
                lambda d: "{" + ", ".join(f"{k!r}: {v}" for k, v in d.items()) + "}"
            ),
            st.just("[]"),
        )
    )
    fields = draw(st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.none(), max_size=4))
    lines = ["from ray import tune", 'base = {"dummy_n_samples": 64, "dummy_val_n_samples": 32}', f"space = {space}"]
    for name in fields:
        lines.append(f"{name} = {draw(FIELD_VALUES[name])!r}")
    return "\n".join(lines) + "\n"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=sweep_file())
def test_generated_sweep_files_are_accepted_or_refused_in_one_line(text, tmp_path):
    from toolbox.data.tensors import DataSpec

    path = tmp_path / "generated.py"
    path.write_text(textwrap.dedent(text))
    try:
        sweep = load(path)
        check_trials(sweep, DataSpec((784,), 10), str(path))
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_gpus_per_trial_edge_values_never_start_a_sweep(value, tmp_path):
    """The fuzzer's first find: NaN passed every comparison of the old checks."""
    path = tmp_path / "s.py"
    path.write_text(f"space = {{'lr': 0.1}}\ngpus_per_trial = float({value!r})\n")
    if value == "0":
        assert load(path).gpus_per_trial == 0.0
    else:
        with pytest.raises(ConfigError, match="gpus_per_trial must be"):
            load(path)
