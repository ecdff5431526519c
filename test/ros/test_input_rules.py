"""Frames that are well-formed but cannot be meant: too small, larger than the camera's bound; the PNG/JPEG header
gives a compressed frame's size before decoding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pi05_ros.ros.conversions import ConversionError
from pi05_ros.ros.input_rules import (
    DEFAULT_MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    FrameBounds,
    compressed_frame_size,
    compressed_size_before_decoding,
)
from pi05_ros.ros.settings import CameraConfig


def encoded(width: int, height: int, ext: str, **params: int) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    flags = [v for item in params.items() for v in (getattr(cv2, item[0]), item[1])]
    ok, data = cv2.imencode(ext, pixels, flags)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(("width", "height"), [(1, 1), (15, 480), (640, 15), (0, 0)])
def test_frames_under_the_minimum_side_are_refused(width: int, height: int) -> None:
    with pytest.raises(ConversionError, match=f"frame is {width}x{height}, smaller than 16 px on a side"):
        FrameBounds("base_image").check(width, height)


@pytest.mark.parametrize(("width", "height"), [(4000, 3000), (2049, 100), (100, 2049)])
def test_frames_over_the_camera_bound_are_refused_naming_its_parameters(width: int, height: int) -> None:
    with pytest.raises(ConversionError, match=rf"frame is {width}x{height}, larger than camera.wrist.max_width x "
                                              r"max_height = 2048x2048.*raise camera.wrist.max_width/max_height"):
        FrameBounds("wrist").check(width, height)


def test_frames_within_the_bounds_pass_and_bounds_follow_the_parameters() -> None:
    bounds = FrameBounds("cam")
    for width, height in ((16, 16), (640, 480), (1920, 1080), (2048, 2048), (1080, 1920)):
        bounds.check(width, height)
    raised = FrameBounds("cam", max_width=4000, max_height=3000)
    raised.check(4000, 3000)
    assert raised.max_buffer_bytes == 4000 * 3000 * 3
    assert MIN_IMAGE_SIDE == 16 and DEFAULT_MAX_IMAGE_SIDE == 2048
    # settings.py keeps the same defaults without importing cv2
    assert (CameraConfig("a", "b", "raw").max_width, CameraConfig("a", "b", "raw").max_height) == (2048, 2048)


@pytest.mark.parametrize(
    ("ext", "params"),
    [(".png", {}), (".jpg", {}), (".jpg", {"IMWRITE_JPEG_PROGRESSIVE": 1}), (".jpg", {"IMWRITE_JPEG_OPTIMIZE": 1})],
)
@pytest.mark.parametrize(("width", "height"), [(640, 480), (17, 3001), (4000, 30)])
def test_header_size_equals_the_decoded_size(ext: str, params: dict, width: int, height: int) -> None:
    data = encoded(width, height, ext, **params)
    kind = "png" if ext == ".png" else "jpeg"
    assert compressed_frame_size(data, kind) == (width, height)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[:2] == (height, width)
    # also from the array.array rclpy hands over
    import array

    assert compressed_frame_size(array.array("B", data), kind) == (width, height)


def test_jpeg_header_found_past_app_segments() -> None:
    jpeg = encoded(64, 48, ".jpg")
    app1 = b"\xff\xe1" + (2 + 5000).to_bytes(2, "big") + bytes(5000)  # e.g. EXIF before the frame header
    assert compressed_frame_size(jpeg[:2] + app1 + jpeg[2:], "jpeg") == (64, 48)


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"", "png"), (b"\x89PNG\r\n\x1a\n" + bytes(4), "png"), (b"not a png at all, no", "png"), (b"\xff\xd8", "jpeg"),
     (b"\xff\xd8\xff\xda\x00\x02", "jpeg"), (b"\xff\xd8\x00\x00\x00\x00", "jpeg"), (b"GIF89a" + bytes(20), "jpeg")],
)
def test_header_without_a_size_gives_none(data: bytes, kind: str) -> None:
    assert compressed_frame_size(data, kind) is None


def test_a_compressed_frame_is_sized_by_what_its_data_is_and_refused_undecoded_when_it_cannot_be() -> None:
    """The decoder ignores the format field, so the header is read as the data says: a PNG sent as "jpeg" is still
    sized (and a 140 KB one can hold 12000x12000 pixels, 432 MB decoded); data that is neither, or whose header
    has no size, is refused before anything is decoded."""
    from test_conversions import png_header_only

    bounds = FrameBounds("front")
    assert compressed_size_before_decoding(encoded(64, 48, ".png"), bounds) == (64, 48)
    assert compressed_size_before_decoding(encoded(64, 48, ".jpg"), bounds) == (64, 48)
    with pytest.raises(ConversionError, match="frame is 12000x12000, larger than camera.front.max_width"):
        compressed_size_before_decoding(png_header_only(12000, 12000), bounds)
    ok, bmp = cv2.imencode(".bmp", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ConversionError, match=r"neither PNG nor JPEG \(its first bytes 424d"):
        compressed_size_before_decoding(bmp.tobytes(), bounds)
    with pytest.raises(ConversionError, match="the jpeg data's header gives no image size"):
        compressed_size_before_decoding(b"\xff\xd8\xff\xda\x00\x02", bounds)
