"""The learnability ladder of the action module: flow problems whose answer is obvious.

Each rung is a family of tiny scenes (square blocks on a plain table) with one faithful
motion, and every rung adds one thing the model must read. A model that cannot fit a rung
cannot be trusted on the next one, so :mod:`benchmarks.cvae_ladder` trains and scores them in
order beside their trivial baselines:

  one_object      one block, always moving right: find the block (localisation only).
  text_direction  one block, its direction (of four) given by the instruction (language).
  free_direction  one block, its direction drawn at random and shown nowhere: four equally
                  likely motions per scene, so only the latent can carry the answer.
  two_objects     two blocks of different colours; the instruction names the block and the
                  direction, and only that block moves (grounding).

History frames are the block(s) at rest, so no rung can copy past motion. Text is one token
of one-hot features (colour, direction), standing in for a sentence embedding.

Shapes (einops): B examples, T history frames, H W image, N query points, L points per
trajectory (the query point and L-1 steps), Dl text width.
"""

from __future__ import annotations

import numpy as np

RUNGS = ("one_object", "text_direction", "free_direction", "two_objects")
COLOURS = np.array([[0.9, 0.2, 0.15], [0.15, 0.7, 0.2], [0.2, 0.3, 0.9], [0.95, 0.85, 0.15]],
                   np.float32)
# (du, dv) per direction: right, left, down, up in image coordinates.
DIRECTIONS = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.float32)
TABLE = np.float32(0.5)
TEXT_DIM = 8  # 4 colour + 4 direction one-hot features


def make_batch(rung: str, rng: np.random.Generator, batch: int, *, image_size: int = 32,
               history: int = 2, flow_horizon: int = 4, num_points: int = 32,
               block: int = 10, step: float = 2.0, moving_fraction: float = 0.5
               ) -> dict[str, np.ndarray]:
    """A batch of one rung's scenes with ground-truth flows.

    Args:
      rung: one of :data:`RUNGS`.
      rng: numpy generator (the only source of randomness).
      batch: B.
      image_size: H = W in pixels.
      history: T frames (identical: the blocks are at rest).
      flow_horizon: L.
      num_points: N query points per scene.
      block: block side in pixels.
      step: pixels per step of the moving block.
      moving_fraction: share of the query points drawn on the moving block (the rest
        uniformly over the frame, so some land on it too).

    Returns:
      dict with history float32[B T H W 3] in [-1, 1], flow float32[B N L 2] (u, v pixels),
      future float32[B L-1 H W 3] the frames after each step (for the dynamics model; the
      block moves by whole pixels), text float32[B 1 Dl], text_mask bool[B 1], direction
      int32[B] (the faithful one).

    Raises:
      ValueError: an unknown rung or a block that cannot travel inside the frame.
    """
    if rung not in RUNGS:
        raise ValueError(f"unknown rung {rung!r}; expected one of {RUNGS}")
    travel = step * (flow_horizon - 1)
    free = image_size - block - 2 * travel
    if free < 1:
        raise ValueError(f"a {block} px block moving {travel:g} px does not fit in "
                         f"{image_size} px frames")
    hist = np.empty((batch, history, image_size, image_size, 3), np.float32)
    flow = np.empty((batch, num_points, flow_horizon, 2), np.float32)
    text = np.zeros((batch, 1, TEXT_DIM), np.float32)
    directions = np.zeros(batch, np.int32)
    future = np.empty((batch, flow_horizon - 1, image_size, image_size, 3), np.float32)
    ys, xs = np.mgrid[0:image_size, 0:image_size]

    def render(corners: list[tuple[int, int]], colours: np.ndarray) -> np.ndarray:
        frame = np.full((image_size, image_size, 3), TABLE, np.float32)
        for (u0, v0), colour in zip(corners, colours, strict=True):
            inside = (xs >= u0) & (xs < u0 + block) & (ys >= v0) & (ys < v0 + block)
            frame[inside] = COLOURS[colour]
        return frame * 2.0 - 1.0

    for b in range(batch):
        n_blocks = 2 if rung == "two_objects" else 1
        colours = rng.choice(len(COLOURS), n_blocks, replace=False)
        direction = 0 if rung == "one_object" else int(rng.integers(len(DIRECTIONS)))
        corners = _place(rng, n_blocks, block, travel * DIRECTIONS[direction], image_size)
        directions[b] = direction
        hist[b] = render(corners, colours)
        for k in range(1, flow_horizon):
            du, dv = np.rint(k * step * DIRECTIONS[direction]).astype(int)
            future[b, k - 1] = render([(corners[0][0] + du, corners[0][1] + dv), *corners[1:]],
                                      colours)
        if rung in ("text_direction", "two_objects"):
            text[b, 0, 4 + direction] = 1.0
        if rung == "two_objects":
            text[b, 0, colours[0]] = 1.0
        # Block 0 moves; query points: a share on it, the rest anywhere.
        u0, v0 = corners[0]
        n_on = round(moving_fraction * num_points)
        on = rng.uniform(0, block - 1, (n_on, 2)) + np.array([u0, v0])
        anywhere = rng.uniform(0, image_size - 1, (num_points - n_on, 2))
        q = np.concatenate([on, anywhere]).astype(np.float32)
        # Pixel centres at integers: the block covers [u0 - 0.5, u0 + block - 0.5).
        moves = ((q[:, 0] >= u0 - 0.5) & (q[:, 0] < u0 + block - 0.5)
                 & (q[:, 1] >= v0 - 0.5) & (q[:, 1] < v0 + block - 0.5))
        steps = np.arange(flow_horizon, dtype=np.float32)[:, None] * step
        flow[b] = q[:, None] + moves[:, None, None] * steps * DIRECTIONS[direction]
    return {"history": hist, "flow": flow, "text": text, "future": future,
            "text_mask": np.ones((batch, 1), bool), "direction": directions}


def _place(rng: np.random.Generator, n: int, block: int, travel: np.ndarray, size: int
           ) -> list[tuple[int, int]]:
    """Top-left corners of n blocks: the first travels by ``travel`` (du, dv) and stays inside;
    the others stay clear of the whole region it sweeps, so nothing is ever covered."""
    margin = int(np.ceil(np.abs(travel).max()))
    lo, hi = margin, size - block - margin
    first = tuple(int(x) for x in rng.integers(lo, hi + 1, 2))
    du, dv = travel
    # The swept box of the moving block, one pixel wider on every side.
    swept = (first[0] + min(du, 0) - 1, first[1] + min(dv, 0) - 1,
             first[0] + block + max(du, 0) + 1, first[1] + block + max(dv, 0) + 1)
    corners = [first]
    for _ in range(10_000):
        if len(corners) == n:
            return corners
        c = tuple(int(x) for x in rng.integers(0, size - block + 1, 2))
        clear_swept = (c[0] + block <= swept[0] or c[0] >= swept[2]
                       or c[1] + block <= swept[1] or c[1] >= swept[3])
        clear_rest = all(c[0] + block <= o[0] or c[0] >= o[0] + block
                         or c[1] + block <= o[1] or c[1] >= o[1] + block for o in corners[1:])
        if clear_swept and clear_rest:
            corners.append(c)
    raise ValueError(f"cannot place {n} blocks of {block} px in {size} px frames")
