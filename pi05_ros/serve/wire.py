"""openpi's wire format: msgpack, with numpy arrays and scalars as tagged maps (what `openpi-client` sends).

    array  -> {b"__ndarray__": True, b"data": raw C-order bytes, b"dtype": dtype.str ("<f4", "|u1"), b"shape": [..]}
    scalar -> {b"__npgeneric__": True, b"data": the Python value, b"dtype": dtype.str}

Decoded arrays are read-only views on the received bytes. Object, void and complex dtypes are refused both
ways (an object array read from raw bytes would be pointers into nowhere). Everything a client can get wrong
raises `WireError` with the reason.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from pi05_ros.engine.errors import Pi05Error

_REFUSED_KINDS = "OVc"  # object, void (structured/raw), complex: openpi refuses the same
# An observation is a few maps (the message, its images, each array's tag map) and short lists. A frame within the
# size limit can still hold ~10^5 tiny maps, and decoding each costs a Python call on the server's event loop
# (1.7 s measured for 150k 1x1x3 images in 7.9 MiB), stalling every other client: such frames are refused early.
MAX_MAPS = 4096  # maps in one frame, nested ones included
MAX_MAP_LEN = 1024  # entries in one map
MAX_LIST_LEN = 65536  # items in one list (a state sent as a list, not an array)


class WireError(Pi05Error, ValueError):
    """A frame that is not openpi's msgpack-numpy encoding of a map."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in _REFUSED_KINDS:
        raise WireError(f"cannot send an array of dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode a {type(obj).__name__} in openpi's msgpack format")


def _dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        raise WireError(f"array dtype must be a numpy dtype string such as '<f4', got {type(raw).__name__}")
    try:
        dtype = np.dtype(raw)
    except TypeError as exc:
        raise WireError(f"unknown array dtype {raw!r}") from exc
    if dtype.kind in _REFUSED_KINDS:
        raise WireError(f"arrays of dtype {dtype} are not accepted (object, void and complex are refused)")
    return dtype


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        data, shape = obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes):
            raise WireError("array data must be msgpack bin (raw bytes)")
        if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WireError(f"array shape must be a list of non-negative integers, got {shape!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(data) != expected:
            raise WireError(f"array of shape {list(shape)} and dtype {dtype} needs {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as exc:
            raise WireError(f"bad numpy scalar of dtype {dtype}: {exc}") from exc
    return obj


def pack(obj: Any) -> bytes:
    """`obj` (maps, lists, str, numbers, numpy arrays and scalars) as one msgpack frame."""
    return msgpack.packb(obj, default=_encode)


def unpack(frame: bytes) -> Any:
    """One msgpack frame back into Python objects, numpy arrays decoded. Raises WireError (also for frames of more
    than MAX_MAPS maps, maps of more than MAX_MAP_LEN entries or lists of more than MAX_LIST_LEN items)."""
    maps = 0

    def decode(obj: dict) -> Any:
        nonlocal maps
        maps += 1
        if maps > MAX_MAPS:
            raise WireError(f"the frame holds more than {MAX_MAPS} maps; an observation needs a few dozen")
        return _decode(obj)

    try:
        return msgpack.unpackb(frame, object_hook=decode, max_map_len=MAX_MAP_LEN, max_array_len=MAX_LIST_LEN)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData and FormatError are ValueErrors
        raise WireError(f"the frame is not valid msgpack ({type(exc).__name__}: {exc})") from exc
