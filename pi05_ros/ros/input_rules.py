"""Rules for camera frames that are well-formed but cannot be meant (docs/ros_node.md, "Input rules"), checked in
the subscription callback before a frame is copied anywhere, so a huge frame never reaches the input buffers.

- A frame smaller than MIN_IMAGE_SIDE pixels on a side (1x1 placeholders of a broken driver or bridge) is refused:
  the model would see one colour stretched over 224x224.
- A frame larger than its camera's `camera.<name>.max_width` x `max_height` is refused: these bound what one
  camera's buffers can hold (three frames of max_width * max_height * 3 bytes, ros/inputs.py). A compressed frame's
  size is read from its PNG/JPEG header, before decoding; one that is neither, or whose header has no size, is
  refused undecoded.

Joint values (NaN, inf, beyond `max_abs_joint_position`) and duplicate joint names are judged where the joints are
selected (conversions.JointSelector); stamps by execution/stamps.py. No ROS imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from pi05_ros.ros.conversions import ConversionError

MIN_IMAGE_SIDE = 16  # pixels; the model's input is 224x224
DEFAULT_MAX_IMAGE_SIDE = 2048  # default camera.<name>.max_width and max_height (1080p, 1200p and 2048x1536 fit)
MAX_IMAGE_SIDE_LIMIT = 16384  # the largest max_width / max_height a parameter may set

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): all of 0xC0..0xCF except DHT, JPG and DAC.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI: markers without a length


@dataclass(frozen=True)
class FrameBounds:
    """The sizes a camera's frames may have."""

    camera: str
    max_width: int = DEFAULT_MAX_IMAGE_SIDE
    max_height: int = DEFAULT_MAX_IMAGE_SIDE
    min_side: int = MIN_IMAGE_SIDE

    def check(self, width: int, height: int) -> None:
        """Raise ConversionError naming the cause and the fix when a `width` x `height` frame is refused."""
        if width < self.min_side or height < self.min_side:
            raise ConversionError(
                f"frame is {width}x{height}, smaller than {self.min_side} px on a side: the model would see "
                f"{width * height} pixel(s) stretched over 224x224. The camera driver or a bridge sends placeholder "
                "images; fix it or remap this input to the right camera")
        if width > self.max_width or height > self.max_height:
            raise ConversionError(
                f"frame is {width}x{height}, larger than camera.{self.camera}.max_width x max_height = "
                f"{self.max_width}x{self.max_height}; the model sees 224x224, so publish smaller frames (the driver's "
                f"resolution or an image_proc resize), or raise camera.{self.camera}.max_width/max_height "
                "(each of this camera's three buffers then holds up to max_width*max_height*3 bytes)")

    @property
    def max_buffer_bytes(self) -> int:
        """The most one buffer of this camera holds (RGB, one byte a channel)."""
        return self.max_width * self.max_height * 3


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    return memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")


def compressed_size_before_decoding(data: bytes | bytearray | memoryview, bounds: FrameBounds) -> tuple[int, int]:
    """(width, height) of a compressed frame from its header, checked against `bounds`, before it is decoded.
    The decoder goes by the data, not the message's format field, so the header is read in the format the data's
    first bytes say; data that is not PNG or JPEG, or whose header gives no size, is refused here (it would be
    decoded whole first: a 140 KB PNG can hold 12000x12000 pixels)."""
    head = bytes(_byte_view(data)[:8])
    kind = "png" if head == _PNG_SIGNATURE else "jpeg" if head[:2] == b"\xff\xd8" else None
    if kind is None:
        raise ConversionError("the compressed frame's data is neither PNG nor JPEG (its first bytes "
                              f"{head.hex()}); publish jpeg or png, or switch this camera's transport to 'raw'")
    size = compressed_frame_size(data, kind)
    if size is None:
        raise ConversionError(f"the {kind} data's header gives no image size (truncated or corrupt, or a JPEG whose "
                              "height comes in a DNL marker); the frame is not decoded. Publish standard "
                              f"{kind} frames")
    bounds.check(*size)
    return size


def compressed_frame_size(data: bytes | bytearray | memoryview, kind: str) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG or JPEG (`kind` 'png' or 'jpeg'), without decoding it; None when
    the header does not say (not that format, truncated, or a JPEG whose height comes later in a DNL marker)."""
    view = _byte_view(data)
    if kind == "png":
        # signature, then the IHDR chunk: length (4), "IHDR" (4), width (4), height (4), big-endian
        if len(view) < 24 or bytes(view[:8]) != _PNG_SIGNATURE or bytes(view[12:16]) != b"IHDR":
            return None
        width, height = int.from_bytes(view[16:20], "big"), int.from_bytes(view[20:24], "big")
        return (width, height) if width and height else None
    if kind == "jpeg":
        return _jpeg_frame_size(view)
    return None


def _jpeg_frame_size(view: memoryview) -> tuple[int, int] | None:
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= len(view):
        if view[i] != 0xFF:
            return None  # not at a marker: corrupt (entropy-coded data starts only after SOS, past the frame header)
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        length = view[i + 2] << 8 | view[i + 3]
        if marker in _JPEG_SOF_MARKERS:
            if i + 9 > len(view):
                return None
            height = view[i + 5] << 8 | view[i + 6]
            width = view[i + 7] << 8 | view[i + 8]
            return (width, height) if width and height else None
        if marker == 0xDA or length < 2:  # start of scan before any frame header, or a broken length
            return None
        i += 2 + length
    return None
