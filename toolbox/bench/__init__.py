"""``python -m toolbox.bench``: speed figures as ratios against baselines run side by side."""
