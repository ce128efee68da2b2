"""MNIST: the architecture (FFNN or ConvNet, and its size) swept with the optimizer and lr, for accuracy against size.

`python -m toolbox.sweep sweeps/arch.py`: two objectives, MO-ASHA, and the Pareto front in the results.
Size keys are per model: a ConvNet trial never sees ff_hidden_sizes.
"""

from ray import tune

base = {
    "dataset": "MNIST",
    "mnist_root": "./data",
    "mnist_download": True,
    "batch_size": 128,
    "scheduler": "cosine_annealing_lr",
}
space = {
    "arch": tune.choice(["FeedForwardNeuralNetwork", "ConvNet"]),
    "ff_hidden_sizes": tune.choice([(32,), (128,), (512, 512)]),  # FFNN trials only
    "ff_dropout": tune.uniform(0.0, 0.2),
    "cnn_channels": tune.choice([(8, 16), (16, 32)]),  # ConvNet trials only
    "cnn_dropout": tune.uniform(0.1, 0.4),
    "optimizer": tune.choice(["adamw", "sgd"]),
    "lr": {"adamw": tune.loguniform(5e-4, 3e-3), "sgd": tune.loguniform(1e-2, 1e-1)},
    "momentum": tune.uniform(0.85, 0.95),  # sgd only
}
metric = ["val_top_1_accuracy", "params"]  # the most accurate model, and the smallest
mode = ["max", "min"]
num_samples = 12
epochs = 5
trial_scheduler = "moasha"
scheduler_options = {"grace_period": 1, "reduction_factor": 3}
