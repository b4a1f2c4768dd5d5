"""A NumPy/SciPy re-implementation of AVDC's rigid-motion estimation: the reference fit.

Written from the description of AVDC's method (learning to act from actionless videos through
dense correspondences) and its released experiment code's behaviour, not copied from it:

* per frame pair, a 2-point 2D similarity RANSAC (100 tries, 0.5 px threshold) on the pixels of
  the surviving points at frame t-1 (re-projected from the current 3D estimate) and frame t;
  points outside the consensus set are dropped for the rest of the sequence;
* the 3D rigid step is found by BFGS over (x, y, z, roll, pitch, yaw) of the mean squared
  reprojection error plus a penalty on translations above 1 m, first from zero and, when that
  does not reach a loss of 1e-3, from ``restarts`` random starts, keeping the best;
* steps are chained: T_t = S_t T_{t-1}.

The geometry benchmark (``benchmarks.geometry``) compares flipjax's batched fit against it, and
the Meta-World evaluation's ``avdc`` mode (``experiments.metaworld.planners``) runs AVDC's
pipeline with it. It needs SciPy (imported when a fit runs) and is orders of magnitude slower
than :mod:`flipjax.geometry.sequence`.
"""

from __future__ import annotations

import numpy as np


def _euler_matrix(p: np.ndarray) -> np.ndarray:
    x, y, z, roll, pitch, yaw = p
    cr, sr, cp, sp, cy, sy = (np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch),
                              np.cos(yaw), np.sin(yaw))
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    T = np.eye(4)
    T[:3, :3] = rx @ ry @ rz
    T[:3, 3] = (x, y, z)
    return T


def _project(K: np.ndarray, X: np.ndarray) -> np.ndarray:
    p = X @ K.T
    return p[:, :2] / p[:, 2:3]


def _similarity_ransac(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, tries: int = 100,
                       threshold: float = 0.5) -> np.ndarray:
    """Indices of the largest consensus set of a 2-point 2D similarity a -> b."""
    n = len(a)
    best = np.arange(0)
    if n < 2:
        return np.arange(n)
    for _ in range(tries):
        i, j = rng.choice(n, 2, replace=False)
        va, vb = a[j] - a[i], b[j] - b[i]
        za, zb = complex(*va), complex(*vb)
        if abs(za) < 1e-9:
            continue
        s = zb / za  # rotation and scale as one complex factor
        pred = np.array([[(complex(*(p - a[i])) * s).real, (complex(*(p - a[i])) * s).imag]
                         for p in a]) + b[i]
        inl = np.nonzero(np.linalg.norm(pred - b, axis=1) < threshold)[0]
        if len(inl) > len(best):
            best = inl
    return best


def _solve_step(X: np.ndarray, uv: np.ndarray, K: np.ndarray, rng: np.random.Generator,
                restarts: int) -> np.ndarray:
    from scipy.optimize import minimize

    Xh = np.concatenate([X, np.ones((len(X), 1))], 1)

    def loss(p):
        T = _euler_matrix(p)
        q = (Xh @ T.T)[:, :3] @ K.T
        pred = q[:, :2] / q[:, 2:3]
        return np.mean((pred - uv) ** 2) + max(1.0, np.linalg.norm(p[:3])) - 1.0

    best = minimize(loss, np.zeros(6))
    if best.fun >= 1e-3:
        for _ in range(restarts):
            sol = minimize(loss, rng.standard_normal(6))
            if sol.fun < best.fun:
                best = sol
    return _euler_matrix(best.x)


def fit_sequence(points3d: np.ndarray, tracks: np.ndarray, K: np.ndarray, visible: np.ndarray,
                 *, restarts: int = 50, seed: int = 0) -> np.ndarray:
    """AVDC-style chained fit of one sequence.

    Args:
      points3d: float[N 3]; tracks: float[T N 2]; K: float[3 3]; visible: bool[T N].
      restarts: random BFGS restarts per step when the zero start is not good enough.
      seed: seed of the RANSAC samples and restarts.

    Returns:
      float[T 4 4] transforms, X_t = T_t X_0.
    """
    rng = np.random.default_rng(seed)
    keep = np.nonzero(visible[0])[0]
    X = points3d[keep].astype(np.float64)
    T = np.eye(4)
    out = [T]
    for t in range(1, tracks.shape[0]):
        src = _project(K, X)
        dst = tracks[t, keep]
        inl = _similarity_ransac(src, dst, rng)
        if len(inl) >= 3:
            keep, X, dst = keep[inl], X[inl], dst[inl]
            S = _solve_step(X, dst, K, rng, restarts)
        else:
            S = np.eye(4)  # AVDC has no guard here; hold still instead of crashing
        X = X @ S[:3, :3].T + S[:3, 3]
        T = S @ T
        out.append(T)
    return np.stack(out)
