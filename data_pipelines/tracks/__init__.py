"""Point tracks for clips: LK and DIS trackers with their accuracy measures (``trackers``),
exact tracks from depth, segmentation and object poses (``ground_truth``), and per-episode track
files from an external tracker (``files``)."""
