"""The wire format against openpi-client's own encoder (byte for byte), and the observation layouts: built-in ones,
a custom robot's layout file, and the errors a user can make in one."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from serve_harness import HERE

from pi05_ros.engine.errors import InputError
from pi05_ros.serve.layouts import ALOHA, DROID, load_layout, native_layout, resolve_layout, seeded_noise
from pi05_ros.serve.wire import MAX_LIST_LEN, MAX_MAP_LEN, MAX_MAPS, WireError, pack, unpack

OPENPI_ENCODE = """
import sys, numpy as np
from openpi_client import msgpack_numpy
sys.stdout.buffer.write(msgpack_numpy.packb({
    "image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3), "state": np.linspace(0, 1, 7),
    "f32": np.ones((2, 2), np.float32)[:, ::-1], "scalar": np.float32(0.5), "flag": np.bool_(True),
    "prompt": "pick", "nested": {"ints": np.array([1, -2], np.int64)}, "n": 3}))
"""


def test_frames_are_byte_identical_to_openpi_clients(openpi_client_python: Path) -> None:
    theirs = subprocess.run([str(openpi_client_python), "-c", OPENPI_ENCODE], capture_output=True, timeout=120,
                            cwd=HERE, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert theirs.returncode == 0, theirs.stderr.decode()[-2000:]
    ours = pack({"image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3), "state": np.linspace(0, 1, 7),
                 "f32": np.ones((2, 2), np.float32)[:, ::-1], "scalar": np.float32(0.5), "flag": np.bool_(True),
                 "prompt": "pick", "nested": {"ints": np.array([1, -2], np.int64)}, "n": 3})
    assert ours == theirs.stdout
    decoded = unpack(theirs.stdout)
    assert decoded["image"].dtype == np.uint8 and decoded["image"].shape == (2, 4, 3)
    np.testing.assert_array_equal(decoded["image"], np.arange(24).reshape(2, 4, 3))
    assert not decoded["image"].flags.writeable  # a view on the received bytes
    assert decoded["scalar"] == np.float32(0.5) and isinstance(decoded["scalar"], np.float32)
    assert decoded["nested"]["ints"].tolist() == [1, -2] and decoded["prompt"] == "pick" and decoded["n"] == 3


def test_refused_dtypes_and_objects() -> None:
    with pytest.raises(WireError, match="complex"):
        pack({"x": np.zeros(2, np.complex64)})
    with pytest.raises(WireError, match="object"):
        pack({"x": np.array([None, 1], dtype=object)})
    with pytest.raises(TypeError, match="set"):
        pack({"x": {1, 2}})


def test_frames_whose_decoding_would_stall_the_server_are_refused_at_once() -> None:
    """10.6 MB of 200,000 tiny arrays: decoding each map costs a Python call on the server's event loop (seconds
    for the frame, every client waiting); it is refused after MAX_MAPS of them."""
    frame = pack({f"group{i}": {f"c{j}": np.zeros((1, 1, 3), np.uint8) for j in range(1000)} for i in range(200)})
    start = time.perf_counter()
    with pytest.raises(WireError, match=f"more than {MAX_MAPS} maps"):
        unpack(frame)
    assert time.perf_counter() - start < 1.0  # ~0.07 s on the 2-core dev machine
    with pytest.raises(WireError, match=r"exceeds max_map_len"):
        unpack(pack({f"k{i}": 0 for i in range(MAX_MAP_LEN + 1)}))
    with pytest.raises(WireError, match=r"exceeds max_array_len"):
        unpack(pack({"state": [0.0] * (MAX_LIST_LEN + 1)}))
    assert len(unpack(pack({"state": [0.0] * MAX_LIST_LEN}))["state"]) == MAX_LIST_LEN  # the limits themselves pass


def test_the_seeded_noise_is_numpy_default_rng() -> None:
    noise = seeded_noise(42, 10, 32)
    assert noise.dtype == np.float32 and noise.shape == (10, 32)
    np.testing.assert_array_equal(noise, np.random.default_rng(42).standard_normal((10, 32), dtype=np.float32))


def droid_message() -> dict:
    return {"observation/exterior_image_1_left": np.zeros((224, 224, 3), np.uint8),
            "observation/wrist_image_left": np.ones((100, 120, 3), np.uint8),
            "observation/joint_position": np.arange(7.0), "observation/gripper_position": [0.5],
            "prompt": "stack the blocks", "noise_seed": np.int64(3), "num_steps": 4}


def test_droid_keys_map_onto_the_model() -> None:
    request = DROID.parse(droid_message())
    assert set(request.images) == {"base_0_rgb", "left_wrist_0_rgb"}
    assert request.images["left_wrist_0_rgb"].shape == (100, 120, 3)
    assert request.state.dtype == np.float32 and request.state.tolist() == [0, 1, 2, 3, 4, 5, 6, 0.5]
    assert (request.prompt, request.noise_seed, request.num_steps, request.noise) == ("stack the blocks", 3, 4, None)


def test_aloha_images_are_channels_first_and_any_subset_with_a_default_prompt() -> None:
    chw = np.zeros((3, 48, 64), np.uint8)
    request = ALOHA.parse({"images": {"cam_high": chw, "cam_low": chw}, "state": np.zeros(14)}, "fold the towel")
    assert set(request.images) == {"base_0_rgb"} and request.images["base_0_rgb"].shape == (48, 64, 3)
    assert request.prompt == "fold the towel"
    with pytest.raises(InputError, match=r"images.cam_high: layout 'aloha' takes channels-first 3xHxW images"):
        ALOHA.parse({"images": {"cam_high": np.zeros((48, 64, 3), np.uint8)}, "state": np.zeros(14)}, "x")
    with pytest.raises(InputError, match=r"unexpected key\(s\) \['images.cam_top'\]"):
        ALOHA.parse({"images": {"cam_high": chw, "cam_top": chw}, "state": np.zeros(14)}, "x")
    with pytest.raises(InputError, match="images must be a map"):
        ALOHA.parse({"images": chw, "state": np.zeros(14)}, "x")
    with pytest.raises(InputError, match=r"missing the prompt key 'prompt'"):
        ALOHA.parse({"images": {"cam_high": chw}, "state": np.zeros(14)})


def test_missing_keys_are_all_named_at_once() -> None:
    message = droid_message()
    for key in ("observation/wrist_image_left", "observation/gripper_position", "prompt"):
        del message[key]
    with pytest.raises(InputError) as missing:
        DROID.parse(message)
    text = str(missing.value)
    assert "['observation/wrist_image_left']" in text and "['observation/gripper_position']" in text
    assert "the prompt key 'prompt'" in text


def test_a_custom_robot_layout_file(tmp_path: Path) -> None:
    path = tmp_path / "my_arm.json"
    path.write_text(json.dumps({"name": "my_arm", "images": {"base_0_rgb": "cam/front",
                                                              "right_wrist_0_rgb": ["cams", "wrist"]},
                                "state": ["arm/joints", "arm/gripper"], "prompt": "task",
                                "ignored": ["debug/depth"]}))
    layout = resolve_layout(str(path))
    request = layout.parse({"cam/front": np.zeros((10, 10, 3), np.uint8),
                            "cams": {"wrist": np.zeros((5, 5, 3), np.uint8)}, "arm/joints": np.zeros(6),
                            "arm/gripper": 1.0, "task": "wave", "debug/depth": np.zeros(3)})
    assert set(request.images) == {"base_0_rgb", "right_wrist_0_rgb"} and request.state.shape == (7,)
    assert request.prompt == "wave"
    assert layout.describe()["images"] == {"base_0_rgb": "cam/front", "right_wrist_0_rgb": "cams.wrist"}


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read the layout file"),
    ("[1, 2]", "a layout file holds a JSON object"),
    ('{"images": {"base_0_rgb": "a"}, "state": ["s"], "colour": 1}', r"unknown field\(s\) \['colour'\]"),
    ('{"images": {"base_0_rgb": 3}, "state": ["s"]}', "images.base_0_rgb must be a key string"),
    ('{"images": {"base_0_rgb": "a"}, "state": ["a"]}', "uses the key a twice"),
    ('{"images": {"base_0_rgb": "a"}, "state": "s"}', "'state' must list keys"),
    ('{"images": {"base_0_rgb": ["a", "b"]}, "state": ["a"]}', "inside another key's value|twice"),
])
def test_layout_file_errors_name_the_fix(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "robot.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_layout(path)


def test_unknown_layouts_and_slots_the_model_lacks() -> None:
    with pytest.raises(InputError, match="unknown robot layout 'franka'; choose one of droid, libero, aloha, pi05_ros"):
        resolve_layout("franka")
    with pytest.raises(InputError, match=r"feeds camera slot\(s\) \['right_wrist_0_rgb'\]"):
        ALOHA.check_model(("base_0_rgb", "left_wrist_0_rgb"))


def test_our_own_layout_passes_any_camera_name_to_the_policy() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    request = native_layout().parse({"images": {"base_0_rgb": image, "observation.images.wrist": image},
                                     "state": [0.0], "prompt": "wave"})
    assert set(request.images) == {"base_0_rgb", "observation.images.wrist"}  # Policy.prepare maps the names
    with pytest.raises(InputError, match=r"missing camera images: 'images'"):
        native_layout().parse({"images": {}, "state": [0.0], "prompt": "wave"})
    with pytest.raises(InputError, match=r"images.wrist: expected uint8 pixels"):
        native_layout().parse({"images": {"wrist": image.astype(np.float32)}, "state": [0.0], "prompt": "wave"})


def test_a_layout_may_feed_a_lerobot_checkpoints_own_camera_names_and_is_checked_against_the_model(
        tmp_path: Path) -> None:
    """openpi's ALOHA client against a LeRobot ALOHA model: the slots are the checkpoint's camera names."""
    path = tmp_path / "aloha_lerobot.json"
    path.write_text('{"images": {"cam_high": ["images", "cam_high"], "cam_left_wrist": ["images", "cam_left_wrist"]},'
                    ' "state": ["state"], "channels_first": true}')
    layout = load_layout(path)
    layout.check_model(("cam_high", "cam_left_wrist", "cam_right_wrist", "cam_low"))
    with pytest.raises(InputError, match=r"feeds camera slot\(s\) \['cam_high', 'cam_left_wrist'\]"):
        layout.check_model(("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"))
