"""Sweeps on Ray Tune: sweep files, trials, Tune's search and schedulers, console progress, results and plots."""
