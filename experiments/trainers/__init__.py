"""One trainer per FLIP module (``config.trainer`` names one), built on the shared loop, state
and data of :mod:`experiments.training`."""
