"""Experiments over one cache: hyper-parameter sweeps (Optuna), comparing runs, run configs as files."""
