"""Thin shared library of the five pipelines: config, runtime, checkpoints, run logs, losses, metrics, ensembling, plotting."""
