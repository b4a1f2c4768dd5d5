"""Small generated RLDS datasets in the published layouts (BridgeData V2, OXE Bridge, LIBERO).

The OXE Bridge and LIBERO features are read from the published ``features.json`` files in
``tests/data/specs`` (written outside this project, see its README), so a wrong reading of a
layout cannot hide in a hand-written fixture; BridgeData V2's layout is also checked against the
real episodes in ``tests/data/bridge_dataset_real``. Only the number of episodes and steps is
tiny. Frames carry a known pattern so tests can check crops, resizes and orientation by value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipelines.rlds_writer import write_rlds

DATA = Path(__file__).resolve().parents[1] / "data"
SPECS = DATA / "specs"
REAL_BRIDGE = DATA / "bridge_dataset_real" / "bridge_dataset" / "1.0.0"


def spec_features(name: str):
    """The tfds FeaturesDict of a published ``features.json`` in ``tests/data/specs``."""
    import tensorflow_datasets as tfds

    return tfds.features.FeatureConnector.from_json(json.loads((SPECS / name).read_text()))


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


def write_bridge_dataset(root: Path, lengths=(6, 4, 5), instructions=None, size=(256, 256),
                         name: str = "bridge_dataset") -> Path:
    """rail-berkeley ``bridge_dataset`` 1.0.0 layout (4 cameras, step-level language); ``name``
    "bridge" writes it under the name current tfds catalogues give this layout."""
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
                # As in the real data: image_3 is an absent camera, all zeros.
                imgs = {"image_0": frame, "image_1": frame[::-1], "image_2": frame[:, ::-1],
                        "image_3": np.zeros_like(frame)}
                return {"observation": {**imgs, "state": np.zeros(7, np.float32)},
                        "action": np.zeros(7, np.float32), "language_instruction": text,
                        "language_embedding": emb, "reward": float(last), "discount": 1.0,
                        "is_first": first, "is_last": last, "is_terminal": last}

            yield {"steps": _steps(n, h, w, e, make),
                   "episode_metadata": {"file_path": f"raw/{e}", "episode_id": e,
                                        **{f"has_image_{i}": i == 0 for i in range(4)},
                                        "has_language": bool(text)}}

    return write_rlds(root, name, features, {"train": episodes})


def write_bridge_oxe(root: Path, lengths=(5, 4)) -> Path:
    """Open X-Embodiment ``bridge`` layout (one 480x640 camera, language in observation), with
    the features of the published ``oxe_bridge_features.json`` and pattern frames."""
    features = spec_features("oxe_bridge_features.json")
    h, w = features["steps"]["observation"]["image"].shape[:2]

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
                        "reward": float(last),
                        "is_first": first, "is_last": last, "is_terminal": last}

            yield {"episode_id": f"oxe-{e}", "steps": _steps(n, h, w, e, make)}

    return write_rlds(root, "bridge", features, {"train": episodes})


def write_bridge_oxe_fake(root: Path, num_examples: int = 2, num_steps: int = 3) -> Path:
    """The OXE ``bridge`` layout filled by tfds's own fake-data generator (random values of the
    published features), stored by tfds's own writer: nothing of this project's writer or its
    reading of the layout is involved."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import mocking

    features = spec_features("oxe_bridge_features.json")
    examples = list(mocking.RandomFakeGenerator(features, num_examples=num_examples,
                                                num_sub_examples=num_steps, seed=0))
    tfds.dataset_builders.store_as_tfds_dataset(
        name="bridge", version="0.1.0", features=features, data_dir=str(root),
        split_datasets={"train": [(str(i), e) for i, e in enumerate(examples)]})
    return Path(root) / "bridge" / "0.1.0"


def libero_stored(view: np.ndarray) -> np.ndarray:
    """A camera view as the published LIBERO RLDS stores it: robosuite renders the view upside
    down (``raw = view[::-1]``) and the builder writes ``raw[::-1, ::-1]``."""
    raw = view[::-1]
    return np.ascontiguousarray(raw[::-1, ::-1])


def write_libero(root: Path, lengths=(5, 3)) -> Path:
    """``libero_10_no_noops`` with the published features (256x256 jpeg cameras) and frames
    stored as the published builder stores them (:func:`libero_stored` of a pattern view)."""
    features = spec_features("libero_10_no_noops_features.json")
    h, w = features["steps"]["observation"]["image"].shape[:2]

    def episodes():
        for e, n in enumerate(lengths):
            def make(t, frame, first, last):
                stored = libero_stored(frame)
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
