"""Planning problems from the toy world: a scripted episode cut at a start step, plus what the
success predicate needs to judge a planned motion of the task's block.

Each problem renders a scripted episode (``toy_tasks.sample_episode``) up to its start step:
the observation history the planner sees, the instruction embedded exactly as the toy clips
embed it (hash text, stored as float16 by ``build_clips``), and at the current frame the depth,
the task block's mask, the intrinsics and the camera pose, so a plan's tracks can be turned
into a rigid motion of the block (``flipjax.planning.actions.plan_to_actions``).
:func:`success_after` then applies that motion to the block and evaluates the task's own
predicate (``toy_tasks.is_success``) with every other block unmoved.

Episodes come from the seed stream ``toy_tasks.episode_rng(seed, "plan", index)``, which no training
or validation split uses (those are "train" and "val"), so a problem is never a training
episode of the same seed.

numpy only (no TensorFlow, no JAX).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipelines import text as text_lib
from data_pipelines.toy.tasks import Task, ToyEpisode, episode_rng, is_success, sample_episode
from data_pipelines.toy.world import (
    NUM_GRIPPER_PARTS,
    ToyConfig,
    camera_poses,
    pose_matrix,
    render,
    render_rgb_uint8,
)

SPLIT = "plan"
STARTS = ("contact", "begin")
FIRST_BLOCK = NUM_GRIPPER_PARTS + 1  # segmentation id / pose row of block 0


@dataclasses.dataclass(frozen=True)
class ToyProblems:
    """P planning problems cut from scripted toy episodes (see the module docstring).

    Attributes:
      history: uint8[P Th H W 3] frames t-Th+1..t of each episode (frame 0 repeated before
        the episode starts), t = the start step.
      text_tokens: float32[P Lt D] hash-text token states; text_mask: bool[P Lt].
      instructions: the P instructions.
      depth: float32[P H W] z-depth (metres) of the current frame.
      object_mask: bool[P H W] the task block's visible pixels in the current frame.
      K: float32[3 3] intrinsics; extrinsics: float32[4 4] world_from_camera.
      tasks: the P ``toy_tasks.Task``s.
      episodes: int64[P] episode indices in the "plan" split of ``seed``.
      start_steps: int64[P] the start step t of each problem.
      blocks_first: per problem float32[Nb 4] block poses (x, y, z_top, yaw) at step 0.
      blocks: per problem float32[Nb 4] block poses at the start step.
      blocks_final: per problem float32[Nb 4] block poses at the end of the script.
      halves: per problem float32[Nb] block half sizes (square footprints).
      scripted_success: bool[P] the episode's own success predicate.
      failures: per problem '' for a faithful script, else the deliberate failure mode.
      seed: the seed of the episode stream; config: the toy world's settings.
    """

    history: np.ndarray
    text_tokens: np.ndarray
    text_mask: np.ndarray
    instructions: list[str]
    depth: np.ndarray
    object_mask: np.ndarray
    K: np.ndarray
    extrinsics: np.ndarray
    tasks: list[Task]
    episodes: np.ndarray
    start_steps: np.ndarray
    blocks_first: list[np.ndarray]
    blocks: list[np.ndarray]
    blocks_final: list[np.ndarray]
    halves: list[np.ndarray]
    scripted_success: np.ndarray
    failures: list[str]
    seed: int
    config: ToyConfig

    def __len__(self) -> int:
        return len(self.tasks)


def contact_step(episode: ToyEpisode) -> int:
    """The last step before the task block starts moving in the script.

    When the task block never moves (a deliberately failed script that moves another block),
    the last step before any block moves; 0 when no block moves at all.
    """
    blocks = episode.poses[:, FIRST_BLOCK:]
    moved = np.any(np.abs(blocks - blocks[:1]) > 1e-7, axis=-1)  # T Nb
    for rows in (moved[:, episode.task.block], moved.any(axis=1)):
        if rows.any():
            return max(int(np.argmax(rows)) - 1, 0)
    return 0


def _start_step(episode: ToyEpisode, start: str | int) -> int:
    t_len = len(episode.poses)
    if isinstance(start, (int, np.integer)) and not isinstance(start, bool):
        if not 0 <= int(start) < t_len:
            raise ValueError(f"start={start} lies outside an episode of {t_len} steps")
        return int(start)
    if start == "contact":
        return contact_step(episode)
    if start == "begin":
        return 0
    raise ValueError(f"start must be one of {STARTS} or a step index, got {start!r}")


def make_problems(num: int, seed: int, *, image_size: int, history: int, text_dim: int,
                  text_max_tokens: int, start: str | int = "contact",
                  toy_config: ToyConfig | None = None) -> ToyProblems:
    """Renders ``num`` planning problems from the "plan" episodes of ``seed``.

    Args:
      num: P, problems (episode indices 0..P-1 of the "plan" split).
      seed: the toy world seed (the clips' ``config.seed``); problems use the split "plan",
        which no clip build renders.
      image_size: H = W of the frames (the models' input size).
      history: Th, observation frames up to and including the current one.
      text_dim: D of the hash text embedding (the models' language width).
      text_max_tokens: Lt (the clips' ``toy_text_max_tokens``).
      start: "contact" (the last step before the task block moves), "begin" (step 0) or a
        step index.
      toy_config: the world's settings (its ``image_size`` is replaced by ``image_size``).

    Returns:
      The :class:`ToyProblems`.

    Raises:
      ValueError: for a non-positive count, size, history or text setting, or a bad start.
    """
    for name, value in (("num", num), ("image_size", image_size), ("history", history),
                        ("text_dim", text_dim), ("text_max_tokens", text_max_tokens)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not (isinstance(start, (int, np.integer)) and not isinstance(start, bool)) \
            and start not in STARTS:
        raise ValueError(f"start must be one of {STARTS} or a step index, got {start!r}")
    cfg = dataclasses.replace(toy_config or ToyConfig(), image_size=int(image_size))
    encoder = text_lib.make_text_encoder("hash", dim=int(text_dim),
                                         max_tokens=int(text_max_tokens))
    fields: dict[str, list] = {k: [] for k in (
        "history", "depth", "object_mask", "tasks", "start_steps", "blocks_first", "blocks",
        "blocks_final", "halves", "scripted_success", "failures")}
    for i in range(int(num)):
        ep = sample_episode(episode_rng(int(seed), SPLIT, i), cfg)
        t = _start_step(ep, start)
        render = render_rgb_uint8(ep.scene)
        # Frames before step 0 repeat step 0, as the clip loader pads episode starts.
        steps = np.clip(np.arange(t - int(history) + 1, t + 1), 0, None)
        frames = {s: render(ep.poses[s]) for s in np.unique(steps)}
        fields["history"].append(np.stack([frames[s][0] for s in steps]))
        _, seg, depth = frames[t]
        fields["depth"].append(depth.astype(np.float32))
        fields["object_mask"].append(seg == FIRST_BLOCK + ep.task.block)
        fields["tasks"].append(ep.task)
        fields["start_steps"].append(t)
        fields["blocks_first"].append(ep.poses[0, FIRST_BLOCK:].copy())
        fields["blocks"].append(ep.poses[t, FIRST_BLOCK:].copy())
        fields["blocks_final"].append(ep.poses[-1, FIRST_BLOCK:].copy())
        fields["halves"].append(np.array([s.half[0] for s in ep.scene.surfaces[FIRST_BLOCK:]],
                                         np.float32))
        fields["scripted_success"].append(ep.success)
        fields["failures"].append(ep.failure)
    instructions = [task.instruction for task in fields["tasks"]]
    tokens, mask = encoder.encode(instructions)
    # build_clips stores the token table as float16; round the same way so the models see
    # exactly the features they were trained on.
    tokens = tokens.astype(np.float16).astype(np.float32)
    return ToyProblems(
        history=np.stack(fields["history"]), text_tokens=tokens, text_mask=mask,
        instructions=instructions, depth=np.stack(fields["depth"]),
        object_mask=np.stack(fields["object_mask"]), K=cfg.intrinsics,
        extrinsics=np.linalg.inv(cfg.camera_from_world).astype(np.float32),
        tasks=fields["tasks"], episodes=np.arange(int(num), dtype=np.int64),
        start_steps=np.asarray(fields["start_steps"], np.int64),
        blocks_first=fields["blocks_first"], blocks=fields["blocks"],
        blocks_final=fields["blocks_final"], halves=fields["halves"],
        scripted_success=np.asarray(fields["scripted_success"], bool),
        failures=fields["failures"], seed=int(seed), config=cfg)


def _check_index(problems: ToyProblems, i: int) -> int:
    if not 0 <= int(i) < len(problems):
        raise ValueError(f"problem index {i} out of range for {len(problems)} problems")
    return int(i)


def _check_motion(motion: np.ndarray, name: str = "block_motion_world") -> np.ndarray:
    m = np.asarray(motion, np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"{name}: expected float[4 4], got shape {list(m.shape)}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} has non-finite entries")
    return m


def moved_block(problems: ToyProblems, i: int, block_motion_world: np.ndarray) -> np.ndarray:
    """float32[4] the task block's pose (x, y, z_top, yaw) after a rigid world-frame motion.

    The block's reference point (the centre of its top face) is moved by the motion; its yaw
    turns by the motion's rotation about the world z axis.

    Args:
      problems: the problems.
      i: problem index.
      block_motion_world: float[4 4] motion M in the world frame (X_after = M X_before).

    Raises:
      ValueError: for a bad index or a motion that is not a finite 4x4 matrix.
    """
    i = _check_index(problems, i)
    m = _check_motion(block_motion_world)
    pose = problems.blocks[i][problems.tasks[i].block].astype(np.float64)
    centre = m[:3, :3] @ pose[:3] + m[:3, 3]
    turn = np.arctan2(m[1, 0], m[0, 0])
    return np.array([*centre, pose[3] + turn], np.float32)


def success_after(problems: ToyProblems, i: int, block_motion_world: np.ndarray) -> bool:
    """Whether the task of problem ``i`` succeeds when its block makes ``block_motion_world``.

    The task block's pose at the start step is moved (:func:`moved_block`); every other block
    stays where it is at the start step; ``toy_tasks.is_success`` judges the result against
    the block poses at the episode's step 0 (a "next to" task must have moved its block).

    Args:
      problems: the problems.
      i: problem index.
      block_motion_world: float[4 4] rigid motion in the world frame.

    Returns:
      The success predicate.
    """
    i = _check_index(problems, i)
    end = problems.blocks[i].copy()
    end[problems.tasks[i].block] = moved_block(problems, i, block_motion_world)
    return is_success(problems.tasks[i], problems.blocks_first[i], end, problems.halves[i])


def scripted_motion(problems: ToyProblems, i: int) -> np.ndarray:
    """float32[4 4] the script's own world-frame motion of the task block, start step -> end.

    ``success_after(problems, i, scripted_motion(problems, i))`` reproduces the episode's
    success (up to the other blocks, which the scripts never move).
    """
    i = _check_index(problems, i)
    k = problems.tasks[i].block
    before = pose_matrix(*problems.blocks[i][k]).astype(np.float64)
    after = pose_matrix(*problems.blocks_final[i][k]).astype(np.float64)
    return (after @ np.linalg.inv(before)).astype(np.float32)


def scripted_tracks(problems: ToyProblems, i: int, queries: np.ndarray, horizon: int,
                    chunks: int, follow: bool = False) -> np.ndarray:
    """The script's own tracks of ``queries``, laid out as a plan's flows (an oracle plan).

    Chunk h starts at step ``start + h * (horizon - 1)`` of the episode, where the queries start
    afresh (as the planner restarts its queries at every planning step) or, with ``follow``,
    where the previous chunk's tracks ended, clipped to the frame (the planner's
    ``follow_queries``); the tracks are exact (``ground_truth_tracks.track_ground_truth``),
    and frames past the episode's end repeat its last frame.

    Args:
      problems: the problems.
      i: problem index.
      queries: float[N 2] pixel (u, v) query points.
      horizon: L, steps per chunk including its first frame.
      chunks: H, planning steps.
      follow: chain each chunk's queries from the previous chunk's ends.

    Returns:
      float32[H L N 2], comparable with ``Plan.flows[p, b]``.

    Raises:
      ValueError: for a bad index, queries that are not [N 2], or non-positive sizes.
    """
    from data_pipelines.tracks.ground_truth import track_ground_truth

    i, q = _check_index(problems, i), _check_queries(queries)
    if int(horizon) < 2 or int(chunks) < 1:
        raise ValueError(f"horizon must be >= 2 and chunks >= 1, got {horizon}, {chunks}")
    if follow:
        out = []
        for h in range(int(chunks)):
            out.append(chunk_tracks(problems, i, q, horizon, h))
            q = np.clip(out[-1][-1], 0.0, float(problems.config.image_size - 1))
        return np.stack(out)
    step = int(horizon) - 1
    depth, seg, poses = _script_views(problems, i, 0, chunks * step + 1)
    tracks, _ = track_ground_truth(depth, seg, poses, problems.K, q, int(horizon))
    return tracks[::step][:chunks].transpose(0, 2, 1, 3).astype(np.float32)


def _check_queries(queries: np.ndarray) -> np.ndarray:
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[-1] != 2:
        raise ValueError(f"queries: expected float[N 2], got shape {list(q.shape)}")
    return q


def _script_views(problems: ToyProblems, i: int, offset: int, count: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth, segmentation, object poses) of steps start + offset + [0, count) of problem
    ``i``'s episode, steps past its end repeating its last."""
    ep = sample_episode(episode_rng(problems.seed, SPLIT, int(problems.episodes[i])),
                        problems.config)
    first = int(problems.start_steps[i]) + int(offset)
    frames = np.minimum(first + np.arange(int(count)), len(ep.poses) - 1)
    views = [render(ep.scene, ep.poses[t], 1) for t in frames]
    poses = np.stack([camera_poses(problems.config, ep.poses[t]) for t in frames])
    return np.stack([v[2] for v in views]), np.stack([v[1] for v in views]), poses


def chunk_tracks(problems: ToyProblems, i: int, queries: np.ndarray, horizon: int,
                 chunk: int) -> np.ndarray:
    """The script's own tracks of ``queries`` over planning step ``chunk`` alone.

    The chunk starts at step ``start + chunk * (horizon - 1)`` of problem ``i``'s episode;
    frames past the episode's end repeat its last frame (as :func:`scripted_tracks`).

    Args:
      problems: the problems.
      i: problem index.
      queries: float[N 2] pixel (u, v) points in the chunk's first frame.
      horizon: L, steps per chunk including its first frame.
      chunk: h >= 0.

    Returns:
      float32[L N 2].

    Raises:
      ValueError: for a bad index, queries that are not [N 2], or bad sizes.
    """
    from data_pipelines.tracks.ground_truth import track_ground_truth

    i, q = _check_index(problems, i), _check_queries(queries)
    if int(horizon) < 2 or int(chunk) < 0:
        raise ValueError(f"horizon must be >= 2 and chunk >= 0, got {horizon}, {chunk}")
    depth, seg, poses = _script_views(problems, i, int(chunk) * (int(horizon) - 1),
                                      int(horizon))
    tracks, _ = track_ground_truth(depth, seg, poses, problems.K, q, int(horizon))
    return tracks[0].transpose(1, 0, 2).astype(np.float32)


def future_frames(problems: ToyProblems, frames: int,
                  rows: Sequence[int] | None = None) -> np.ndarray:
    """The script's own next ``frames`` frames after each problem's start step.

    With :func:`scripted_tracks` (one chunk of ``frames + 1`` steps) this is what a dynamics
    model conditioned on the true flow should generate.

    Args:
      problems: the problems.
      frames: F >= 1.
      rows: the problem indices to render (None: all P).

    Returns:
      uint8[R F H W 3] frames start+1..start+F of each row (frames past the episode's end
      repeat its last).

    Raises:
      ValueError: for ``frames`` < 1.
    """
    if int(frames) < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    clips = []
    for i in range(len(problems)) if rows is None else rows:
        i = _check_index(problems, int(i))
        ep = sample_episode(episode_rng(problems.seed, SPLIT, int(problems.episodes[i])),
                            problems.config)
        render_frame = render_rgb_uint8(ep.scene)
        t0, last = int(problems.start_steps[i]), len(ep.poses) - 1
        clips.append(np.stack([render_frame(ep.poses[min(t0 + k, last)])[0]
                               for k in range(1, int(frames) + 1)]))
    return np.stack(clips)


def ending_clips(problems: ToyProblems, frames: int, failed: bool = False) -> np.ndarray:
    """The last ``frames`` frames of every problem's script, or of a failed script.

    ``failed=True`` replays each problem's episode with ``failure_fraction=1``: the same scene,
    instruction and start, with the script deliberately failing (wrong block, opposite target
    or too short a motion, ``toy_tasks.FAILURES``). A value model that reads the instruction
    should score the faithful ending above the failed one.

    Args:
      problems: the problems.
      frames: Tv, frames per clip.
      failed: render the failed scripts.

    Returns:
      uint8[P Tv H W 3] (frames before step 0 repeat step 0).

    Raises:
      ValueError: for ``frames`` < 1.
    """
    if int(frames) < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    cfg = dataclasses.replace(problems.config, failure_fraction=1.0) if failed \
        else problems.config
    clips = []
    for i in range(len(problems)):
        ep = sample_episode(episode_rng(problems.seed, SPLIT, int(problems.episodes[i])), cfg)
        render_frame = render_rgb_uint8(ep.scene)
        end = len(ep.poses) - 1
        clips.append(np.stack([render_frame(ep.poses[max(t, 0)])[0]
                               for t in range(end - int(frames) + 1, end + 1)]))
    return np.stack(clips)


def camera_to_world_motion(problems: ToyProblems, motion_camera: np.ndarray) -> np.ndarray:
    """float[... 4 4]: a motion in the camera frame (X_t = T X_0) as a world-frame motion,
    ``world_from_camera @ T @ camera_from_world``.

    Raises:
      ValueError: for a motion that is not [... 4 4].
    """
    t = np.asarray(motion_camera, np.float64)
    if t.ndim < 2 or t.shape[-2:] != (4, 4):
        raise ValueError(f"motion_camera: expected float[... 4 4], got shape {list(t.shape)}")
    w = problems.extrinsics.astype(np.float64)
    return w @ t @ np.linalg.inv(w)


__all__ = ["SPLIT", "STARTS", "ToyProblems", "camera_to_world_motion", "contact_step",
           "ending_clips", "make_problems", "moved_block", "scripted_motion", "scripted_tracks",
           "success_after"]
