"""Offline RLDS -> tracked clip shards (``build_clips``), the clip loader, and the toy world.

Modules: ``schemas`` and ``rlds`` (reading), ``rlds_writer`` (writing RLDS), ``frames``,
``text/`` (language backends), ``tracks/`` (trackers, ground truth, track files), ``records``
(shard layout), ``build_clips`` and ``clip_shard`` (the converter), ``loader`` (``ClipDataset``,
``make_loader``; no TensorFlow), ``episodes`` (value-learning samples), ``toy/`` (the embedded
procedural dataset) and ``metaworld*`` (Meta-World demos).
"""
