"""Smoke sweep: DummyDataset, a few tiny trials, done in seconds of compute. `python -m toolbox.sweep sweeps/smoke.py`"""

from ray import tune

base = {
    "dataset": "DummyDataset",
    "dummy_n_samples": 512,
    "dummy_val_n_samples": 128,
    "dummy_input_shape": (32,),
    "ff_hidden_sizes": (32,),
    "batch_size": 64,
}
space = {
    "optimizer": tune.choice(["adamw", "sgd"]),
    "lr": tune.loguniform(1e-3, 3e-2),
    "momentum": tune.uniform(0.8, 0.95),  # reaches only the sgd trials
    "scheduler": tune.choice(["none", "cosine_annealing_lr"]),
}
metric = "val_top_1_accuracy"
mode = "max"
num_samples = 4
epochs = 3
trial_scheduler = "asha"
