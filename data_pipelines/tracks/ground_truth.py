"""Exact point tracks from depth, segmentation and per-object poses (simulators, toy world).

Same window layout as ``tracking`` (tracks float32[T N L 2], visible bool[T N L]); where a point
is occluded or leaves the image its true projection is kept and ``visible`` is False.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from data_pipelines.tracks.trackers import (
    MIN_DEPTH,
    _check_queries,
    _in_image,
    _nearest_pixel,
    _positive_int,
)

# --------------------------------------------------------------------------------------------
# Ground truth from depth, segmentation and object poses
# --------------------------------------------------------------------------------------------


def track_ground_truth(
    depth: ArrayLike,
    segmentation: ArrayLike,
    object_poses: ArrayLike,
    K: ArrayLike,
    queries: ArrayLike,
    horizon: int,
    *,
    depth_tolerance: float = 0.02,
    depth_rel_tolerance: float = 0.01,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Exact tracks of rigid objects from depth, segmentation and per-object poses.

    A query at frame t takes the object id and depth of its nearest pixel, is unprojected
    (at its exact sub-pixel position) into the camera, moved into the object's frame with the
    object's pose at t, and for every step k moved back with the pose at frame
    min(t + k, T - 1) and projected. A static camera and background is a constant pose; a
    moving camera shows as the background's pose changing.

    Positions are the true projections even where the point is occluded or outside the
    image (a point behind the camera keeps its last projection in front of it). A point is
    visible where it projects inside the image, in front of the camera, onto a pixel of the
    same object, whose depth agrees with the point's within ``depth_tolerance +
    depth_rel_tolerance * z`` (the relative term absorbs nearest-pixel sampling on slanted
    surfaces, whose error grows with distance). A query on no object (id < 0 or >= K), with
    invalid depth, or outside the image cannot be tracked: it stays at the query, visible only
    at step 0 and only when inside the image.

    Args:
      depth: float[T H W] metric z-depth per pixel (non-finite or <= 0: no depth).
      segmentation: int[T H W] object id per pixel, indexing the K axis of ``object_poses``.
      object_poses: float[T K 4 4] camera_from_object transform of each object at each frame.
      K: float[3 3] pinhole intrinsics with last row (0, 0, 1), shared by all frames.
      queries: float[N 2] pixel (u, v) queries used at every start frame, or float[T N 2].
      horizon: L, frames per window including the start frame.
      depth_tolerance: absolute depth agreement for visibility, metres.
      depth_rel_tolerance: relative depth agreement added to ``depth_tolerance``.

    Returns:
      tracks float32[T N L 2] and visible bool[T N L] (see the module docstring).
    """
    depth = np.asarray(depth)
    if depth.ndim != 3 or not np.issubdtype(depth.dtype, np.floating) or 0 in depth.shape:
        raise ValueError(
            f"depth: expected non-empty float[T H W], got shape {list(depth.shape)} "
            f"dtype {depth.dtype}"
        )
    num_frames, height, width = depth.shape
    seg = np.asarray(segmentation)
    if seg.shape != depth.shape or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(
            f"segmentation: expected int[T H W] = {list(depth.shape)} like depth, got shape "
            f"{list(seg.shape)} dtype {seg.dtype}"
        )
    poses = np.asarray(object_poses)
    if (
        poses.ndim != 4
        or poses.shape[0] != num_frames
        or poses.shape[1] < 1
        or poses.shape[2:] != (4, 4)
    ):
        raise ValueError(
            f"object_poses: expected float[T K 4 4] with T={num_frames}, got shape "
            f"{list(poses.shape)}"
        )
    poses = poses.astype(np.float64)
    if not np.all(np.isfinite(poses)):
        raise ValueError("object_poses: contains non-finite values")
    num_objects = poses.shape[1]
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or not np.allclose(K[2], [0, 0, 1]):
        raise ValueError(
            f"K: expected finite float[3 3] with last row (0, 0, 1), got shape {list(K.shape)}"
        )
    if K[0, 0] == 0 or K[1, 1] == 0:
        raise ValueError(f"K: focal lengths must be non-zero, got fx={K[0, 0]} fy={K[1, 1]}")
    q = _check_queries(queries, num_frames)
    horizon = _positive_int(horizon, "horizon")
    if not (depth_tolerance >= 0 and depth_rel_tolerance >= 0):
        raise ValueError(
            f"depth_tolerance / depth_rel_tolerance: expected >= 0, got {depth_tolerance} / "
            f"{depth_rel_tolerance}"
        )

    try:
        object_from_camera = np.linalg.inv(poses)  # [T K 4 4]
    except np.linalg.LinAlgError as e:
        raise ValueError("object_poses: contains a singular transform") from e
    K_inv = np.linalg.inv(K)
    steps = np.arange(horizon)
    num_points = q.shape[1]
    tracks = np.empty((num_frames, num_points, horizon, 2), np.float32)
    visible = np.empty((num_frames, num_points, horizon), bool)

    for t in range(num_frames):
        frame_of_step = np.minimum(t + steps, num_frames - 1)  # [L], padding repeats the end
        query = q[t].astype(np.float64)  # [N 2]
        inside_query = _in_image(query, height, width)
        rows, cols = _nearest_pixel(query, height, width)
        obj = seg[t, rows, cols].astype(np.int64)
        d = depth[t, rows, cols].astype(np.float64)
        trackable = (
            inside_query & (obj >= 0) & (obj < num_objects) & np.isfinite(d) & (d > MIN_DEPTH)
        )
        obj = np.where(trackable, obj, 0)
        d = np.where(trackable, d, 1.0)

        rays = np.concatenate([query, np.ones((num_points, 1))], axis=-1) @ K_inv.T  # [N 3]
        in_camera = rays * d[:, None]
        to_object = object_from_camera[t, obj]  # [N 4 4]
        in_object = np.einsum("nij,nj->ni", to_object[:, :3, :3], in_camera) + to_object[:, :3, 3]
        to_camera = poses[frame_of_step[:, None], obj[None, :]]  # [L N 4 4]
        points = (
            np.einsum("lnij,nj->lni", to_camera[..., :3, :3], in_object) + to_camera[..., :3, 3]
        )  # [L N 3]
        z = points[..., 2]
        in_front = z > MIN_DEPTH
        uv = (points @ K[:2].T) / np.where(in_front, z, 1.0)[..., None]  # [L N 2]

        inside = in_front & _in_image(uv, height, width)
        pix_rows, pix_cols = _nearest_pixel(uv, height, width)
        seen_obj = seg[frame_of_step[:, None], pix_rows, pix_cols]
        seen_depth = depth[frame_of_step[:, None], pix_rows, pix_cols].astype(np.float64)
        vis = (
            trackable[None]
            & inside
            & (seen_obj == obj[None])
            & (np.abs(seen_depth - z) <= depth_tolerance + depth_rel_tolerance * z)
        )

        # Hold the last usable position where the point is behind the camera or untrackable.
        usable = in_front & trackable[None]
        usable[0] = True
        uv[0] = query
        last_usable = np.maximum.accumulate(np.where(usable, steps[:, None], 0), axis=0)
        uv = uv[last_usable, np.arange(num_points)[None, :]]
        vis[0] = inside_query

        tracks[t] = uv.transpose(1, 0, 2)
        visible[t] = vis.T
    tracks[:, :, 0] = q  # exactly the queries, free of float64 round trips
    return tracks, visible
