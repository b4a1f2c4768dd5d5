"""Jitted hill-climbing beam search over flows, videos and values (to come)."""
