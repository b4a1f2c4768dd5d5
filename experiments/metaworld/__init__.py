"""Closed-loop Meta-World evaluation: ``evaluation`` (episodes, summaries, the CLI ``python -m
experiments.metaworld``), ``policy`` (the closed-loop controller), ``planners`` (oracle and AVDC
motion) and ``model`` (plans from trained FLIP modules)."""
