"""``--confirm K --seeds S`` refused before Ray. A confirmation that runs is tested in test_grow.py, on the
grown sweep that test_grow's more-trials test builds."""

from __future__ import annotations

import pytest
from test_grow import finished_sweep_dir, sweep, write


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        pytest.param(["--confirm", "2"], "holds no results yet: run the sweep first", id="no-results"),
        pytest.param(["--confirm", "2", "--seeds", "1"], "give --confirm >= 1 and --seeds >= 2", id="one-seed"),
        pytest.param(["--seeds", "3"], "--seeds: give it with --confirm K", id="seeds-alone"),
        pytest.param(
            ["--confirm", "2", "--num-samples", "3"], "num_samples changed since it ran; re-run it without --confirm", id="grown"
        ),
    ],
)
def test_a_confirmation_that_cannot_run_is_refused_before_ray(tmp_path, argv, said):
    path = write(tmp_path, 'space = {"lr": tune.loguniform(1e-3, 1e-1)}\nnum_samples = 2\n')
    exp_dir = finished_sweep_dir(tmp_path, path)
    proc = sweep(str(path), "--storage", str(tmp_path), *argv)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert said in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (exp_dir / "confirm").exists() and "Ray dashboard" not in proc.stdout
