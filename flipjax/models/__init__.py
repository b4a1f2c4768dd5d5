"""Linen modules for the FLIP action, dynamics, codec, value and policy modules (to come)."""
