"""Each checkpoint family's conventions around the network, resolved from the checkpoint's own files.

The network is the same for openpi and LeRobot checkpoints; what differs is everything around it, and a model
only works when it sees inputs made the way it was trained:

- the prompt format (`PROMPT_FORMATS`): openpi's pi05 and LeRobot >= 0.5 write the robot's state dims;
  LeRobot <= 0.4 zero-padded the state to `max_state_dim` first; openpi's pi05_libero wrote no state (pi0);
- the image resize (engine/preprocess.py RESIZE_METHODS): openpi's clients resize with PIL before sending,
  LeRobot resizes floats with torch;
- the flow time grid (engine/reference.py euler_schedule) and the normalization formulas (engine/normalize.py);
- the camera names (LeRobot names its image features; openpi has fixed slots);
- what the action columns mean (engine/action_space.py): openpi's configs know it per robot (the presets in
  engine/config.py), LeRobot's config says when actions are relative to the state;
- the robot's joint convention (engine/joint_conventions.py): openpi's ALOHA checkpoints flip some joints and
  convert the grippers around the network.

`resolve_conventions` says, for each, what will be used and why, so `pi05-info` can print it and
`Policy.load` can apply it; the caller's overrides win.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pi05_ros.engine.action_space import ABSOLUTE, DELTA, KINDS, ActionSpace
from pi05_ros.engine.checkpoint import EMBED_NAMES, CheckpointInfo
from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.joint_conventions import NONE
from pi05_ros.engine.joint_conventions import joint_convention as check_joint_convention
from pi05_ros.engine.lerobot_files import (
    CAMERA_PREFIX,
    RELATIVE_ACTION_KEYS,
    RelativeActions,
    camera_features,
    read_config,
    relative_actions,
)
from pi05_ros.engine.preprocess import LEROBOT, OPENPI_CLIENT, RESIZE_METHODS

PI05, PI05_PADDED, PI0 = "pi05", "pi05_padded", "pi0"
PROMPT_FORMATS = (PI05, PI05_PADDED, PI0)
END_EFFECTOR = "end_effector"  # action_space: columns that are not joint commands (LIBERO), passed through
ACTION_SPACE_NAMES = (*KINDS, END_EFFECTOR)


@dataclass(frozen=True)
class Conventions:
    """What the policy does around the network for one checkpoint, and why (`reasons`, per item)."""

    family: str  # "openpi" or "lerobot"
    prompt_format: str
    max_state_dim: int
    image_resize: str
    time_grid: str
    slots: tuple[str, ...]  # the model's image slots, in prefix order
    camera_names: dict[str, str]  # every accepted camera name -> its slot
    lerobot_version: str | None  # what the files tell of the LeRobot version that wrote them
    relative: RelativeActions | None = None  # LeRobot's relative actions, when the checkpoint has them
    preset_action_space: ActionSpace | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    joint_convention: str = NONE  # engine/joint_conventions.py

    def slot_for(self, name: str) -> str | None:
        return self.camera_names.get(name)

    def describe_cameras(self) -> str:
        by_slot: dict[str, list[str]] = {slot: [] for slot in self.slots}
        for name, slot in self.camera_names.items():
            if name != slot:
                by_slot[slot].append(name)
        return ", ".join(f"{slot}" + (f" (= {', '.join(names)})" if names else "") for slot, names in by_slot.items())


def _lerobot_version(info: CheckpointInfo, config: dict) -> tuple[str | None, str]:
    """(what the files tell of the LeRobot version, the evidence)."""
    keys = [k for k in RELATIVE_ACTION_KEYS if k in config]
    if keys:
        return ">= 0.5.1", f"config.json has {', '.join(keys)} (LeRobot >= 0.5.1)"
    tables = {EMBED_NAMES[0], EMBED_NAMES[2]}
    if {info.embed_name, *info.unused_tables} >= tables:
        return ">= 0.5.0", "model.safetensors holds both embed_tokens and lm_head (LeRobot >= 0.5 saves both)"
    return None, "the files do not tell the LeRobot version"


def resolve_conventions(info: CheckpointInfo, *, prompt_format: str | None = None,
                        image_resize: str | None = None, joint_convention: str | None = None) -> Conventions:
    """The conventions of the checkpoint `info` describes; `prompt_format` / `image_resize` / `joint_convention`
    override."""
    cfg = info.config
    reasons: dict[str, str] = {}
    relative = None
    version = None
    if info.format == "lerobot":
        config = read_config(info.path)
        version, evidence = _lerobot_version(info, config)
        if version is not None:
            fmt, why = PI05, f"LeRobot {version}: {evidence}; it writes the unpadded state"
        else:
            fmt, why = PI05, (f"{evidence}; current LeRobot's (unpadded state) assumed: a checkpoint trained with "
                              f"LeRobot <= 0.4 needs prompt_format={PI05_PADDED}")
        resize, resize_why = LEROBOT, "LeRobot resizes in the policy: torch bilinear, no antialias, float [0, 1]"
        relative = relative_actions(info.path)
        features = camera_features(info.path)
        names = {f: f[len(CAMERA_PREFIX):] if f.startswith(CAMERA_PREFIX) else f for f in features}
        cameras = {slot: slot for slot in cfg.image_keys} | {full: short for full, short in names.items()}
        reasons["cameras"] = ("LeRobot's VISUAL input_features in config order" if features
                              else "config.json names no cameras: the default slots")
    else:
        fmt = cfg.prompt_format
        why = f"openpi {cfg.name}: " + ("the task and the discretized state" if fmt == PI05
                                        else "the task only (discrete_state_input=False)")
        resize, resize_why = OPENPI_CLIENT, ("openpi's clients resize with openpi_client.image_tools."
                                             "resize_with_pad (PIL bilinear) before sending")
        cameras = {slot: slot for slot in cfg.image_keys}
        reasons["cameras"] = "openpi's fixed slots"
    if prompt_format is not None:
        if prompt_format not in PROMPT_FORMATS:
            raise CheckpointError(f"unknown prompt_format {prompt_format!r}; choose one of "
                                  f"{', '.join(PROMPT_FORMATS)} (or leave it empty for the checkpoint's own)")
        fmt, why = prompt_format, "given"
    if image_resize is not None:
        if image_resize not in RESIZE_METHODS:
            raise CheckpointError(f"unknown image_resize {image_resize!r}; choose one of "
                                  f"{', '.join(RESIZE_METHODS)} (or leave it empty for the family's own)")
        resize, resize_why = image_resize, "given"
    joints = check_joint_convention(cfg.joint_convention).name
    reasons["joint_convention"] = (f"the {cfg.name} preset's (openpi's adapt_to_pi)" if joints != NONE
                                   else "the robot's joints as they come")
    if info.format == "lerobot" and joints != NONE:  # LeRobot trains on the dataset's joints as they are
        joints = NONE
        reasons["joint_convention"] = (f"LeRobot has no adapt_to_pi: the {cfg.name} preset's {cfg.joint_convention} "
                                       "is not applied (joint_convention sets it)")
    if joint_convention is not None:
        joints, reasons["joint_convention"] = check_joint_convention(joint_convention).name, "given"
    reasons["prompt_format"] = why
    reasons["image_resize"] = resize_why
    reasons["time_grid"] = ("LeRobot: t = 1 + k * dt per step" if cfg.time_grid == "lerobot"
                            else "openpi: t += dt accumulated in float32")
    return Conventions(info.format, fmt, cfg.max_state_dim, resize, cfg.time_grid, tuple(cfg.image_keys), cameras,
                       version, relative, cfg.action_space, reasons, joints)


def default_conventions(config_name: str, slots: Sequence[str], prompt_format: str = PI05,
                        max_state_dim: int = 32, joint_convention: str = NONE) -> Conventions:
    """openpi's conventions for a model that has no checkpoint (the demo)."""
    return Conventions("openpi", prompt_format, max_state_dim, OPENPI_CLIENT, "openpi", tuple(slots),
                       {s: s for s in slots}, None,
                       reasons={"prompt_format": f"{config_name} preset", "image_resize": "openpi's clients",
                                "time_grid": "openpi", "cameras": "fixed slots",
                                "joint_convention": f"{config_name} preset"},
                       joint_convention=check_joint_convention(joint_convention).name)


def parse_action_space(action_space: str | ActionSpace | None, mask: Sequence[bool] | None,
                       dof: int) -> ActionSpace | None:
    """The caller's action space for `dof` columns, or None when neither is given.

    `action_space`: absolute, delta, velocity or end_effector (every column), or a comma-separated kind per
    column; with `mask` (openpi's make_bool_mask as booleans), the True columns are `action_space` (default
    delta) and the rest absolute; a shorter mask leaves the remaining columns absolute.
    """
    if isinstance(action_space, ActionSpace):
        if mask:
            raise CheckpointError("give action_space as a name to combine it with action_space_mask")
        return action_space
    name = (action_space or "").strip()
    mask = list(mask) if mask else None
    if not name and mask is None:
        return None
    if "," in name:
        kinds = tuple(k.strip() for k in name.split(","))
        if mask is not None:
            raise CheckpointError("action_space lists a kind per column and action_space_mask is set too; "
                                  "give one of them")
        if len(kinds) != dof:
            raise CheckpointError(f"action_space lists {len(kinds)} kinds but the policy outputs {dof} actions; "
                                  "give one kind per action column")
        return ActionSpace(kinds)
    if name and name not in ACTION_SPACE_NAMES:
        raise CheckpointError(f"unknown action_space {name!r}; use one of {', '.join(ACTION_SPACE_NAMES)}, or a "
                              "comma-separated kind per column (e.g. velocity,velocity,absolute)")
    joint_space = name != END_EFFECTOR
    if mask is None:
        return ActionSpace.uniform(name if joint_space else ABSOLUTE, dof, joint_space)
    kind = name if name in KINDS else DELTA  # a mask alone (or with end_effector) marks delta columns
    if kind == ABSOLUTE:
        raise CheckpointError("action_space_mask marks the columns that are deltas (or velocities); with "
                              "action_space=absolute it would mark nothing: use action_space=delta or velocity")
    return ActionSpace.from_mask(mask, dof, kind, joint_space)


def resolve_action_space(conventions: Conventions, dof: int, action_space: str | ActionSpace | None = None,
                         mask: Sequence[bool] | None = None) -> tuple[ActionSpace, str]:
    """(the action space for `dof` columns, why): the caller's, else LeRobot's relative actions, else the
    preset's, else absolute positions (assumed: the files do not say)."""
    given = parse_action_space(action_space, mask, dof)
    if given is not None:
        if given.dof != dof:
            raise CheckpointError(f"the action space describes {given.dof} columns but the policy outputs {dof}; "
                                  "give one kind per action column")
        return given, "given"
    relative = conventions.relative
    if relative is not None and relative.enabled:
        space = ActionSpace.from_mask(relative.mask(dof), dof, DELTA)
        names = f" over action names {list(relative.action_names)}" if relative.action_names else ""
        return space, (f"LeRobot relative actions ({relative.source}), relative_exclude_joints "
                       f"{list(relative.exclude_joints)}{names}: the state is added back")
    preset = conventions.preset_action_space
    if preset is not None:
        if preset.dof != dof:
            raise CheckpointError(
                f"the preset's action space describes {preset.dof} columns ({preset.describe()}) but the policy "
                f"outputs {dof}; pass action_space (and action_space_mask) for this robot, or the norm stats "
                "of the preset's robot")
        return preset, "the preset's (openpi's config for this robot)"
    why = "absolute positions assumed: the checkpoint does not say; set action_space (and action_space_mask)"
    if relative is not None:
        why = "LeRobot relative actions are off: " + why
    return ActionSpace.uniform(ABSOLUTE, dof), why
