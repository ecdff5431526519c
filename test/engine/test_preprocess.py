"""Images -> 224x224 in [-1, 1]: resize-with-pad geometry, value range, and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.preprocess import (
    PreparedView,
    prepare_image,
    prepare_view,
    resize_views,
    resize_with_pad,
    to_model_range,
)


def test_square_224_is_untouched() -> None:
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_with_pad(img), img)


def test_wide_image_is_letterboxed_top_and_bottom() -> None:
    img = np.full((480, 640, 3), 200, dtype=np.uint8)
    out = resize_with_pad(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 640x480 -> 224x168: 56 rows of padding split 28 above, 28 below
    assert (out[:28] == 0).all() and (out[-28:] == 0).all()
    assert (out[28:196] == 200).all()


def test_tall_image_is_pillarboxed_with_extra_column_on_the_right() -> None:
    img = np.full((300, 101, 3), 50, dtype=np.uint8)
    out = resize_with_pad(img)
    new_w = int(101 / (300 / 224))  # 75 columns, 149 of padding: 74 left, 75 right
    assert (out[:, :74] == 0).all() and (out[:, 74:74 + new_w] == 50).all() and (out[:, 74 + new_w:] == 0).all()


def test_small_image_is_upscaled() -> None:
    img = np.full((112, 112, 3), 9, dtype=np.uint8)
    assert (resize_with_pad(img) == 9).all()


def test_value_range_is_openpi_expression() -> None:
    img = np.array([[[0, 255, 128]]], dtype=np.uint8)
    out = to_model_range(img)
    assert out.shape == (3, 1, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0, 0], np.array([0, 255, 128], np.float32) / 255.0 * 2.0 - 1.0)
    padded = prepare_image(np.full((100, 200, 3), 255, dtype=np.uint8))
    assert padded.min() == -1.0 and padded.max() == 1.0  # padding is black = -1 after scaling


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((10, 10, 3), np.float32), "expected uint8"),
    (np.zeros((10, 10), np.uint8), "HxWx3"),
    (np.zeros((10, 10, 4), np.uint8), "HxWx3"),
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((3, 480, 640), np.uint8), r"channels-first \(3xHxW\); transpose it to HxWx3"),
    (np.zeros((480, 640, 4), np.uint8), "convert grayscale/RGBA/BGR"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images_are_rejected_clearly(image, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InputError, match=message):
        resize_with_pad(image)


def test_each_family_keeps_the_geometry_and_lerobot_keeps_floats() -> None:
    img = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for method in ("openpi_client", "openpi_server"):
        out = resize_with_pad(img, 224, method)
        assert out.dtype == np.uint8 and (out[:28] == 0).all() and (out[-28:] == 0).all(), method
    lerobot = resize_with_pad(img, 224, "lerobot")  # float32 in model range, never rounded to uint8
    assert lerobot.dtype == np.float32 and lerobot.shape == (224, 224, 3)
    assert (lerobot[:28] == -1.0).all() and (lerobot[-28:] == -1.0).all()
    assert -1.0 <= lerobot.min() and lerobot.max() <= 1.0
    assert not np.allclose(lerobot * 127.5 + 127.5, np.rint(lerobot * 127.5 + 127.5))  # between uint8 levels
    square = img[:224, :224]
    np.testing.assert_array_equal(resize_with_pad(square, 224, "lerobot"), square)  # LeRobot resizes only others
    with pytest.raises(CheckpointError, match="unknown image resize 'area'"):
        resize_with_pad(img, 224, "area")


@pytest.mark.parametrize("method", ["openpi_client", "openpi_server", "lerobot"])
def test_resize_views_equals_each_view_alone(method: str) -> None:
    """Views resized together (in threads for PIL) are each exactly what resize_with_pad gives, in slot order, with
    missing views kept missing."""
    rng = np.random.default_rng(4)
    views = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), None,
             rng.integers(0, 256, (300, 200, 3), dtype=np.uint8), rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    together = resize_views(views, 224, method)
    assert together[1] is None and len(together) == 4
    for image, resized in zip(views, together, strict=True):
        if image is not None:
            np.testing.assert_array_equal(resized, resize_with_pad(image, 224, method))


@pytest.mark.parametrize("method", ["openpi_client", "openpi_server", "lerobot"])
def test_prepared_views_pass_through_resize_views(method: str) -> None:
    """A view prepared earlier (prepare_view) is taken as it is beside views resized now, in slot order."""
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), rng.integers(0, 256, (720, 1280, 3), np.uint8)]
    early = prepare_view(frames[0], 224, method, "base")
    assert isinstance(early, PreparedView) and early.nbytes == early.pixels.nbytes
    mixed = resize_views([early, None, frames[1]], 224, method, ["base", "left", "right"])
    assert mixed[0] is early.pixels and mixed[1] is None
    np.testing.assert_array_equal(mixed[2], resize_with_pad(frames[1], 224, method))
    np.testing.assert_array_equal(early.pixels, resize_with_pad(frames[0], 224, method))
    with pytest.raises(InputError, match="base: the view was prepared for 224x224"):
        resize_views([early], 112, method, ["base"])
    with pytest.raises(InputError, match="right: expected uint8"):
        resize_views([early, frames[1].astype(np.float32)], 224, method, ["base", "right"])


def test_views_already_at_the_model_size_skip_the_resize_threads(monkeypatch) -> None:
    """Two 224x224 views (a server's usual request) are validated and passed on in the calling thread; views that
    need resizing still go to the pool, and a bad view is still refused."""
    from pi05_ros.engine import preprocess

    class CountingPool:
        def __init__(self) -> None:
            self.maps = 0

        def map(self, fn, items):  # noqa: ANN001, ANN202
            self.maps += 1
            return [fn(item) for item in items]

    pool = CountingPool()
    monkeypatch.setattr(preprocess, "_pool", pool)
    rng = np.random.default_rng(6)
    ready = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    out = resize_views(ready, 224, "openpi_client")
    assert pool.maps == 0 and all(o is r for o, r in zip(out, ready, strict=True))
    with pytest.raises(InputError, match="expected uint8"):
        resize_views([ready[0], ready[1].astype(np.float32)], 224, "openpi_client")
    big = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(2)]
    resize_views(big, 224, "openpi_client")
    assert pool.maps == 1
