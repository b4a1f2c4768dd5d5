"""Training loops for the FLIP modules, built on the shared core in ``common``."""
