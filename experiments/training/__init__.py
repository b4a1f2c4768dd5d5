"""What every trainer shares: the training loop (``loop``), the train state and optimizer
(``common``), clip data for the models (``clips``), metric logging (``logging_utils``) and the
autoencoder's pretrained initialisation (``autoencoder_init``).
The trainers themselves, one per module, are in :mod:`experiments.trainers`."""
