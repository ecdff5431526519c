"""Image / CompressedImage / JointState -> numpy, byte for byte, on real sensor_msgs messages; and an action
chunk -> ActionChunk / JointTrajectory messages."""

from __future__ import annotations

import re
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from ros_harness import make_image
from sensor_msgs.msg import CompressedImage, Image, JointState

from pi05_ros.ros.conversions import (
    ConversionError,
    JointSelector,
    action_chunk_message,
    compressed_to_rgb,
    image_shape,
    image_to_rgb,
    image_view,
    joint_trajectory_message,
    ns_to_stamp,
    stamp_to_ns,
)

RNG = np.random.default_rng(7)


def random_rgb(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def padded_image(pixels_in_encoding: np.ndarray, encoding: str, pad: int) -> Image:
    """Build the message by hand (independently of the harness): each row followed by `pad` random bytes."""
    height, width = pixels_in_encoding.shape[:2]
    rows = pixels_in_encoding.reshape(height, -1)
    padding = RNG.integers(0, 256, (height, pad), dtype=np.uint8)
    data = np.concatenate([rows, padding], axis=1)
    return Image(height=height, width=width, encoding=encoding, step=data.shape[1], data=data.tobytes())


def expected_rgb(pixels_in_encoding: np.ndarray, encoding: str) -> np.ndarray:
    """The RGB the conversion must produce, written out per encoding with explicit channel indices."""
    p = pixels_in_encoding
    if encoding == "rgb8":
        return np.stack([p[..., 0], p[..., 1], p[..., 2]], axis=-1)
    if encoding == "bgr8":
        return np.stack([p[..., 2], p[..., 1], p[..., 0]], axis=-1)
    if encoding == "rgba8":
        return np.stack([p[..., 0], p[..., 1], p[..., 2]], axis=-1)
    if encoding == "bgra8":
        return np.stack([p[..., 2], p[..., 1], p[..., 0]], axis=-1)
    if encoding == "mono8":
        return np.stack([p[..., 0]] * 3, axis=-1)
    raise AssertionError(encoding)


CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


@pytest.mark.parametrize("encoding", list(CHANNELS))
@pytest.mark.parametrize("pad", [0, 1, 13])
def test_image_converts_byte_for_byte_with_any_step(encoding: str, pad: int) -> None:
    height, width = 37, 53  # odd sizes: no accidental alignment
    pixels = RNG.integers(0, 256, (height, width, CHANNELS[encoding]), dtype=np.uint8)
    msg = padded_image(pixels, encoding, pad)
    assert msg.step == width * CHANNELS[encoding] + pad

    rgb = image_to_rgb(msg)

    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, expected_rgb(pixels, encoding))  # exact: a pure byte shuffle


@pytest.mark.parametrize("encoding", list(CHANNELS))
def test_image_view_is_zero_copy_and_skips_row_padding(encoding: str) -> None:
    pixels = RNG.integers(0, 256, (9, 11, CHANNELS[encoding]), dtype=np.uint8)
    msg = padded_image(pixels, encoding, pad=5)
    view = image_view(msg)
    np.testing.assert_array_equal(view, pixels)
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8)), "view must not copy the message data"


def test_image_to_rgb_writes_into_a_matching_buffer_and_replaces_a_wrong_one() -> None:
    pixels = random_rgb(20, 30)
    msg = padded_image(pixels[:, :, ::-1], "bgr8", pad=2)
    buffer = np.zeros((20, 30, 3), np.uint8)
    assert image_to_rgb(msg, buffer) is buffer
    np.testing.assert_array_equal(buffer, pixels)
    wrong = np.zeros((10, 10, 3), np.uint8)
    out = image_to_rgb(msg, wrong)
    assert out is not wrong
    np.testing.assert_array_equal(out, pixels)


def test_harness_images_match_the_conversion() -> None:
    # The node tests publish make_image(); prove it means what they assume, padded rows included.
    for encoding in CHANNELS:
        msg = make_image(6, 7, encoding, pad=3)
        rgb = image_to_rgb(msg)
        reference = image_to_rgb(make_image(6, 7, "rgb8"))
        if encoding == "mono8":
            reference = np.repeat(reference[:, :, :1], 3, axis=2)
        np.testing.assert_array_equal(rgb, reference)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"encoding": "rgb16"}, "encoding 'rgb16' is not supported"),
        ({"encoding": "yuv422"}, "publish one of rgb8, bgr8, rgba8, bgra8, mono8"),
        ({"step": 29}, r"shorter than width\*channels"),
        ({"height": 11}, r"height\*step = 11\*30 = 330"),
        ({"width": 0}, "empty"),
    ],
)
def test_image_errors_name_cause_and_fix(change: dict, expected: str) -> None:
    msg = padded_image(random_rgb(10, 10), "rgb8", pad=0)
    for field, value in change.items():
        setattr(msg, field, value)
    with pytest.raises(ConversionError, match=expected):
        image_to_rgb(msg)


def test_image_with_truncated_data_is_rejected() -> None:
    msg = padded_image(random_rgb(10, 10), "rgb8", pad=4)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(ConversionError, match=r"image data is 339 bytes but height\*step = 10\*34 = 340"):
        image_shape(msg)


def test_png_decodes_byte_for_byte() -> None:
    pixels = random_rgb(31, 45)
    ok, png = cv2.imencode(".png", pixels[:, :, ::-1])  # OpenCV encodes BGR
    assert ok
    msg = CompressedImage(format="png", data=png.tobytes())
    np.testing.assert_array_equal(compressed_to_rgb(msg), pixels)  # png is lossless: exact


def test_grayscale_png_becomes_three_equal_channels() -> None:
    gray = RNG.integers(0, 256, (12, 17), dtype=np.uint8)
    ok, png = cv2.imencode(".png", gray)
    assert ok
    rgb = compressed_to_rgb(CompressedImage(format="png", data=png.tobytes()))
    np.testing.assert_array_equal(rgb, np.stack([gray] * 3, axis=-1))


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "JPG"])
def test_jpeg_equals_the_decoder_output_in_rgb_order(fmt: str) -> None:
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)  # smooth: small jpeg error
    ok, jpeg = cv2.imencode(".jpg", pixels[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    rgb = compressed_to_rgb(CompressedImage(format=fmt, data=jpeg.tobytes()))
    decoded_bgr = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(rgb, decoded_bgr[:, :, ::-1])  # exact vs. the decoder: only channel order
    # and close to the original: quality-95 jpeg of a smooth image stays within a few levels on average
    assert np.abs(rgb.astype(int) - pixels.astype(int)).mean() < 3.0


def test_compressed_into_buffer() -> None:
    pixels = random_rgb(8, 9)
    ok, png = cv2.imencode(".png", pixels[:, :, ::-1])
    buffer = np.empty((8, 9, 3), np.uint8)
    assert compressed_to_rgb(CompressedImage(format="png", data=png.tobytes()), buffer) is buffer
    np.testing.assert_array_equal(buffer, pixels)


@pytest.mark.parametrize(
    ("fmt", "data", "expected"),
    [
        ("h264", b"\x00\x01", "format 'h264' is not supported"),
        ("png", b"", "has no data"),
        ("jpeg", b"definitely not a jpeg", "could not decode"),
    ],
)
def test_compressed_errors(fmt: str, data: bytes, expected: str) -> None:
    with pytest.raises(ConversionError, match=expected):
        compressed_to_rgb(CompressedImage(format=fmt, data=data))


def png_header_only(width: int, height: int) -> bytes:
    """A 65-byte PNG whose header claims width x height (8-bit RGB) and whose pixel data is empty."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_frame_opencv_refuses_to_decode_is_a_conversion_error() -> None:
    """OpenCV raises (not returns None) for a header over its pixel limit; out of a callback that would end the
    node's executor thread."""
    with pytest.raises(ConversionError,
                       match="could not decode the 65-byte compressed image as jpeg: .*CV_IO_MAX_IMAGE_PIXELS"):
        compressed_to_rgb(CompressedImage(format="jpeg", data=png_header_only(40000, 40000)))


def test_joint_selector_orders_by_name_and_ignores_extra_joints() -> None:
    msg = JointState(name=["c", "x", "a", "b"], position=[3.0, 99.0, 1.0, 2.0])
    selector = JointSelector(["a", "b", "c"])
    out = np.empty(3, np.float32)
    assert selector.positions(msg, out) is out
    np.testing.assert_array_equal(out, np.array([1.0, 2.0, 3.0], np.float32))
    # The cached index map follows a change of the message's name order.
    msg2 = JointState(name=["a", "b", "c"], position=[4.0, 5.0, 6.0])
    np.testing.assert_array_equal(selector.positions(msg2), np.array([4.0, 5.0, 6.0], np.float32))


def test_joint_selector_without_names_takes_all_positions_in_message_order() -> None:
    msg = JointState(name=["q2", "q1"], position=[0.25, -0.5])
    values = JointSelector([]).positions(msg)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, np.array([0.25, -0.5], np.float32))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30, 1e39, -2e4])
def test_joint_selector_refuses_values_that_cannot_be_positions_naming_the_joint(value: float) -> None:
    msg = JointState(name=["x", "a", "b"], position=[0.0, 0.5, value])
    shown = "NaN" if value != value else f"{value:g}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1e39 overflows float32: it must be named, not cast with a RuntimeWarning
        expected = re.escape(f"b = {shown} not finite or beyond max_abs_joint_position 10000")
        with pytest.raises(ConversionError, match=expected):
            JointSelector(["a", "b"], max_abs_position=1e4).positions(msg)
        # no names configured: every position is used
        with pytest.raises(ConversionError, match=re.escape(f"b = {shown}")):
            JointSelector([], max_abs_position=1e4).positions(msg)


def test_joint_selector_takes_values_up_to_the_bound_and_ignores_unused_bad_ones() -> None:
    selector = JointSelector(["a", "b"], max_abs_position=1e4)
    msg = JointState(name=["a", "b", "unused"], position=[-1e4, 9999.5, float("nan")])
    np.testing.assert_array_equal(selector.positions(msg), np.array([-1e4, 9999.5], np.float32))


def test_joint_selector_names_every_bad_joint_up_to_five() -> None:
    names = [f"j{i}" for i in range(8)]
    msg = JointState(name=names, position=[float("nan")] * 8)
    with pytest.raises(ConversionError, match=r"j0 = NaN, j1 = NaN, j2 = NaN, j3 = NaN, j4 = NaN and 3 more"):
        JointSelector(names, max_abs_position=1.0).positions(msg)


def test_joint_selector_refuses_a_used_joint_named_twice() -> None:
    msg = JointState(name=["a", "b", "a", "c", "c"], position=[1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ConversionError, match=r"names joint\(s\) a \(at 0, 2\) more than once"):
        JointSelector(["b", "a"]).positions(msg)
    # A joint the state does not use may repeat: only the state's joints must be unambiguous.
    np.testing.assert_array_equal(JointSelector(["b"]).positions(msg), np.array([2.0], np.float32))
    # Without state_joint_names every position is used, so any repeated name is refused.
    with pytest.raises(ConversionError, match=r"a \(at 0, 2\), c \(at 3, 4\)"):
        JointSelector([]).positions(msg)
    # The verdict is cached per name list, and a good list afterwards works.
    good = JointState(name=["a", "b"], position=[7.0, 8.0])
    np.testing.assert_array_equal(JointSelector(["b", "a"]).positions(good), np.array([8.0, 7.0], np.float32))


@pytest.mark.parametrize(
    ("msg", "names", "expected"),
    [
        (JointState(name=["a", "b"], position=[1.0, 2.0]), ["a", "z"], r"lacks joint\(s\) z"),
        (JointState(name=["a", "b"], position=[1.0]), ["a"], "2 names but 1 positions"),
        (JointState(name=[], position=[]), [], "has no positions"),
        # without state_joint_names too: which value is which joint would be a guess
        (JointState(name=["a", "b", "c"], position=[1.0, 2.0]), [], "3 names but 2 positions"),
        (JointState(name=["a"], position=[1.0, 2.0, 3.0]), [], "1 names but 3 positions"),
    ],
)
def test_joint_selector_errors(msg: JointState, names: list[str], expected: str) -> None:
    with pytest.raises(ConversionError, match=expected):
        JointSelector(names).positions(msg)


def test_action_chunk_message_holds_the_actions_row_major_and_the_observation_stamp() -> None:
    actions = RNG.standard_normal((5, 3)).astype(np.float32)
    stamp = 1_700_000_000_123_456_789
    msg = action_chunk_message(actions, stamp_ns=stamp, joint_names=["a", "b", "c"], action_dt=0.066,
                               denoise_steps=10, latency_s=0.042, sequence=7, demo_model=True,
                               action_kinds=("velocity", "velocity", "position"))
    assert list(msg.action_kinds) == ["velocity", "velocity", "position"]
    assert (msg.horizon, msg.action_dim) == (5, 3) and list(msg.joint_names) == ["a", "b", "c"]
    np.testing.assert_array_equal(np.asarray(msg.actions, np.float32).reshape(5, 3), actions)
    assert stamp_to_ns(msg.header.stamp) == stamp and (msg.header.stamp.sec, msg.header.stamp.nanosec) == (
        1_700_000_000, 123_456_789)
    assert (msg.action_dt, msg.denoise_steps, msg.inference_latency, msg.sequence, msg.demo_model) == (
        0.066, 10, 0.042, 7, True)
    assert stamp_to_ns(ns_to_stamp(5)) == 5


def test_joint_trajectory_has_one_point_per_action_at_k_plus_one_dt() -> None:
    actions = RNG.standard_normal((4, 2)).astype(np.float32)
    trajectory = joint_trajectory_message(actions, ["j1", "j2"], 0.35)
    assert list(trajectory.joint_names) == ["j1", "j2"] and len(trajectory.points) == 4
    assert (trajectory.header.stamp.sec, trajectory.header.stamp.nanosec) == (0, 0)  # start on arrival
    for k, point in enumerate(trajectory.points):
        np.testing.assert_array_equal(np.asarray(point.positions), actions[k].astype(np.float64))
        assert (point.time_from_start.sec, point.time_from_start.nanosec) == divmod(round((k + 1) * 0.35e9), 10**9)
