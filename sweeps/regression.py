"""Regression: real-valued targets of a linear teacher with noise, ranked by mean absolute error (lower is better).

`python -m toolbox.sweep sweeps/regression.py`
"""

from ray import tune

base = {
    "dataset": "Regression",
    "regression_input_shape": (32,),
    "regression_num_values": 2,
    "ff_hidden_sizes": (64,),
    "metrics": ["mean_absolute_error", "r2_score"],
    "batch_size": 64,
}
space = {
    "optimizer": tune.choice(["adamw", "sgd"]),
    "lr": {"adamw": tune.loguniform(1e-4, 1e-2), "sgd": tune.loguniform(1e-3, 1e-1)},
    "scheduler": tune.choice(["none", "cosine_annealing_lr"]),
    "weight_decay": tune.loguniform(1e-5, 1e-2),
}
metric = "val_mean_absolute_error"  # its mode, min, comes from the metric
num_samples, epochs = 8, 6
trial_scheduler, scheduler_options = "asha", {"grace_period": 2}
