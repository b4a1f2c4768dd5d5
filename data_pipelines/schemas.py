"""Where each RLDS dataset keeps the fields FLIP needs: frames, language and optional geometry.

A key is a path into an RLDS episode: ``steps/...`` for per-step features and
``episode_metadata/...`` (or any other top-level key) for per-episode ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# How stored frames relate to the camera view, i.e. the map that turns them upright and
# unmirrored again (each of these is its own inverse):
#   none        stored as seen by the camera;
#   rotate_180  stored upside down and mirrored (both axes flipped);
#   mirror_lr   stored mirrored left-right (columns reversed) -- the published LIBERO RLDS;
#   flip_ud     stored upside down (rows reversed) -- a raw robosuite / MuJoCo render.
ORIENTATIONS = ("none", "rotate_180", "mirror_lr", "flip_ud")


def check_orientation(orientation: str) -> str:
    """Returns ``orientation`` if valid, else raises ValueError naming the valid ones."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return orientation


@dataclasses.dataclass(frozen=True)
class Schema:
    """Field layout of one RLDS dataset family.

    Attributes:
      name: schema name used on the command line.
      cameras: camera name -> image key (``uint8[H W 3]`` per step).
      default_camera: camera used when none is given.
      language_key: instruction text key (per step or per episode); None if the dataset has none.
      embedding_key: the dataset's own sentence embedding (``float[D]`` per step), if any.
      orientation: how the stored frames differ from the camera view (:data:`ORIENTATIONS`);
        frames and track coordinates are mapped back to the camera view.
      nominal_size: (H, W) the published dataset stores; other sizes are accepted and resized.
      depth_key, segmentation_key, object_poses_key, intrinsics_key: fields for exact ground-truth
        tracks (``float[H W]`` metric depth, ``int[H W]`` ids indexing the poses,
        ``float[K 4 4]`` camera_from_object per step, ``float[3 3]`` per episode).
    """

    name: str
    cameras: Mapping[str, str]
    default_camera: str
    language_key: str | None
    embedding_key: str | None = None
    orientation: str = "none"
    nominal_size: tuple[int, int] | None = None
    depth_key: str | None = None
    segmentation_key: str | None = None
    object_poses_key: str | None = None
    intrinsics_key: str | None = None

    def __post_init__(self) -> None:
        check_orientation(self.orientation)

    def image_key(self, camera: str | None) -> str:
        """Returns the image key of ``camera`` (the default camera when None).

        Raises:
          ValueError: naming the unknown camera and the cameras the schema has.
        """
        camera = camera or self.default_camera
        if camera not in self.cameras:
            raise ValueError(f"schema {self.name!r} has no camera {camera!r}; "
                             f"cameras: {sorted(self.cameras)}")
        return self.cameras[camera]

    @property
    def signature(self) -> tuple[str, ...]:
        """Keys that identify the layout: every camera's image key and the language key."""
        keys = tuple(self.cameras.values())
        return keys + ((self.language_key,) if self.language_key else ())

    def describe(self) -> str:
        """One line naming the layout by its keys, for error messages."""
        return f"--schema={self.name} ({', '.join(self.signature)})"

    @property
    def ground_truth_keys(self) -> tuple[str, ...]:
        """Keys needed by the ground-truth tracker (empty when the dataset cannot provide them)."""
        keys = (self.depth_key, self.segmentation_key, self.object_poses_key, self.intrinsics_key)
        return tuple(k for k in keys if k) if all(keys) else ()


BRIDGE_DATASET = Schema(
    # rail-berkeley BridgeData V2 1.0.0 (bridge_dataset): 4 cameras at 256x256.
    name="bridge_dataset",
    cameras={f"image_{i}": f"steps/observation/image_{i}" for i in range(4)},
    default_camera="image_0",
    language_key="steps/language_instruction",
    embedding_key="steps/language_embedding",
    nominal_size=(256, 256),
)

BRIDGE_OXE = Schema(
    # The Open X-Embodiment copy of Bridge: one 480x640 camera, language inside observation.
    name="bridge",
    cameras={"image": "steps/observation/image"},
    default_camera="image",
    language_key="steps/observation/natural_language_instruction",
    embedding_key="steps/observation/natural_language_embedding",
    nominal_size=(480, 640),
)

LIBERO = Schema(
    # libero_{10,goal,object,spatial}_no_noops (moojink/rlds_dataset_builder, used by OpenVLA):
    # the builder stores raw[::-1, ::-1] where raw, robosuite's render, is the camera view
    # upside down, so the stored frames are upright and mirrored left-right.
    name="libero",
    cameras={"image": "steps/observation/image", "wrist_image": "steps/observation/wrist_image"},
    default_camera="image",
    language_key="steps/language_instruction",
    orientation="mirror_lr",
    nominal_size=(256, 256),
)

TOY = Schema(
    # The embedded procedural world (data_pipelines/toy/) carries everything for exact tracks.
    name="toy",
    cameras={"image": "steps/observation/image"},
    default_camera="image",
    language_key="steps/language_instruction",
    depth_key="steps/observation/depth",
    segmentation_key="steps/observation/segmentation",
    object_poses_key="steps/observation/object_poses",
    intrinsics_key="episode_metadata/intrinsics",
)

# Meta-World expert demos (data_pipelines/metaworld/): the toy world's layout, one camera per
# episode; segmentation holds MuJoCo body ids indexing object_poses.
METAWORLD = dataclasses.replace(TOY, name="metaworld")

SCHEMAS: dict[str, Schema] = {s.name: s for s in (BRIDGE_DATASET, BRIDGE_OXE, LIBERO, TOY,
                                                  METAWORLD)}


def generic_schema(image_key: str, language_key: str | None,
                   embedding_key: str | None = None, orientation: str = "none") -> Schema:
    """A schema for any RLDS dataset from its keys (``--schema=generic``).

    Args:
      image_key: e.g. ``steps/observation/rgb``.
      language_key: e.g. ``steps/language_instruction``; None for unlabelled data.
      embedding_key: optional per-step sentence embedding key.
      orientation: how stored frames differ from the camera view (:data:`ORIENTATIONS`).

    Returns:
      A Schema with one camera named ``image``.
    """
    for what, key in (("image_key", image_key), ("language_key", language_key),
                      ("embedding_key", embedding_key)):
        if key is not None and not key.strip("/"):
            raise ValueError(f"{what} must be a key path such as 'steps/observation/image'")
    return Schema(name="generic", cameras={"image": image_key}, default_camera="image",
                  language_key=language_key, embedding_key=embedding_key,
                  orientation=orientation)


def matching_schemas(keys: list[str] | set[str]) -> list[Schema]:
    """The named schemas whose layout a dataset with these feature keys has.

    A schema matches when the dataset has every key of its :attr:`Schema.signature`. Names alone
    cannot decide: current tfds catalogues call the rail-berkeley BridgeData V2 layout
    ``bridge``, the Open X-Embodiment name of another layout.

    Args:
      keys: the dataset's leaf feature paths (``data_pipelines.rlds.feature_keys``).

    Returns:
      Matching schemas, most specific (most signature keys) first.
    """
    have = set(keys)
    found = [s for s in SCHEMAS.values() if set(s.signature) <= have]
    return sorted(found, key=lambda s: -len(s.signature))


def get_schema(name: str, **generic_options: str | bool | None) -> Schema:
    """Looks a schema up by name; ``generic`` builds one from ``generic_options``.

    Raises:
      ValueError: naming the unknown schema and the valid names.
    """
    if name == "generic":
        if not generic_options.get("image_key"):
            raise ValueError("schema 'generic' needs --image_key (and usually --language_key)")
        return generic_schema(**generic_options)  # type: ignore[arg-type]
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}; valid: {[*sorted(SCHEMAS), 'generic']}")
    return SCHEMAS[name]
