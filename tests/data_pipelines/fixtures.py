"""Small generated RLDS datasets in the published layouts (BridgeData V2, OXE Bridge, LIBERO).

Feature names, shapes and dtypes follow the published ``features.json`` of each dataset;
only the number of episodes and steps is tiny. Frames carry a known pattern so tests can check
crops, resizes and the LIBERO rotation by value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.rlds_writer import write_rlds


def pattern_frame(h: int, w: int, t: int, seed: int = 0) -> np.ndarray:
    """uint8[H W 3]: R = column ramp, G = row ramp, B = smooth texture moving by t pixels."""
    u = np.arange(w, dtype=np.float32)[None, :]
    v = np.arange(h, dtype=np.float32)[:, None]
    r = np.broadcast_to(255 * u / max(1, w - 1), (h, w))
    g = np.broadcast_to(255 * v / max(1, h - 1), (h, w))
    rng = np.random.default_rng(seed)
    fx, fy, ph = rng.uniform(0.05, 0.2, 3), rng.uniform(0.05, 0.2, 3), rng.uniform(0, 6, 3)
    b = sum(np.sin(fx[i] * (u - t) + fy[i] * v + ph[i]) for i in range(3))
    b = 127.5 + 40 * b
    return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


def _steps(n: int, h: int, w: int, seed: int, make: callable) -> list[dict]:
    return [make(t, pattern_frame(h, w, t, seed), t == 0, t == n - 1) for t in range(n)]


def write_bridge_dataset(root: Path, lengths=(6, 4, 5), instructions=None, size=(256, 256)
                         ) -> Path:
    """rail-berkeley ``bridge_dataset`` 1.0.0 layout (4 cameras, step-level language)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    h, w = size
    instructions = instructions or [f"put the cup in the sink {i}" for i in range(len(lengths))]
    obs = {f"image_{i}": f.Image(shape=(h, w, 3), encoding_format="jpeg") for i in range(4)}
    obs["state"] = f.Tensor(shape=(7,), dtype=np.float32)
    features = f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict(obs),
            "action": f.Tensor(shape=(7,), dtype=np.float32),
            "language_instruction": f.Text(),
            "language_embedding": f.Tensor(shape=(512,), dtype=np.float32),
            "reward": f.Scalar(dtype=np.float64), "discount": f.Scalar(dtype=np.float64),
            "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_,
        }),
        "episode_metadata": f.FeaturesDict({
            "file_path": f.Text(), "episode_id": f.Scalar(dtype=np.int32),
            **{f"has_image_{i}": np.bool_ for i in range(4)}, "has_language": np.bool_,
        }),
    })

    def episodes():
        for e, (n, text) in enumerate(zip(lengths, instructions, strict=True)):
            emb = np.random.default_rng(e).standard_normal(512).astype(np.float32)

            def make(t, frame, first, last, text=text, emb=emb, e=e):
                imgs = {f"image_{i}": frame if i == 0 else np.zeros_like(frame)
                        for i in range(4)}
                return {"observation": {**imgs, "state": np.zeros(7, np.float32)},
                        "action": np.zeros(7, np.float32), "language_instruction": text,
                        "language_embedding": emb, "reward": float(last), "discount": 1.0,
                        "is_first": first, "is_last": last, "is_terminal": last}

            yield {"steps": _steps(n, h, w, e, make),
                   "episode_metadata": {"file_path": f"raw/{e}", "episode_id": e,
                                        **{f"has_image_{i}": i == 0 for i in range(4)},
                                        "has_language": bool(text)}}

    return write_rlds(root, "bridge_dataset", features, {"train": episodes})


def write_bridge_oxe(root: Path, lengths=(5, 4), size=(480, 640)) -> Path:
    """Open X-Embodiment ``bridge`` layout (one 480x640 camera, language in observation)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    h, w = size
    features = f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict({
                "image": f.Image(shape=(h, w, 3), encoding_format="jpeg"),
                "natural_language_instruction": f.Text(),
                "natural_language_embedding": f.Tensor(shape=(512,), dtype=np.float32),
                "state": f.Tensor(shape=(7,), dtype=np.float32),
            }),
            "action": f.FeaturesDict({
                "world_vector": f.Tensor(shape=(3,), dtype=np.float32),
                "rotation_delta": f.Tensor(shape=(3,), dtype=np.float32),
                "open_gripper": np.bool_, "terminate_episode": np.float32,
            }),
            "reward": f.Scalar(dtype=np.float32), "discount": f.Scalar(dtype=np.float32),
            "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_,
        }),
    })

    def episodes():
        for e, n in enumerate(lengths):
            def make(t, frame, first, last, e=e):
                return {"observation": {"image": frame,
                                        "natural_language_instruction": f"open drawer {e}",
                                        "natural_language_embedding": np.full(512, e, np.float32),
                                        "state": np.zeros(7, np.float32)},
                        "action": {"world_vector": np.zeros(3, np.float32),
                                   "rotation_delta": np.zeros(3, np.float32),
                                   "open_gripper": True, "terminate_episode": float(last)},
                        "reward": float(last), "discount": 1.0,
                        "is_first": first, "is_last": last, "is_terminal": last}

            yield {"steps": _steps(n, h, w, e, make)}

    return write_rlds(root, "bridge", features, {"train": episodes})


def write_libero(root: Path, lengths=(5, 3), size=(256, 256)) -> Path:
    """``libero_10_no_noops`` layout; frames are stored rotated by 180 degrees like LIBERO's."""
    import tensorflow_datasets as tfds

    f = tfds.features
    h, w = size
    features = f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict({
                "image": f.Image(shape=(h, w, 3), encoding_format="png"),
                "wrist_image": f.Image(shape=(h, w, 3), encoding_format="png"),
                "state": f.Tensor(shape=(8,), dtype=np.float32),
                "joint_state": f.Tensor(shape=(7,), dtype=np.float32),
            }),
            "action": f.Tensor(shape=(7,), dtype=np.float32),
            "language_instruction": f.Text(),
            "reward": f.Scalar(dtype=np.float32), "discount": f.Scalar(dtype=np.float32),
            "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_,
        }),
        "episode_metadata": f.FeaturesDict({"file_path": f.Text()}),
    })

    def episodes():
        for e, n in enumerate(lengths):
            def make(t, frame, first, last):
                stored = np.ascontiguousarray(frame[::-1, ::-1])  # how LIBERO frames are stored
                return {"observation": {"image": stored, "wrist_image": stored,
                                        "state": np.zeros(8, np.float32),
                                        "joint_state": np.zeros(7, np.float32)},
                        "action": np.zeros(7, np.float32),
                        "language_instruction": "put both the alphabet soup and the tomato "
                                                "sauce in the basket",
                        "reward": float(last), "discount": 1.0,
                        "is_first": first, "is_last": last, "is_terminal": last}

            yield {"steps": _steps(n, h, w, e, make),
                   "episode_metadata": {"file_path": f"libero_10/{e}.hdf5"}}

    return write_rlds(root, "libero_10_no_noops", features, {"train": episodes})


def write_generic(root: Path, frames_per_episode: list[np.ndarray], texts: list[str]) -> Path:
    """A generic dataset with ``steps/observation/rgb`` of any shape (to test bad episodes)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    features = f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict({
                "rgb": f.Tensor(shape=(None, None, None), dtype=np.uint8, encoding="zlib")}),
            "instruction": f.Text(),
        }),
    })

    def episodes():
        for frames, text in zip(frames_per_episode, texts, strict=True):
            yield {"steps": [{"observation": {"rgb": fr}, "instruction": text} for fr in frames]}

    return write_rlds(root, "generic_set", features, {"train": episodes})
