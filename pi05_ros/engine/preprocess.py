"""Camera images -> the model's 224x224 input in [-1, 1], resized the way the checkpoint's family resizes.

Every family keeps the aspect ratio and centres the picture on black (-1.0 after scaling), but each resamples
differently, and a model sees best what it was trained on: openpi's clients and its server (transforms.ResizeImages)
use openpi_client's PIL bilinear, LeRobot torch bilinear without antialias on floats (RESIZE_METHODS; the default
per family is chosen in engine/conventions.py). No ImageNet mean/std: Pi0.5's SigLIP sees `x / 255 * 2 - 1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pi05_ros.engine.errors import CheckpointError, InputError


def validate_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check that `image` is uint8 HxWx3 RGB with pixels; return it as a C-contiguous array."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"{name}: expected uint8 pixels, got {image.dtype}; convert with (x * 255).astype(np.uint8) "
                         "for float images in [0, 1]")
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3:
        raise InputError(f"{name}: expected an HxWx3 RGB image, got shape {image.shape}, which looks channels-first "
                         "(3xHxW); transpose it to HxWx3 first: image.transpose(1, 2, 0)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"{name}: expected an HxWx3 RGB image, got shape {image.shape}; "
                         "convert grayscale/RGBA/BGR images to RGB first")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name}: the image is empty (shape {image.shape})")
    return np.ascontiguousarray(image)


# The resize-with-pad of each family, by name; every one keeps the aspect ratio, scales by
# ratio = max(w / size, h / size) to int(h / ratio) x int(w / ratio), and centres the picture (the extra row or
# column of padding at the bottom / right) on black (-1 in model range).
OPENPI_CLIENT = "openpi_client"  # openpi_client.image_tools.resize_with_pad: PIL bilinear on uint8 (antialiased)
# openpi's server-side transforms.ResizeImages calls the same openpi_client function: the same resize, a second name
OPENPI_SERVER = "openpi_server"
LEROBOT = "lerobot"  # LeRobot PI05 _preprocess_images: torch bilinear, no antialias, on float [0, 1]
RESIZE_METHODS = (OPENPI_CLIENT, OPENPI_SERVER, LEROBOT)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) of the picture inside the padded square, truncated as every family truncates."""
    ratio = max(width / size, height / size)
    return max(1, int(height / ratio)), max(1, int(width / ratio))


def _pad_to_square(resized: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size, 3), dtype=resized.dtype)
    new_h, new_w = resized.shape[:2]
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def _resize_pil(image: np.ndarray, size: int) -> np.ndarray:
    """PIL's BILINEAR resample (a triangle filter whose support widens when shrinking), as openpi's clients do."""
    from PIL import Image

    new_h, new_w = resized_shape(*image.shape[:2], size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR))
    return _pad_to_square(resized, size)


def _resize_lerobot(image: np.ndarray, size: int) -> np.ndarray:
    """LeRobot's order of operations: uint8 / 255 -> float [0, 1], torch bilinear (align_corners=False, no
    antialias) on the channels-last batch, clamp to [0, 1], centred pad with 0, then * 2 - 1.
    Returns float32 HxWx3 in [-1, 1]: the resized picture is never rounded to uint8."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    new_h, new_w = resized_shape(*image.shape[:2], size)
    x = torch.from_numpy(image).to(torch.float32).div(255)[None].permute(0, 3, 1, 2)
    resized = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    pad_h0, rem_h = divmod(size - new_h, 2)
    pad_w0, rem_w = divmod(size - new_w, 2)
    padded = F.pad(resized, (pad_w0, pad_w0 + rem_w, pad_h0, pad_h0 + rem_h), mode="constant", value=0.0)
    return (padded.permute(0, 2, 3, 1)[0] * 2.0 - 1.0).numpy()


_RESIZERS = {OPENPI_CLIENT: _resize_pil, OPENPI_SERVER: _resize_pil, LEROBOT: _resize_lerobot}


def resize_with_pad(image: np.ndarray, size: int = 224, method: str = OPENPI_CLIENT) -> np.ndarray:
    """uint8 HxWx3 -> size x size x 3 by the family's own resize-with-pad (RESIZE_METHODS).

    An image already size x size is returned as it is (uint8). Otherwise the openpi methods return uint8 and
    `lerobot` returns float32 in [-1, 1] (LeRobot resizes floats and never rounds them).
    """
    image = validate_image(image)
    if method not in _RESIZERS:
        raise CheckpointError(f"unknown image resize {method!r}; choose one of {', '.join(RESIZE_METHODS)}")
    if image.shape[:2] == (size, size):
        return image
    return _RESIZERS[method](image, size)


@dataclass(frozen=True)
class PreparedView:
    """A camera image already resized by one policy's resize (`prepare_view`), so that `resize_views` passes it on
    unchanged: the ROS node resizes each frame when it arrives, off the inference's critical path."""

    pixels: np.ndarray  # size x size x 3: uint8, or float32 in [-1, 1] from the lerobot resize
    size: int
    method: str
    source_shape: tuple[int, int]  # (height, width) of the frame it came from

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes


def prepare_view(image: np.ndarray, size: int = 224, method: str = OPENPI_CLIENT,
                 name: str = "image") -> PreparedView:
    """Validate and resize one camera image now (`resize_with_pad`), for an observation assembled later. The view
    owns its pixels (an image already size x size is copied), so the caller may reuse `image`'s array."""
    image = validate_image(image, name)
    pixels = resize_with_pad(image, size, method)
    if np.shares_memory(pixels, image):
        pixels = pixels.copy()
    return PreparedView(pixels, size, method, (image.shape[0], image.shape[1]))


def _take_prepared(view: PreparedView, size: int, method: str, name: str) -> np.ndarray:
    if (view.size, view.method) != (size, method):
        raise InputError(f"{name}: the view was prepared for {view.size}x{view.size} by the {view.method!r} resize, "
                         f"but this model needs {size}x{size} by {method!r}; prepare it with this policy's "
                         "prepare_view (or pass the camera image itself)")
    return view.pixels


def _resize_one(image: np.ndarray | PreparedView, size: int, method: str, name: str) -> np.ndarray:
    if isinstance(image, PreparedView):
        return _take_prepared(image, size, method, name)
    return resize_with_pad(validate_image(image, name), size, method)


# Views resized at once: PIL releases the GIL while it resamples, so two or three cameras resize in parallel. On the
# 2-core dev box (docs/benchmarks.md §37) two 640x480 views took 3.3-3.4 -> 2.3-2.5 ms, three 1280x720 views
# 11.1-11.6 -> 7.8-8.0 ms; LeRobot's torch resize already uses torch's threads and gained little or lost: serial.
_PARALLEL_METHODS = (OPENPI_CLIENT, OPENPI_SERVER)
_pool: ThreadPoolExecutor | None = None


def needs_resize(image: np.ndarray | PreparedView, size: int) -> bool:
    """Whether `image` is still to be resized to size x size (a PreparedView was resized on arrival; anything not
    shaped like an image is left to `validate_image` to refuse, on the resizing path)."""
    return not isinstance(image, PreparedView) and getattr(image, "shape", (0, 0))[:2] != (size, size)


def resize_views(images: Sequence[np.ndarray | PreparedView | None], size: int = 224, method: str = OPENPI_CLIENT,
                 names: Sequence[str] | None = None) -> list[np.ndarray | None]:
    """Validate and `resize_with_pad` each view (None stays None; a PreparedView of this size and method is used as
    it is), in parallel threads where that was measured to pay. `names` name the views in error messages."""
    global _pool
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    todo = [(image, name) for image, name in zip(images, names, strict=True) if image is not None]
    # Views already at the model's size pass through: handing them to the pool would cost two thread hand-offs
    # (0.12-0.14 -> 0.03-0.06 ms per Policy.prepare of two 224x224 views on the 2-core dev box, docs/benchmarks.md
    # §53) for nothing; a server's clients often send 224x224.
    to_resize = sum(needs_resize(image, size) for image, _ in todo)
    if to_resize < 2 or method not in _PARALLEL_METHODS:
        resized = iter([_resize_one(image, size, method, name) for image, name in todo])
    else:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pi05_resize")
        resized = iter(list(_pool.map(lambda item: _resize_one(item[0], size, method, item[1]), todo)))
    return [None if image is None else next(resized) for image in images]


def to_model_range(image: np.ndarray) -> np.ndarray:
    """HxWx3 -> float32 3xHxW in [-1, 1]: uint8 by the exact expression openpi uses (x / 255 * 2 - 1); a float32
    image (the lerobot resize's output) is already in model range."""
    if image.dtype == np.uint8:
        return (image.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)
    return np.ascontiguousarray(image, dtype=np.float32).transpose(2, 0, 1)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A model-range float32 HxWx3 image rounded to uint8 (for paths that stage uint8: the fast pipeline,
    whose bf16 images are coarser than this rounding); uint8 passes through."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint((image.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def prepare_image(image: np.ndarray, size: int = 224, method: str = OPENPI_CLIENT) -> np.ndarray:
    """Any-size uint8 RGB image -> float32 3 x size x size in [-1, 1]."""
    return to_model_range(resize_with_pad(image, size, method))
