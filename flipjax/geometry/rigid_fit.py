"""Robust rigid fit of one frame: 3D points + their tracked pixels -> SE(3) transform.

Finds ``T`` minimising ``sum_i w_i rho(|pi(K T X_i) - u_i|^2)`` in two stages:

1. Hypotheses: ``num_hypotheses`` random minimal subsets (3 points, 6 equations for 6 unknowns)
   drawn from the usable points with a PRNG key, each solved by a few damped Gauss-Newton steps
   from the initial transform (vmapped), plus the initial transform itself. The hypothesis with
   the best truncated-quadratic (MSAC) score on a random subset of points wins.
2. Refinement: Levenberg-Marquardt with IRLS weights of a robust loss (Cauchy by default) on all
   usable points, fixed iteration budget in ``lax.fori_loop``, steps accepted only when the robust
   cost drops, convergence flagged from the step size and cost change.

Updates are left-multiplicative (``T <- exp(delta) T``) with the analytic 2x6 Jacobian of the
pinhole projection, so each iteration is a handful of fused elementwise ops and one 6x6 solve.
Degenerate problems (fewer than ``min_inliers`` usable points, all depths invalid, collinear
points) keep the initial transform and are flagged; nothing returns NaN.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.geometry import camera, robust, se3
from flipjax.typing import Array, ArrayLike, PRNGKey


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Settings of the robust rigid fit (hashable: it is a static argument under jit).

    Attributes:
      num_iterations: LM iterations of the robust refinement on all points.
      num_hypotheses: random minimal-subset hypotheses per frame (0 disables them).
      sample_size: points per hypothesis (3 is minimal for 6 DoF).
      hypothesis_iterations: damped Gauss-Newton steps that solve each hypothesis.
      score_points: points (drawn at random from the usable ones) used to score hypotheses.
      loss: robust loss of the refinement: "cauchy", "huber" or "l2".
      loss_scale: residual norm (pixels) where the robust loss departs from quadratic.
      inlier_threshold: residual norm (pixels) below which a point counts as an inlier; also the
        truncation of the MSAC hypothesis score.
      min_depth: points with z at or below this (metres) are unusable.
      min_inliers: fewer usable points or inliers than this flags the frame as degenerate.
      collinear_tolerance: the inliers are collinear (degenerate) when the second singular value
        of their centred 3D coordinates is below this fraction of the first.
      step_tolerance: an LM step of twist norm below this means converged (1e-4: 0.006 deg,
        0.1 mm, far below what pixel noise can resolve).
      cost_tolerance: an accepted LM step with relative cost decrease below this means converged.
      chain: fit frame t against frame t-1 and compose (AVDC's frame-to-frame chaining, points
        that are outliers once are dropped for good). Default False: every frame against frame 0,
        warm-started from the previous frame, so errors do not accumulate.
      camera_motion: the points are a static scene seen by a moving camera; report the camera's
        motion (the inverse of the scene's apparent motion).
      warm_start: initialise frame t from the fit of frame t-1 (direct mode only).
      prior_translation: sigma (metres) of a zero-mean Gaussian prior on the displacement of
        the points' centroid; 0: none. Flows on a small or distant object barely constrain
        its motion along the viewing ray (a depth change only scales the points' spread), so
        noisy tracks turn into large spurious depth motion; the prior holds what the pixels
        cannot tell and leaves the directions they measure to the data. It costs as much as
        one point's residual of ``loss_scale`` pixels at one sigma.
      prior_rotation: sigma (radians) of the same prior on the rotation angle; 0: none.
    """

    num_iterations: int = 8
    num_hypotheses: int = 8
    sample_size: int = 3
    hypothesis_iterations: int = 3
    score_points: int = 64
    loss: str = "cauchy"
    loss_scale: float = 1.5
    inlier_threshold: float = 3.0
    min_depth: float = 1e-3
    min_inliers: int = 3
    collinear_tolerance: float = 1e-3
    step_tolerance: float = 1e-4
    cost_tolerance: float = 1e-7
    chain: bool = False
    camera_motion: bool = False
    warm_start: bool = True
    prior_translation: float = 0.0
    prior_rotation: float = 0.0

    def __post_init__(self):
        robust.cost(0.0, self.loss, self.loss_scale)  # validates loss and scale
        positive = ("num_iterations", "hypothesis_iterations", "score_points", "inlier_threshold",
                    "min_depth", "collinear_tolerance")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"FitConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_hypotheses < 0:
            raise ValueError(f"FitConfig.num_hypotheses must be >= 0, got {self.num_hypotheses}")
        if self.sample_size < 3:
            raise ValueError(f"FitConfig.sample_size must be >= 3, got {self.sample_size}")
        for name in ("prior_translation", "prior_rotation"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FitConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_inliers < 3:
            raise ValueError(f"FitConfig.min_inliers must be >= 3, got {self.min_inliers}")


class FrameFit(NamedTuple):
    """Result of :func:`fit_rigid` (leading axes as the caller's vmap).

    Attributes:
      transform: float[4 4], X_t = transform @ X_0.
      inliers: bool[N], usable points with residual below ``inlier_threshold``.
      rms: float[], inlier reprojection RMS in pixels (0 when there are no inliers).
      converged: bool[], the refinement converged and the frame is not degenerate.
      degenerate: bool[], too few usable points or inliers, or collinear inliers.
      num_inliers: int32[].
    """

    transform: Array
    inliers: Array
    rms: Array
    converged: Array
    degenerate: Array
    num_inliers: Array


# Internals work component-major: points Xc float[3 N], pixels uvc float[2 N]. Under vmap the
# point axis is then minor and contiguous, and the normal equations become 27 fused reductions
# instead of a batched [N 2 6] x [N 2 6] contraction (13x faster on CPU).


def transform_points(T: Array, Xc: Array) -> Array:
    """R X + t for component-major points [3 N], as fused elementwise ops (no reduction)."""
    return jnp.stack([T[i, 0] * Xc[0] + T[i, 1] * Xc[1] + T[i, 2] * Xc[2] + T[i, 3]
                      for i in range(3)])


def _project(T: Array, Xc: Array, K: Array, min_depth: float) -> tuple[Array, Array, Array]:
    """Returns camera points P = T X [3 N], pixels [2 N] and the in-front mask [N]."""
    P = transform_points(T, Xc)
    front = P[2] > min_depth
    inv_z = 1.0 / jnp.where(front, P[2], 1.0)
    nx, ny = P[0] * inv_z, P[1] * inv_z
    u = K[0, 0] * nx + K[0, 1] * ny + K[0, 2]
    v = K[1, 1] * ny + K[1, 2]
    return P, jnp.stack([u, v]), front


def _normal_equations(P: Array, front: Array, K: Array, w: Array, r: Array
                      ) -> tuple[Array, Array]:
    """Gauss-Newton system (H float[6 6], g float[6]) of the weighted pixel residuals r [2 N].

    Jacobian rows d(u, v)/d(delta) for the left perturbation exp(delta) T, delta = (rho, phi).
    """
    inv_z = 1.0 / jnp.where(front, P[2], 1.0)
    nx, ny = P[0] * inv_z, P[1] * inv_z
    zero = jnp.zeros_like(nx)
    dnx = (inv_z, zero, -nx * inv_z, -nx * ny, 1.0 + nx * nx, -ny)
    dny = (zero, inv_z, -ny * inv_z, -(1.0 + ny * ny), nx * ny, nx)
    ju = [K[0, 0] * a + K[0, 1] * b for a, b in zip(dnx, dny, strict=True)]
    jv = [K[1, 1] * b for b in dny]
    wju = [w * a for a in ju]
    wjv = [w * b for b in jv]
    entries = {}
    for k in range(6):
        for m in range(k, 6):
            entries[k, m] = jnp.sum(wju[k] * ju[m] + wjv[k] * jv[m])
    H = jnp.stack([jnp.stack([entries[min(k, m), max(k, m)] for m in range(6)])
                   for k in range(6)])
    g = jnp.stack([jnp.sum(wju[k] * r[0] + wjv[k] * r[1]) for k in range(6)])
    return H, g


def _spd_solve(A: Array, b: Array) -> Array:
    """Solves A x = b for a small symmetric positive definite A [n n] by unrolled Cholesky.

    Unrolled scalar code fuses into a few elementwise kernels under vmap, which is far faster
    on CPU than a batched LAPACK call per 6x6 system. Non-positive pivots are clamped so the
    result stays finite (the caller rejects steps that do not lower the cost).
    """
    n = A.shape[-1]
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        d = A[j, j] - sum(L[j][k] * L[j][k] for k in range(j))
        L[j][j] = jnp.sqrt(jnp.maximum(d, 1e-30))
        for i in range(j + 1, n):
            L[i][j] = (A[i, j] - sum(L[i][k] * L[j][k] for k in range(j))) / L[j][j]
    y = [None] * n
    for i in range(n):
        y[i] = (b[i] - sum(L[i][k] * y[k] for k in range(i))) / L[i][i]
    x = [None] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - sum(L[k][i] * x[k] for k in range(i + 1, n))) / L[i][i]
    return jnp.stack(x)


def _sq_norm(pred: Array, uvc: Array) -> Array:
    return jnp.sum((pred - uvc) ** 2, 0)


def _cost(sq: Array, front: Array, w0: Array, loss: str, cfg: FitConfig) -> Array:
    # A point pushed behind the camera costs as much as a gross outlier, so the solver is not
    # rewarded for hiding points.
    far = jnp.asarray((10.0 * cfg.inlier_threshold) ** 2, sq.dtype)
    sq = jnp.where(front, jnp.minimum(sq, far), far)
    return jnp.sum(w0 * robust.cost(sq, loss, cfg.loss_scale))


def _has_prior(cfg: FitConfig) -> bool:
    return cfg.prior_translation > 0 or cfg.prior_rotation > 0


def _prior(T: Array, centre: Array, cfg: FitConfig) -> tuple[Array, Array, Array]:
    """The motion prior's (cost, H float[6 6], g float[6]) at T, for the left perturbation.

    The centroid moves to p = T c, so exp(delta) T moves it by rho - [p]x phi; the rotation
    angle moves by phi (to first order).
    """
    scale2 = cfg.loss_scale ** 2
    wt = scale2 / cfg.prior_translation ** 2 if cfg.prior_translation > 0 else 0.0
    wr = scale2 / cfg.prior_rotation ** 2 if cfg.prior_rotation > 0 else 0.0
    p = T[:3, :3] @ centre + T[:3, 3]
    d = p - centre
    theta = se3.so3_log(T[:3, :3])
    jd = jnp.concatenate([jnp.eye(3, dtype=T.dtype), -se3.hat(p)], 1)     # 3 6
    jr = jnp.concatenate([jnp.zeros((3, 3), T.dtype), jnp.eye(3, dtype=T.dtype)], 1)
    H = wt * jd.T @ jd + wr * jr.T @ jr
    g = wt * jd.T @ d + wr * jr.T @ theta
    return 0.5 * (wt * jnp.sum(d * d) + wr * jnp.sum(theta * theta)), H, g


def _levenberg_marquardt(T0: Array, Xc: Array, uvc: Array, w0: Array, K: Array, loss: str,
                         iterations: int, cfg: FitConfig,
                         centre: Array | None = None) -> tuple[Array, Array]:
    """Robust LM from T0 (with the motion prior about ``centre`` float[3] when the config
    has one). Returns (transform float[4 4], converged bool[])."""
    prior = _has_prior(cfg)
    if prior and centre is None:
        centre = _centroid(Xc, w0)

    def total(sq: Array, front: Array, T: Array) -> Array:
        c = _cost(sq, front, w0, loss, cfg)
        return c + _prior(T, centre, cfg)[0] if prior else c

    P0, pred0, front0 = _project(T0, Xc, K, cfg.min_depth)
    cost0 = total(_sq_norm(pred0, uvc), front0, T0)

    def body(_, state):
        # The projection at T is carried from the previous iteration's candidate evaluation.
        T, P, pred, front, cost, lam, converged = state
        r = pred - uvc
        w = w0 * front * robust.weight(jnp.sum(r * r, 0), loss, cfg.loss_scale)
        H, g = _normal_equations(P, front, K, w, r)
        if prior:
            _, Hp, gp = _prior(T, centre, cfg)
            H, g = H + Hp, g + gp
        diag = jnp.diagonal(H)
        eps = 1e-9 * jnp.sum(diag) + 1e-12
        delta = -_spd_solve(H + jnp.diag(lam * diag + eps), g)
        T_new = se3.matmul(se3.exp(delta), T)
        P_new, pred_new, front_new = _project(T_new, Xc, K, cfg.min_depth)
        cost_new = total(_sq_norm(pred_new, uvc), front_new, T_new)
        ok = jnp.isfinite(cost_new) & jnp.all(jnp.isfinite(delta)) & (cost_new <= cost)
        # A tiny step means a stationary point even when float32 round-off makes it rejected.
        tiny_step = jnp.linalg.norm(delta) < cfg.step_tolerance
        flat = ok & (cost - cost_new <= cfg.cost_tolerance * cost)
        pick = lambda new, old: jnp.where(ok, new, old)
        return (pick(T_new, T), pick(P_new, P), pick(pred_new, pred), pick(front_new, front),
                pick(cost_new, cost),
                jnp.where(ok, jnp.maximum(lam * 0.3, 1e-9), jnp.minimum(lam * 8.0, 1e8)),
                converged | tiny_step | flat | (cost <= 0.0))

    lam0 = jnp.asarray(1e-3, Xc.dtype)
    state = (T0, P0, pred0, front0, cost0, lam0, jnp.asarray(False))
    state = jax.lax.fori_loop(0, iterations, body, state)
    return state[0], state[-1]


def _centroid(Xc: Array, w0: Array) -> Array:
    """float[3] centroid of the usable points (weights w0)."""
    m = (w0 > 0).astype(Xc.dtype)
    return jnp.sum(Xc * m, 1) / jnp.maximum(jnp.sum(m), 1.0)


def _sample_usable(key: PRNGKey, usable: Array, k: int, shape: tuple[int, ...] = (),
                   replace: bool = False) -> Array:
    """Indices [*shape k] of k points drawn uniformly from the usable ones.

    Distinct unless ``replace`` (the shifting below is O(k^2) ops, fine for minimal subsets).

    Draws ranks among the usable points without replacement (rank j from n - j values, shifted
    past the ranks already taken) and maps ranks to indices through the cumulative count.
    This needs k random numbers per subset instead of one per point (Gumbel top-k), which
    dominated the cost of the hypotheses on CPU. With fewer than k usable points the subset
    repeats points; such a frame is flagged degenerate anyway.
    """
    n_usable = jnp.sum(usable)
    u = jax.random.uniform(key, (*shape, k))
    picks = []
    for j in range(k):
        if replace:
            picks.append(jnp.floor(u[..., j] * n_usable).astype(jnp.int32))
            continue
        x = jnp.floor(u[..., j] * jnp.maximum(n_usable - j, 1)).astype(jnp.int32)
        for v in (jnp.sort(jnp.stack(picks, -1), -1)[..., i] for i in range(j)) if picks else ():
            x = x + (x >= v)
        picks.append(x)
    ranks = jnp.minimum(jnp.stack(picks, -1), jnp.maximum(n_usable - 1, 0))
    cum = jnp.cumsum(usable.astype(jnp.int32))
    return jnp.minimum(jnp.searchsorted(cum, ranks + 1, side="left"), usable.shape[0] - 1)


def _best_hypothesis(T0: Array, Xc: Array, uvc: Array, w0: Array, K: Array, key: PRNGKey,
                     cfg: FitConfig, centre: Array | None = None) -> Array:
    """Solves random minimal subsets from T0 and returns the best-scoring transform."""
    n = Xc.shape[1]
    usable = w0 > 0
    key_sub, key_score = jax.random.split(key)
    idx = _sample_usable(key_sub, usable, min(cfg.sample_size, n), (cfg.num_hypotheses,))

    def solve(sub):
        return _levenberg_marquardt(T0, Xc[:, sub], uvc[:, sub], w0[sub], K, "l2",
                                    cfg.hypothesis_iterations, cfg, centre)[0]

    hyps = jnp.concatenate([T0[None], jax.vmap(solve)(idx)], 0)
    sel = _sample_usable(key_score, usable, cfg.score_points, replace=True)
    Xs, uvs, ws = Xc[:, sel], uvc[:, sel], w0[sel]

    def score(T):
        _, pred, front = _project(T, Xs, K, cfg.min_depth)
        sq = jnp.where(front, _sq_norm(pred, uvs), jnp.inf)
        total = jnp.sum(ws * jnp.minimum(sq, cfg.inlier_threshold**2))
        return jnp.where(jnp.all(jnp.isfinite(T)), total, jnp.inf)

    scores = jax.vmap(score)(hyps)
    # Ties (e.g. every point an inlier of several hypotheses) keep the earliest, the initial T.
    return hyps[jnp.argmin(scores)]


def _collinear(Xc: Array, mask: Array, tolerance: float) -> Array:
    """Whether the masked points are (nearly) collinear, from covariance invariants.

    With covariance eigenvalues l1 >= l2 >= l3, e2 = l1 l2 + l1 l3 + l2 l3 lies within a factor
    of 3 of l1 l2 and tr = l1 + l2 + l3 within 3 of l1, so e2 / tr^2 tracks (l2 / l1) up to a
    constant: a closed-form rank test without a batched eigendecomposition.
    """
    m = mask.astype(Xc.dtype)
    count = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(m * Xc, 1, keepdims=True) / count
    d = (Xc - mean) * m
    C = jnp.einsum("in,jn->ij", d, d) / count
    tr = jnp.trace(C)
    e2 = 0.5 * (tr * tr - jnp.sum(C * C))
    return e2 <= (tolerance**2) * tr * tr + 1e-30


def evaluate(T: Array, Xc: Array, uvc: Array, usable: Array, K: Array, cfg: FitConfig
             ) -> tuple[Array, Array, Array, Array]:
    """Scores a transform: (inliers bool[N], rms float[], num_inliers int32[], degenerate bool[]).

    Degenerate: fewer than ``min_inliers`` usable points or inliers, or collinear inliers.
    """
    _, pred, front = _project(T, Xc, K, cfg.min_depth)
    sq = _sq_norm(pred, uvc)
    inliers = usable & front & (sq < cfg.inlier_threshold**2)
    n_in = jnp.sum(inliers)
    rms = jnp.sqrt(jnp.sum(jnp.where(inliers, sq, 0.0)) / jnp.maximum(n_in, 1))
    degenerate = ((jnp.sum(usable) < cfg.min_inliers) | (n_in < cfg.min_inliers)
                  | _collinear(Xc, inliers, cfg.collinear_tolerance))
    return inliers, rms, n_in.astype(jnp.int32), degenerate


def fit_frame(Xc: Array, uvc: Array, K: Array, w0: Array, T0: Array, key: PRNGKey,
              cfg: FitConfig) -> FrameFit:
    """Unchecked core of :func:`fit_rigid` for the sequence fitter.

    Args are component-major and sanitised: Xc float[3 N], uvc float[2 N], w0 float[N] zero
    where unusable, T0 float[4 4] initial transform.
    """
    usable = w0 > 0
    # The prior's centre is the whole object's, also for the hypotheses' minimal subsets.
    centre = _centroid(Xc, w0) if _has_prior(cfg) else None
    start = (_best_hypothesis(T0, Xc, uvc, w0, K, key, cfg, centre) if cfg.num_hypotheses > 0
             else T0)
    T, converged = _levenberg_marquardt(start, Xc, uvc, w0, K, cfg.loss, cfg.num_iterations, cfg,
                                        centre)
    inliers, rms, n_in, degenerate = evaluate(T, Xc, uvc, usable, K, cfg)
    degenerate = degenerate | ~jnp.all(jnp.isfinite(T))
    # A degenerate frame keeps the initial transform; its statistics are re-evaluated there.
    i0, rms0, n0, _ = evaluate(T0, Xc, uvc, usable, K, cfg)
    pick = lambda a, b: jnp.where(degenerate, b, a)
    return FrameFit(pick(T, T0), pick(inliers, i0), pick(rms, rms0), converged & ~degenerate,
                    degenerate, pick(n_in, n0))


def _has_depth(points3d: Array, min_depth: float) -> Array:
    """Finite points in front of the camera: bool[... N]."""
    return jnp.all(jnp.isfinite(points3d), -1) & (jnp.nan_to_num(points3d[..., 2]) > min_depth)


def usable_points(points3d: Array, pixels: Array, visible: Array | None,
                  image_size: tuple[int, int] | None, min_depth: float) -> Array:
    """Which correspondences can take part in a fit: bool[... N].

    A point is unusable when its 3D coordinates are not finite or not in front of the camera
    (no depth), its pixel is not finite, it is not visible, or (if ``image_size`` is given) its
    pixel lies outside the image.
    """
    ok = _has_depth(points3d, min_depth) & jnp.all(jnp.isfinite(pixels), -1)
    if visible is not None:
        ok = ok & visible
    if image_size is not None:
        ok = ok & camera.in_image(jnp.nan_to_num(pixels), image_size)
    return ok


def sanitize_points(points3d: Array, min_depth: float) -> Array:
    """Replaces points without finite depth in front of the camera by (0, 0, 1).

    Unusable entries carry zero weight, but 0 * NaN would still poison the normal equations.
    """
    ok = _has_depth(points3d, min_depth)
    return jnp.where(ok[..., None], points3d, jnp.array([0.0, 0.0, 1.0], points3d.dtype))


def sanitize_pixels(pixels: Array, usable: Array) -> Array:
    """Replaces unusable pixels by 0 (see :func:`sanitize_points`)."""
    return jnp.where(usable[..., None], pixels, 0.0)


def fit_rigid(
    points3d: ArrayLike,
    pixels: ArrayLike,
    K: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    init: ArrayLike | None = None,
    key: PRNGKey | None = None,
    image_size: tuple[int, int] | None = None,
    config: FitConfig = FitConfig(),
) -> FrameFit:
    """Robust rigid fit of one frame (one problem; ``jax.vmap`` it for batches).

    Args:
      points3d: float[N 3] camera-frame points at the reference frame.
      pixels: float[N 2] where the points are tracked in the target frame, (u, v).
      K: float[3 3] intrinsics.
      weights: float[N] or bool[N] per-point weights (0 = unusable); default all ones.
      init: float[4 4] initial transform; default identity.
      key: PRNG key for the hypotheses; default ``PRNGKey(0)``.
      image_size: (H, W); pixels outside the image get zero weight when given.
      config: :class:`FitConfig`.

    Returns:
      :class:`FrameFit` with ``pixels ~ project(K, transform @ points3d)`` on the inliers.
    """
    points3d, pixels, K = (jnp.asarray(shapes.as_array(a, n)) for a, n in
                           ((points3d, "points3d"), (pixels, "pixels"), (K, "K")))
    dims = shapes.check(points3d, "points3d", "N 3", dtype="float")
    shapes.check(pixels, "pixels", "N 2", dims, dtype="float")
    shapes.check(K, "K", "3 3", dtype="float")
    dtype = points3d.dtype
    if weights is None:
        w = jnp.ones(points3d.shape[:1], dtype)
    else:
        w = jnp.asarray(weights)
        shapes.check(w, "weights", "N", dims)
        w = w.astype(dtype)
    T0 = se3.identity(dtype=dtype) if init is None else jnp.asarray(init, dtype)
    shapes.check(T0, "init", "4 4", dtype="float")
    key = jax.random.PRNGKey(0) if key is None else key
    usable = usable_points(points3d, pixels, None, image_size, config.min_depth)
    usable = usable & (w > 0) & jnp.isfinite(w)
    X = sanitize_points(points3d, config.min_depth)
    uv = sanitize_pixels(pixels, usable)
    return fit_frame(X.T, uv.T, K.astype(dtype), jnp.where(usable, w, 0.0), T0, key, config)
