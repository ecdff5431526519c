"""Camera images -> the model's 224x224 input in [-1, 1].

Resize-with-pad keeps the aspect ratio and centres the picture on black (uint8 0, i.e. -1.0 after scaling),
as openpi does. No ImageNet mean/std: Pi0.5's SigLIP sees `x / 255 * 2 - 1`.
"""

from __future__ import annotations

import cv2
import numpy as np

from pi05_ros.engine.errors import InputError


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


def resize_with_pad(image: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 HxWx3 -> uint8 size x size x 3, aspect kept, zero padding split evenly (extra pixel after)."""
    image = validate_image(image)
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    ratio = max(w / size, h / size)
    new_w, new_h = max(1, int(w / ratio)), max(1, int(h / ratio))
    # INTER_AREA averages when shrinking (anti-aliased, like PIL's bilinear with support); bilinear when growing.
    interp = cv2.INTER_AREA if new_w < w else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def to_model_range(image_u8: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1] (the exact expression openpi uses: x / 255 * 2 - 1)."""
    return (image_u8.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)


def prepare_image(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Any-size uint8 RGB image -> float32 3 x size x size in [-1, 1]."""
    return to_model_range(resize_with_pad(image, size))
