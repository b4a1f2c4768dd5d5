"""Model mode of the Meta-World evaluation: a flipjax world model plans from the current frame.

The history is the current frame repeated (an episode starts from rest), the instruction is
``data_pipelines.metaworld.sim.INSTRUCTIONS[task]`` encoded as the runs' clips were (hash or
MiniLM tokens),
``planning.hill_climb`` searches flows, video and values, and ``planning.plan_to_actions`` fits
the chosen beam's tracks on the target object's mask: contact point, grasp or push, waypoints.
Frames are rendered at the models' frame size, so depth, mask and K describe the very pixels
the models see.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.metaworld import sim as ms
from experiments.metaworld.policy import MotionPlan, PlanUnavailable


def parse_overrides(text: str) -> dict[str, str]:
    """"a=1,b=x" -> {"a": "1", "b": "x"}; ValueError naming a malformed item."""
    out = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"plan override {item!r}: expected name=value")
        name, value = (s.strip() for s in item.split("=", 1))
        out[name] = value
    return out


class ModelPlanner:
    """Loads the world model once and plans for every scene of the evaluation.

    Args:
      runs: a directory with the ``cvae/``, ``dit/`` and ``value/`` runs (as
        ``experiments.plan``'s ``config.runs``).
      text: "hash" or "minilm", as the runs' clips were built.
      text_model_dir: the MiniLM directory (``text="minilm"``).
      text_max_tokens: tokens per instruction, as the clips.
      plan_overrides: ``experiments/configs/plan.py`` fields, e.g. "beams=2,horizon=2".
      seed: base key of the searches (one key per plan).
    """

    def __init__(self, runs: str, text: str = "hash", text_model_dir: str | None = None,
                 text_max_tokens: int = 16, plan_overrides: str = "", seed: int = 0):
        from data_pipelines import text as text_lib
        from experiments import plan as plan_cli
        from experiments.configs import plan as plan_configs

        config = plan_configs.get_config()
        config.runs = str(runs)
        for name, value in parse_overrides(plan_overrides).items():
            if name not in config:
                raise ValueError(f"plan override {name!r} is not a field of "
                                 f"experiments/configs/plan.py")
            kind = type(config[name])
            config[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        self.world, schedule, action_config = plan_cli.load_world_model(config)
        self.plan_config = plan_cli.plan_config(config, schedule)
        h, w = (int(s) for s in action_config.model.img_size)
        if h != w:
            raise ValueError(f"the action run takes {h}x{w} frames; the evaluation renders "
                             "square frames")
        self.image_size = h
        dim = int(action_config.model.language_dim)
        if text == "hash":
            self.encoder = text_lib.make_text_encoder("hash", dim=dim,
                                                      max_tokens=int(text_max_tokens))
        elif text == "minilm":
            self.encoder = text_lib.make_text_encoder("minilm", model_dir=text_model_dir,
                                                      max_tokens=int(text_max_tokens))
        else:
            raise ValueError(f"--text must be 'hash' or 'minilm', got {text!r}")
        self.seed, self.calls = int(seed), 0

    def plan(self, scene: Any) -> MotionPlan:
        """Plans from the scene's current frame (see the module docstring)."""
        import jax

        from flipjax.planning import hill_climb
        from flipjax.planning.actions import plan_to_actions

        if scene.renderer.height != self.image_size or scene.renderer.width != self.image_size:
            raise ValueError(f"the scene renders {scene.renderer.height}x{scene.renderer.width} "
                             f"frames; the models take {self.image_size}x{self.image_size}")
        obs = scene.observe()
        if not obs["mask"].any():
            raise PlanUnavailable(f"{scene.task}: the target object is not in view of "
                                  f"{scene.camera}")
        frame = obs["image"].astype(np.float32) / 127.5 - 1.0  # flipjax frames: [-1, 1]
        history = np.repeat(frame[None, None], self.world.history_frames, axis=1)
        tokens, mask = self.encoder.encode([ms.INSTRUCTIONS[scene.task]])
        self.calls += 1
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.calls)
        k_plan, k_fit = jax.random.split(key)
        plan = hill_climb(self.world, history, np.asarray(tokens, np.float32),
                          np.asarray(mask, bool), k_plan, self.plan_config)
        acts = plan_to_actions(plan, obs["depth"][None], obs["K"], object_mask=obs["mask"][None],
                               extrinsics=obs["world_from_camera"].astype(np.float32),
                               key=k_fit)
        if not bool(acts.contact_valid[0]):
            raise PlanUnavailable(f"{scene.task}: no contact point (mask without depth)")
        sub = np.asarray(acts.subgoals_world[0], np.float64)
        return MotionPlan(sub[0], np.asarray(acts.pre_contact[0], np.float64),
                          np.asarray(acts.waypoints[0], np.float64), bool(acts.is_grasp[0]),
                          {"best_return": float(plan.returns[0, int(plan.best[0])]),
                           "inlier_fraction": float(np.mean(acts.inlier_fraction[0, :, 1:])),
                           "object_motion_m": float(np.linalg.norm(sub[-1] - sub[0]))})

    def for_scene(self, scene: Any) -> Any:
        """``planner() -> MotionPlan`` bound to ``scene``."""
        return lambda: self.plan(scene)
