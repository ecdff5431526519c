"""Observation layouts: which keys of a robot's observation map hold the camera images, the state and the prompt.

openpi's example clients send their robot's own keys (`observation/exterior_image_1_left`, `observation/
joint_position`, ...), and openpi maps them onto the model inside its policy. A layout is that mapping, small
and declarative; the model's own preprocessing (resize-with-pad, state normalization, tokenization) and action
space then apply exactly as in `Policy.infer`. Built in:

- `droid`: `observation/exterior_image_1_left` -> base, `observation/wrist_image_left` -> left wrist; state =
  `observation/joint_position` (7) + `observation/gripper_position` (1); `prompt`.
- `libero`: `observation/image` -> base, `observation/wrist_image` -> left wrist; state = `observation/state` (8).
- `aloha`: `images` = {`cam_high` -> base, `cam_left_wrist`, `cam_right_wrist` -> the wrists; `cam_low`
  ignored}, channels-first 3xHxW; state = `state` (14); any subset of the cameras; the prompt may come from the
  server's default prompt.
- `pi05_ros`: this package's own layout (what `RemotePolicy` sends): `images` = {camera name -> HxWx3}, any names
  `Policy.infer` takes (the model slots, or a LeRobot checkpoint's camera names), `state`, `prompt`.

A custom robot's layout is a JSON file (`pi05-serve --robot my_robot.json`, see `load_layout`). Every layout also
takes the request options `noise_seed`, `noise`, `num_steps` and `rtc` (`OPTION_KEYS`; `rtc` is a map of
engine/rtc.py's RtcRequest fields: previous, delay, beta, end, schedule, start).

openpi's per-robot data transforms beyond key mapping (ALOHA's joint flips and gripper conversion, for instance)
belong to the checkpoint, not to the wire: a layout does not do them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pi05_ros.engine.errors import InputError
from pi05_ros.engine.policy import MAX_DENOISE_STEPS
from pi05_ros.engine.preprocess import validate_image
from pi05_ros.engine.rtc import RtcRequest

Key = tuple[str, ...]  # a path into nested maps: ("observation/image",) or ("images", "cam_high")

NOISE_SEED, NOISE, NUM_STEPS, RTC = "noise_seed", "noise", "num_steps", "rtc"
OPTION_KEYS: tuple[str, ...] = (NOISE_SEED, NOISE, NUM_STEPS, RTC)
# rtc: real-time chunking as Policy.infer(rtc=RtcRequest(...)) takes it; the policy checks the values
RTC_FIELDS = {"previous": "a float array [actions, action dof]", "delay": "an integer", "beta": "a number",
              "end": "an integer", "schedule": "a string", "start": "an integer"}


def key_name(key: Key) -> str:
    """How a key is written in messages: openpi's flat keys as they are, nested ones joined by '.'."""
    return ".".join(key)


def seeded_noise(seed: int, horizon: int, action_dim: int) -> np.ndarray:
    """The noise a request with `noise_seed` gets: reproducible from the seed alone, whatever else the server
    runs at the same time."""
    return np.random.default_rng(seed).standard_normal((horizon, action_dim), dtype=np.float32)


@dataclass
class Request:
    """One observation taken off the wire, in `Policy.infer`'s terms."""

    images: dict[str, np.ndarray]  # model slot (or a camera name the policy maps to one) -> uint8 HxWx3
    state: np.ndarray  # float32 [state dim]
    prompt: str
    noise: np.ndarray | None = None
    noise_seed: int | None = None
    num_steps: int | None = None
    rtc: RtcRequest | None = None


@dataclass(frozen=True)
class ObservationLayout:
    """Where a robot's observation map keeps what the policy needs (see the module docstring)."""

    name: str
    images: Mapping[str, Key]  # model slot -> key of its image
    state: tuple[Key, ...]  # keys of the state's parts, concatenated in this order
    prompt: Key = ("prompt",)
    all_images_required: bool = True  # False: any non-empty subset (missing views are masked)
    channels_first: bool = False  # images arrive 3xHxW (openpi's ALOHA clients)
    ignored: tuple[Key, ...] = ()  # keys a client sends that the model does not use
    description: str = ""
    # instead of `images`: the key of a map camera name -> image, any names the policy takes (checked by it)
    camera_map: Key | None = None
    _tree: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The slot names are the model's, checked against it when served (check_model): openpi's fixed slots, or a
        # LeRobot checkpoint's own camera names
        if bool(self.images) == bool(self.camera_map) or not self.state:
            raise InputError(f"layout {self.name!r} needs image keys (or else a camera map) and a state key")
        keys = [*self.images.values(), *([self.camera_map] if self.camera_map else []), *self.state, self.prompt,
                *self.ignored, *((k,) for k in OPTION_KEYS)]
        tree: dict = {}
        for key in keys:
            if not key or not all(isinstance(part, str) and part for part in key):
                raise InputError(f"layout {self.name!r}: a key must be a non-empty string or list of strings, "
                                 f"got {key!r}")
            node = tree
            for part in key[:-1]:
                node = node.setdefault(part, {})
                if node is None:
                    raise InputError(f"layout {self.name!r}: {key_name(key)} lies inside another key's value")
            if key[-1] in node:
                raise InputError(f"layout {self.name!r} uses the key {key_name(key)} twice")
            node[key[-1]] = None
        object.__setattr__(self, "_tree", tree)

    def check_model(self, image_keys: Iterable[str]) -> None:
        """A startup error when the layout feeds a camera slot the model does not have."""
        missing = sorted(set(self.images) - set(image_keys))
        if missing:
            raise InputError(f"layout {self.name!r} feeds camera slot(s) {missing}, which this model does not "
                             f"have (its slots: {list(image_keys)})")

    def describe(self) -> dict[str, Any]:
        """The layout for the connection's metadata frame: what a client must send."""
        images = ({slot: key_name(k) for slot, k in self.images.items()} if self.camera_map is None
                  else f"{key_name(self.camera_map)}: a map of camera name -> image")
        return {"name": self.name, "images": images,
                "state": [key_name(k) for k in self.state], "prompt": key_name(self.prompt),
                "all_images_required": self.all_images_required, "channels_first": self.channels_first,
                "ignored": [key_name(k) for k in self.ignored], "options": list(OPTION_KEYS)}

    # --- parsing one observation

    def parse(self, message: Any, default_prompt: str | None = None) -> Request:
        """The observation map `message` as a Request. Raises InputError naming the key and what it should be."""
        if not isinstance(message, dict):
            raise InputError(f"an observation must be a map of key -> value, got a {type(message).__name__}")
        unexpected = sorted(self._unexpected(message, self._tree, ()))
        if unexpected:
            raise InputError(f"unexpected key(s) {unexpected} for layout {self.name!r}; it takes "
                             f"{self._accepted()}")
        self._check_missing(message, default_prompt)
        if self.camera_map is not None:
            cameras = _lookup(message, self.camera_map)
            if not isinstance(cameras, dict):
                raise InputError(f"{key_name(self.camera_map)} must be a map of camera name -> image, got "
                                 f"{_what(cameras)}")
            images = {str(name): self._image(image, (*self.camera_map, str(name))) for name, image in cameras.items()}
        else:
            images = {slot: self._image(_lookup(message, key), key) for slot, key in self.images.items()
                      if _lookup(message, key) is not None}
        state = np.concatenate([self._state_part(message, key) for key in self.state])
        return Request(images, state, self._prompt(message, default_prompt), *self._options(message))

    def _check_missing(self, message: dict, default_prompt: str | None) -> None:
        """Every missing key in one message, before any value is looked at."""
        present = [key for key in self.images.values() if _lookup(message, key) is not None]
        problems = []
        if self.camera_map is not None:
            if not _lookup(message, self.camera_map):
                problems.append(f"camera images: {key_name(self.camera_map)!r} (a map of camera name -> image)")
        elif not present or (self.all_images_required and len(present) < len(self.images)):
            what = "every one of" if self.all_images_required else "at least one of"
            missing = [key_name(k) for k in self.images.values() if k not in present]
            problems.append(f"image key(s) {missing} (it needs {what} {[key_name(k) for k in self.images.values()]})")
        missing_state = [key_name(k) for k in self.state if _lookup(message, k) is None]
        if missing_state:
            problems.append(f"state key(s) {missing_state} (the state is {[key_name(k) for k in self.state]} "
                            "concatenated)")
        if _lookup(message, self.prompt) is None and not default_prompt:
            problems.append(f"the prompt key {key_name(self.prompt)!r} (the task instruction; or start the server "
                            "with --default-prompt)")
        if problems:
            raise InputError(f"missing {'; '.join(problems)} for layout {self.name!r}")

    def _unexpected(self, message: dict, tree: dict, path: Key) -> Iterable[str]:
        for name, value in message.items():
            if not isinstance(name, str) or name not in tree:
                yield key_name((*path, str(name)))
            elif tree[name] is not None:  # a nested map of the layout (ALOHA's `images`)
                if not isinstance(value, dict):
                    raise InputError(f"{key_name((*path, name))} must be a map, got a {type(value).__name__}")
                yield from self._unexpected(value, tree[name], (*path, name))

    def _accepted(self) -> str:
        images = ([key_name(k) for k in self.images.values()] if self.camera_map is None
                  else f"{key_name(self.camera_map)!r} (camera name -> image)")
        state = [key_name(k) for k in self.state]
        return (f"images {images}, state {state}, prompt {key_name(self.prompt)!r}"
                + (f", ignored {[key_name(k) for k in self.ignored]}" if self.ignored else "")
                + f" and the options {list(OPTION_KEYS)}")

    def _image(self, value: Any, key: Key) -> np.ndarray:
        name = key_name(key)
        if not isinstance(value, np.ndarray):
            raise InputError(f"{name}: expected a uint8 image array, got a {type(value).__name__}")
        if self.channels_first:
            if value.ndim != 3 or value.shape[0] != 3:
                raise InputError(f"{name}: layout {self.name!r} takes channels-first 3xHxW images, got shape "
                                 f"{list(value.shape)}")
            value = value.transpose(1, 2, 0)
        return validate_image(value, name)

    def _state_part(self, message: dict, key: Key) -> np.ndarray:
        name = key_name(key)
        value = _lookup(message, key)
        if isinstance(value, bool) or not isinstance(value, np.ndarray | list | tuple | int | float | np.number):
            raise InputError(f"{name}: expected numbers (an array or a list), got a {type(value).__name__}")
        try:
            array = np.asarray(value)
            if array.dtype.kind not in "biuf":
                raise TypeError(array.dtype)
            array = array.astype(np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: expected numbers, got {exc}") from exc
        if array.ndim > 1:
            raise InputError(f"{name}: expected a vector (or one number), got shape {list(array.shape)}")
        return array.reshape(-1)

    def _prompt(self, message: dict, default_prompt: str | None) -> str:
        value = _lookup(message, self.prompt)
        if value is None:
            return default_prompt or ""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.ndim == 0:
            value = str(value)
        if not isinstance(value, str):
            raise InputError(f"{key_name(self.prompt)}: expected a string, got a {type(value).__name__}")
        if not value.strip():
            raise InputError(f"{key_name(self.prompt)}: the task prompt is empty; send the task instruction")
        return value

    def _options(self, message: dict) -> tuple[np.ndarray | None, int | None, int | None, RtcRequest | None]:
        noise = message.get(NOISE)
        if noise is not None and not (isinstance(noise, np.ndarray) and noise.dtype.kind == "f"):
            raise InputError(f"{NOISE}: expected a float array [horizon, action_dim], got {_what(noise)}")
        seed = _integer(message.get(NOISE_SEED), NOISE_SEED, 0, 2**63 - 1)
        if noise is not None and seed is not None:
            raise InputError(f"give either {NOISE} or {NOISE_SEED}, not both")
        steps = _integer(message.get(NUM_STEPS), NUM_STEPS, 1, MAX_DENOISE_STEPS)
        return noise, seed, steps, _rtc(message.get(RTC))


def _rtc(value: Any) -> RtcRequest | None:
    """The `rtc` option as an RtcRequest; the types here, the values in Policy.prepare."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError(f"{RTC}: expected a map of {sorted(RTC_FIELDS)}, got {_what(value)}")
    unknown = sorted(set(map(str, value)) - set(RTC_FIELDS))
    missing = sorted({"previous", "delay"} - set(value))
    if unknown or missing:
        raise InputError(f"{RTC}: unknown field(s) {unknown} or missing {missing}; it takes {sorted(RTC_FIELDS)} "
                         "(previous and delay required)")
    previous = value["previous"]
    if not (isinstance(previous, np.ndarray) and previous.dtype.kind in "fiu"):
        raise InputError(f"{RTC}.previous: expected {RTC_FIELDS['previous']}, got {_what(previous)}")
    fields: dict[str, Any] = {"previous": previous.astype(np.float32)}
    for name in ("delay", "end", "start"):
        if value.get(name) is not None:
            fields[name] = _integer(value[name], f"{RTC}.{name}", 0, 2**31 - 1)
    if "beta" in value:
        beta = value["beta"]
        if isinstance(beta, bool) or not isinstance(beta, int | float | np.number):
            raise InputError(f"{RTC}.beta: expected a number, got {_what(beta)}")
        fields["beta"] = float(beta)
    if "schedule" in value:
        if not isinstance(value["schedule"], str):
            raise InputError(f"{RTC}.schedule: expected a string, got {_what(value['schedule'])}")
        fields["schedule"] = value["schedule"]
    return RtcRequest(**fields)


def _what(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} and shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _integer(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, np.integer) or (isinstance(value, np.ndarray) and value.ndim == 0
                                         and value.dtype.kind in "iu"):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name}: expected an integer in {low}..{high}, got {value!r}")
    return value


def _lookup(message: dict, key: Key) -> Any:
    node: Any = message
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --- the built-in layouts

DROID = ObservationLayout(
    "droid",
    images={"base_0_rgb": ("observation/exterior_image_1_left",),
            "left_wrist_0_rgb": ("observation/wrist_image_left",)},
    state=(("observation/joint_position",), ("observation/gripper_position",)),
    description="openpi's DROID client (examples/droid): exterior + wrist camera, 7 joints + gripper",
)
LIBERO = ObservationLayout(
    "libero",
    images={"base_0_rgb": ("observation/image",), "left_wrist_0_rgb": ("observation/wrist_image",)},
    state=(("observation/state",),),
    description="openpi's LIBERO client (examples/libero): agent view + wrist camera, 8-value state",
)
ALOHA = ObservationLayout(
    "aloha",
    images={"base_0_rgb": ("images", "cam_high"), "left_wrist_0_rgb": ("images", "cam_left_wrist"),
            "right_wrist_0_rgb": ("images", "cam_right_wrist")},
    state=(("state",),),
    all_images_required=False,
    channels_first=True,
    ignored=(("images", "cam_low"),),
    description="openpi's ALOHA clients (examples/aloha_real, aloha_sim): CHW cameras under 'images', 14-value state",
)


def native_layout() -> ObservationLayout:
    """This package's own layout (RemotePolicy's): a map of camera name -> image, as `Policy.infer` takes it."""
    return ObservationLayout(
        "pi05_ros", images={}, camera_map=("images",), state=(("state",),), all_images_required=False,
        description="pi05_ros's own layout: images by camera name (the model's slots, or the checkpoint's names), "
                    "state, prompt",
    )


BUILT_IN: dict[str, ObservationLayout] = {layout.name: layout for layout in (DROID, LIBERO, ALOHA, native_layout())}


def _key(raw: Any, what: str, source: Path) -> Key:
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and raw and all(isinstance(part, str) for part in raw):
        return tuple(raw)
    raise InputError(f"{source}: {what} must be a key string or a list of strings (a path into nested maps), "
                     f"got {raw!r}")


def load_layout(path: str | Path) -> ObservationLayout:
    """A custom layout from a JSON file:

        {"name": "my_arm",
         "images": {"base_0_rgb": "cam/front", "left_wrist_0_rgb": ["cams", "wrist"]},
         "state": ["joints", "gripper"],
         "prompt": "task",                       (optional, default "prompt")
         "all_images_required": true,            (optional)
         "channels_first": false,                (optional)
         "ignored": ["debug/depth"]}             (optional)
    A key is a string, or a list of strings for a map inside a map.
    """
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise InputError(f"cannot read the layout file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a layout file holds a JSON object, got a {type(raw).__name__}")
    known = {"name", "images", "state", "prompt", "all_images_required", "channels_first", "ignored", "description"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{path}: unknown field(s) {unknown}; a layout has {sorted(known)}")
    images, state = raw.get("images"), raw.get("state")
    if not isinstance(images, dict) or not isinstance(state, list):
        raise InputError(f"{path}: 'images' must map model slots to keys and 'state' must list keys")
    return ObservationLayout(
        str(raw.get("name", path.stem)),
        images={str(slot): _key(k, f"images.{slot}", path) for slot, k in images.items()},
        state=tuple(_key(k, "a state key", path) for k in state),
        prompt=_key(raw.get("prompt", "prompt"), "prompt", path),
        all_images_required=bool(raw.get("all_images_required", True)),
        channels_first=bool(raw.get("channels_first", False)),
        ignored=tuple(_key(k, "an ignored key", path) for k in raw.get("ignored", [])),
        description=str(raw.get("description", f"from {path}")),
    )


def resolve_layout(name_or_path: str) -> ObservationLayout:
    """A built-in layout by name, or a layout file."""
    if name_or_path in BUILT_IN:
        return BUILT_IN[name_or_path]
    if name_or_path.endswith(".json") or Path(name_or_path).expanduser().is_file():
        return load_layout(name_or_path)
    raise InputError(f"unknown robot layout {name_or_path!r}; choose one of {', '.join(BUILT_IN)} or give a "
                     "layout .json file")
