"""Install flipjax (FLIP + AVDC geometry in JAX) with its data and experiment packages."""

from setuptools import find_packages, setup

setup(
    name="flipjax",
    version="0.1.0",
    description="FLIP flow-centric generative planning and AVDC action-from-video geometry in JAX",
    python_requires=">=3.10",
    packages=find_packages(include=["flipjax*", "data_pipelines*", "experiments*", "benchmarks*"]),
    install_requires=[
        "jax>=0.4.30",
        "numpy>=1.26",
        "einops>=0.7",
        "ml_collections>=0.1.1",
        "absl-py>=1.4",
    ],
    # Extras `data` and `sim` arrive with the issues that need them.
    extras_require={
        "viz": ["matplotlib>=3.7"],
        "test": ["pytest>=7.4", "hypothesis>=6.90", "ruff>=0.5", "matplotlib>=3.7", "scipy>=1.11"],
    },
)
