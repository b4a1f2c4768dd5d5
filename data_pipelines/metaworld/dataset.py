"""Meta-World expert demonstrations as an RLDS dataset with exact geometry (extra ``sim``).

    python -m data_pipelines.metaworld --out=DIR --tasks=door-open,button-press \
        --cameras=corner,corner2,corner3 --seeds=0-4 --val_seeds=5 --workers=2 \
        [--image_size=128 --supersample=1 --max_steps=500 --extra_steps=10 --num_points=64]

renders one scripted-expert rollout per (task, seed), every camera in the same rollout, into a
cache ``DIR/metaworld_cache/<task>/<seed>.npz`` (parallel workers; finished rollouts are kept,
so an interrupted build resumes), then writes ``DIR/metaworld/1.0.0`` (splits ``train`` from
``--seeds`` and ``val`` from ``--val_seeds``; one RLDS episode per (task, camera, seed); read it
with ``--schema=metaworld`` in ``build_clips``).

Per step: RGB, metric z-depth, body segmentation (ids index ``object_poses``), the target
object's mask, camera_from_body of every body, the observation and the action, and the exact
tracks of points sampled at step 0 on the target object and on the gripper. Per episode:
intrinsics, extrinsics, task, camera, seed, target body and success. Conventions of cameras and
frames: ``data_pipelines/metaworld/sim.py``.

TensorFlow and Mesa's offscreen OpenGL (EGL/llvmpipe, the CPU renderer) cannot share a
process: both carry LLVM, and loading the second runs the first's static initialisers into a
segfault, whichever comes first. So :func:`build` renders only in spawned worker processes
and writes the RLDS dataset (TensorFlow) in the calling one; :func:`render_demo` refuses to run
where TensorFlow is loaded, and the RLDS writer refuses to start where Mesa's LLVM is.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.metaworld import sim
from data_pipelines.metaworld.demos import (
    DEPTH_REL_TOLERANCE,
    DEPTH_TOLERANCE,
    META_KEYS,
    STEP_KEYS,
    check_options,
    library_loaded,
    render_demo,
)
from data_pipelines.rlds_writer import step_features, write_rlds
from flipjax.settings_record import describe_changes, record_or_check

NAME, VERSION = "metaworld", "1.0.0"
CACHE_DIR = "metaworld_cache"
SETTINGS_FILE = "settings.json"
CACHE_FORMAT = 1  # bump when the cache layout or the rendering changes


# --------------------------------------------------------------------------------------------
# Rollout cache
# --------------------------------------------------------------------------------------------


def cache_settings(cameras: Sequence[str], *, image_size: int = 128, supersample: int = 1,
                   max_steps: int = 500, extra_steps: int = 10, num_points: int = 64
                   ) -> dict[str, Any]:
    """Everything that determines a cached rollout (a cache is only reused when it matches).

    Args:
      cameras, image_size, supersample, max_steps, extra_steps, num_points: as
        :func:`render_demo` takes them.

    Returns:
      A JSON-able dict, including the simulator versions.
    """
    from importlib.metadata import version

    return {"format": CACHE_FORMAT, "cameras": list(cameras), "image_size": image_size,
            "supersample": supersample, "max_steps": max_steps, "extra_steps": extra_steps,
            "num_points": num_points, "depth_tolerance": DEPTH_TOLERANCE,
            "depth_rel_tolerance": DEPTH_REL_TOLERANCE,
            "metaworld": version("metaworld"), "mujoco": version("mujoco")}


def _save_demo(path: str | Path, demo: dict[str, dict[str, Any]], settings: dict[str, Any]
               ) -> None:
    """Writes a rollout (from :func:`render_demo`) to ``path`` atomically (tmp + rename)."""
    path = Path(path)
    arrays = {f"{c}/{k}": np.asarray(v) for c, ep in demo.items() for k, v in ep.items()}
    arrays["settings"] = np.asarray(json.dumps(settings, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def load_demo(path: str | Path, settings: dict[str, Any] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Reads a cached rollout (``build`` writes them, see :func:`cache_path`).

    Args:
      path: the ``.npz`` file.
      settings: when given, the file must have been rendered with exactly these settings.

    Returns:
      camera -> episode, as :func:`render_demo` returns it (scalars as Python values).
    """
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cached rollout {path} is unreadable ({e}); delete it to re-render") \
            from e
    if "settings" not in arrays:
        raise ValueError(f"cached rollout {path} has no settings; delete it to re-render")
    have = json.loads(str(arrays.pop("settings")))
    if settings is not None and have != settings:
        raise ValueError(f"cached rollout {path} was rendered with other settings "
                         f"({describe_changes(have, settings, recorded_as='cached')})")
    demo: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        camera, name = key.split("/", 1)
        demo.setdefault(camera, {})[name] = value.item() if value.ndim == 0 else value
    for camera, ep in demo.items():
        missing = set(STEP_KEYS + META_KEYS) - set(ep)
        if missing:
            raise ValueError(f"cached rollout {path} lacks {sorted(missing)} of camera {camera}")
    return {c: demo[c] for c in have["cameras"]}


def _render_job(job: tuple[str, int, str, dict[str, Any]]) -> tuple[str, int, bool]:
    """Pool worker: renders one (task, seed) rollout into its cache file."""
    task, seed, path, settings = job
    demo = render_demo(task, seed, settings["cameras"], image_size=settings["image_size"],
                       supersample=settings["supersample"], max_steps=settings["max_steps"],
                       extra_steps=settings["extra_steps"], num_points=settings["num_points"])
    _save_demo(path, demo, settings)
    return task, seed, bool(next(iter(demo.values()))["success"])


# --------------------------------------------------------------------------------------------
# RLDS
# --------------------------------------------------------------------------------------------


def features(image_size: int, num_points: int) -> Any:
    """The tfds FeaturesDict of the Meta-World demos (RLDS layout).

    Args:
      image_size: stored frame size.
      num_points: N tracked points per part.

    Returns:
      The FeaturesDict; the number of bodies differs per task, so ``object_poses`` is
      float32[None 4 4].
    """
    import tensorflow_datasets as tfds

    f = tfds.features
    n, p = image_size, num_points
    zlib = lambda shape, dtype: f.Tensor(shape=shape, dtype=dtype, encoding="zlib")
    return f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict({
                "image": f.Image(shape=(n, n, 3), encoding_format="png"),
                "depth": zlib((n, n), np.float32),
                "segmentation": zlib((n, n), np.uint8),
                "object_mask": zlib((n, n), np.bool_),
                "object_poses": zlib((None, 4, 4), np.float32),
                "state": f.Tensor(shape=(39,), dtype=np.float32),
                "object_tracks": f.Tensor(shape=(p, 2), dtype=np.float32),
                "object_visible": f.Tensor(shape=(p,), dtype=np.bool_),
                "gripper_tracks": f.Tensor(shape=(p, 2), dtype=np.float32),
                "gripper_visible": f.Tensor(shape=(p,), dtype=np.bool_),
            }),
            **step_features(4),
        }),
        "episode_metadata": f.FeaturesDict({
            "episode_id": f.Scalar(dtype=np.int64),
            "task": f.Text(),
            "camera": f.Text(),
            "seed": f.Scalar(dtype=np.int64),
            "intrinsics": f.Tensor(shape=(3, 3), dtype=np.float32),
            "world_from_camera": f.Tensor(shape=(4, 4), dtype=np.float32),
            "target_body": f.Scalar(dtype=np.int32),
            "success": f.Scalar(dtype=np.bool_),
            "num_steps": f.Scalar(dtype=np.int32),
            "object_point_bodies": f.Tensor(shape=(p,), dtype=np.int32),
            "gripper_point_bodies": f.Tensor(shape=(p,), dtype=np.int32),
        }),
    })


def _png(rgb: np.ndarray) -> io.BytesIO:
    # OpenCV encodes PNG much faster than the TensorFlow op tfds would run on an array.
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {list(rgb.shape)}")
    return io.BytesIO(buf.tobytes())


def to_rlds(episode: dict[str, Any], episode_id: int) -> dict[str, Any]:
    """One camera's episode (from :func:`render_demo`) as an RLDS episode dict.

    Args:
      episode: one camera's value of :func:`render_demo`'s result.
      episode_id: stored as ``episode_metadata/episode_id``.

    Returns:
      Nested dict matching :func:`features`, PNG-encoded frames. ``is_terminal`` marks the
      last step of a successful episode only: a rollout cut at ``max_steps`` is truncated.
    """
    missing = set(STEP_KEYS + META_KEYS) - set(episode)
    if missing:
        raise ValueError(f"episode lacks keys {sorted(missing)}")
    t_len = int(episode["num_steps"])
    if len(episode["image"]) != t_len:
        raise ValueError(f"episode: image has {len(episode['image'])} steps, num_steps says "
                         f"{t_len}")
    obs_keys = ("depth", "segmentation", "object_mask", "object_poses", "state",
                "object_tracks", "object_visible", "gripper_tracks", "gripper_visible")
    steps = []
    for t in range(t_len):
        last = t == t_len - 1
        obs = {k: episode[k][t] for k in obs_keys}
        obs["image"] = _png(episode["image"][t])
        steps.append({"observation": obs, "action": episode["action"][t],
                      "language_instruction": str(episode["instruction"]),
                      "reward": float(episode["reward"][t]), "discount": 1.0,
                      "is_first": t == 0, "is_last": last,
                      "is_terminal": last and bool(episode["success"])})
    meta = {k: episode[k] for k in ("task", "camera", "seed", "intrinsics", "world_from_camera",
                                    "target_body", "success", "num_steps",
                                    "object_point_bodies", "gripper_point_bodies")}
    meta["task"], meta["camera"] = str(meta["task"]), str(meta["camera"])
    meta["episode_id"] = int(episode_id)
    return {"steps": steps, "episode_metadata": meta}


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def cache_path(out: str | Path, task: str, seed: int) -> Path:
    """Cache file of the (task, seed) rollout under the build root ``out``."""
    return Path(out) / CACHE_DIR / task / f"{int(seed)}.npz"


def _check_cache_settings(root: Path, settings: dict[str, Any]) -> None:
    """Refuses a cache rendered with other settings; records them for a fresh cache."""
    record_or_check(root / SETTINGS_FILE, settings,
                    refusal=f"the rollout cache {root} was rendered with other settings",
                    remedy="use another --out or delete the cache to re-render",
                    recorded_as="cached")


def _episodes(out: Path, tasks: Sequence[str], seeds: Sequence[int], cameras: Sequence[str],
              settings: dict[str, Any], desc: str, progress: bool) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks) * len(seeds) * len(cameras), desc=desc, unit="ep",
               disable=not progress)
    index = 0
    for task in tasks:
        for seed in seeds:
            demo = load_demo(cache_path(out, task, seed), settings)
            for camera in cameras:
                yield to_rlds(demo[camera], index)
                index += 1
                bar.update()
    bar.close()


def build(out: str | Path, tasks: Sequence[str], cameras: Sequence[str], seeds: Sequence[int],
          val_seeds: Sequence[int] = (), *, workers: int = 1, image_size: int = 128,
          supersample: int = 1, max_steps: int = 500, extra_steps: int = 10,
          num_points: int = 64, file_format: str = "tfrecord", progress: bool = True) -> Path:
    """Renders the expert demos (cached, resumable, in parallel) and writes the RLDS dataset.

    Args:
      out: root directory: rollouts are cached in ``out/metaworld_cache/<task>/<seed>.npz``
        and the dataset lands in ``out/metaworld/1.0.0``.
      tasks: names from ``data_pipelines.metaworld.sim.TASKS``.
      cameras: names from ``data_pipelines.metaworld.sim.CAMERAS`` (all rendered in each rollout).
      seeds: environment seeds of the ``train`` split.
      val_seeds: seeds of the ``val`` split (none: no ``val`` split); disjoint from ``seeds``.
      workers: rendering processes (spawned, even one: see the module doc).
      image_size, supersample, max_steps, extra_steps, num_points: see :func:`render_demo`.
      file_format: ``tfrecord`` or ``array_record``.
      progress: show progress bars.

    Returns:
      The dataset directory.

    Raises:
      ValueError: on bad arguments, or when the cache under ``out`` was rendered with other
        settings (they are recorded in ``out/metaworld_cache/settings.json``).
    """
    from tqdm import tqdm

    tasks = [sim.check_task(t) for t in tasks]
    cameras = check_options(cameras, image_size, supersample, max_steps, extra_steps,
                             num_points)
    seeds, val_seeds = [int(s) for s in seeds], [int(s) for s in val_seeds]
    if not tasks or not seeds or workers < 1:
        raise ValueError(f"need at least one task, seed and worker, got tasks {tasks}, seeds "
                         f"{seeds}, workers {workers}")
    if len(set(tasks)) != len(tasks) or len({*seeds, *val_seeds}) != len(seeds) + len(val_seeds):
        raise ValueError(f"tasks and seeds must be distinct, and no seed both in the train and "
                         f"the val split: tasks {tasks}, seeds {seeds}, val_seeds {val_seeds}")
    out = Path(out)
    settings = cache_settings(cameras, image_size=image_size, supersample=supersample,
                              max_steps=max_steps, extra_steps=extra_steps,
                              num_points=num_points)
    _check_cache_settings(out / CACHE_DIR, settings)
    for stale in (out / CACHE_DIR).glob("*/*.npz.tmp*"):  # left by an interrupted build
        stale.unlink(missing_ok=True)

    wanted = [(t, s) for t in tasks for s in [*seeds, *val_seeds]]
    todo = [(t, s, str(cache_path(out, t, s)), settings) for t, s in wanted
            if not cache_path(out, t, s).exists()]
    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc="metaworld rollouts",
               unit="rollout", disable=not progress)
    failed = []
    if todo:
        # Always in fresh processes, even with one worker: see the module doc (LLVM clash).
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(todo)))
        try:
            for task, seed, success in pool.imap_unordered(_render_job, todo):
                if not success:
                    failed.append(f"{task}/{seed}")
                bar.set_postfix_str(f"last {task}/{seed}")
                bar.update()
        finally:
            pool.terminate()
            pool.join()
    bar.close()
    if failed:
        print(f"metaworld: no success within {max_steps} steps in {failed} (kept, marked "
              "success=False)")

    if library_loaded("libLLVM") and not library_loaded("libtensorflow_framework"):
        raise RuntimeError("build: this process has rendered with Mesa's OpenGL, and loading "
                           "TensorFlow to write the RLDS dataset would segfault (their LLVM "
                           "copies clash); call build() from a process that has not rendered")
    splits = {"train": lambda: _episodes(out, tasks, seeds, cameras, settings, "train",
                                         progress)}
    if val_seeds:
        splits["val"] = lambda: _episodes(out, tasks, val_seeds, cameras, settings, "val",
                                          progress)
    desc = (f"Meta-World expert demos rendered by flipjax: tasks {tasks}, cameras "
            f"{list(cameras)}, seeds {seeds}, val seeds {val_seeds}, settings {settings}")
    return write_rlds(out, NAME, features(image_size, num_points), splits, version=VERSION,
                      description=desc, file_format=file_format)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _flags() -> Any:
    # Defined on demand: toy.py and build_clips.py own flags of the same names in-process.
    from absl import flags

    f = flags
    f.DEFINE_string("out", None, "Root directory (cache and OUT/metaworld/1.0.0).")
    f.DEFINE_list("tasks", list(sim.TASKS), "Tasks (comma list).")
    f.DEFINE_list("cameras", list(sim.CAMERAS), "Cameras (comma list).")
    f.DEFINE_string("seeds", "0-4", "Train seeds, e.g. '0-4,7'.")
    f.DEFINE_string("val_seeds", "", "Validation seeds, e.g. '5'.")
    f.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "Rendering processes.")
    f.DEFINE_integer("image_size", 128, "Stored frame size (square).")
    f.DEFINE_integer("supersample", 1, "Render RGB this many times larger and downsample.")
    f.DEFINE_integer("max_steps", sim.MAX_STEPS, "Actions per rollout at most.")
    f.DEFINE_integer("extra_steps", 10, "Actions after the first success.")
    f.DEFINE_integer("num_points", 64, "Tracked points on the object and on the gripper.")
    f.DEFINE_enum("file_format", "tfrecord", ["tfrecord", "array_record"], "RLDS file format.")
    return flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from absl import app

    fl = FLAGS
    if not fl.out:
        raise app.UsageError("--out is required")
    t0 = time.time()
    path = build(fl.out, fl.tasks, fl.cameras, sim.parse_range(fl.seeds),
                 sim.parse_range(fl.val_seeds),
                 workers=fl.workers, image_size=fl.image_size, supersample=fl.supersample,
                 max_steps=fl.max_steps, extra_steps=fl.extra_steps, num_points=fl.num_points,
                 file_format=fl.file_format, progress=True)
    print(f"Meta-World demos written to {path} in {time.time() - t0:.0f}s")


def cli() -> None:
    """``python -m data_pipelines.metaworld``: defines the flags, then runs :func:`main`."""
    from flipjax import console

    global FLAGS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    FLAGS = _flags()
    console.run(main, "metaworld", packages=("data_pipelines",))
