"""Experiment entry points: demos, trainers and configs."""
