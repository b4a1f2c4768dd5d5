"""Offline RLDS conversion, clip loading and the procedural toy world (to come)."""
