"""lr_sched.py with each optimizer's lr bounds from an LR range test instead of by hand.

`python -m toolbox.sweep sweeps/lr_sched_range_test.py`: before the trials, one range test per optimizer
(adamw, adam, sgd) sets its loguniform bounds; every other field is lr_sched.py's.
"""

from lr_sched import *  # noqa: F403 - the same sweep in every other field

space = {**space, "lr": "range_test"}  # noqa: F405
