"""What every trainer shares: the training loop (``loop``), the train state and optimizer
(``common``), clip data for the models (``clips``) and metric logging (``logging_utils``).
The trainers themselves, one per module, are in :mod:`experiments.trainers`."""
