"""Offline RLDS -> tracked clip shards (``build_clips``), the clip loader, and the toy world.

Modules: ``schemas`` and ``rlds`` (reading), ``rlds_writer`` (writing RLDS), ``frames``,
``text`` and ``minilm`` (language), ``tracking``, ``ground_truth_tracks`` and ``track_files``
(point tracks), ``records`` (shard layout), ``build_clips`` (the converter), ``loader``
(``ClipDataset``, ``make_loader``; no TensorFlow), ``toy_world``, ``toy_tasks`` and ``toy``
(the embedded procedural dataset).
"""
