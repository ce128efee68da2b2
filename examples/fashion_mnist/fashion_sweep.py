"""Fashion-MNIST with a model and a dataset of this project's own, trained with augmentation.

apt-get install dataset-fashion-mnist
python -m toolbox.sweep examples/fashion_mnist/fashion_sweep.py
"""

import fashion  # noqa: F401 - registers FashionMNIST and FashionNet, here and in every trial
from ray import tune

base = {
    "dataset": "FashionMNIST",
    "arch": "FashionNet",
    "augmentations": ["random_crop", "horizontal_flip"],
    "metrics": ["top_1_accuracy"],
    "batch_size": 128,
}
space = {
    "optimizer": tune.choice(["adamw", "sgd"]),
    "lr": {"adamw": tune.loguniform(5e-4, 5e-3), "sgd": tune.loguniform(1e-2, 1e-1)},
    "scheduler": tune.choice(["cosine_annealing_lr", "one_cycle_lr"]),
    "crop_padding": tune.choice([1, 2, 3]),
}
metric, mode, num_samples, epochs = "val_top_1_accuracy", "max", 8, 5
trial_scheduler, scheduler_options = "asha", {"grace_period": 2}
