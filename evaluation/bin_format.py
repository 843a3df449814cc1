"""insightface ``.bin`` verification files, read without running code from them.

A ``.bin`` is a pickle of ``(list of encoded images, list of is-same bools)``; images ``2i`` and ``2i+1``
form pair ``i``. :func:`load_bin_pickle` accepts only lists, tuples, bytes, bools and insightface's uint8
numpy buffers (rebuilt by local stand-ins, never by numpy); any other global, class or call is refused.
"""
from __future__ import annotations

import io
import os
import pickle

import numpy as np

from runtime.files import existing_file

from .errors import BinFormatError, DatasetError


class _Dtype:
    """Stand-in for ``numpy.dtype`` while unpickling: only uint8 and bool, nothing is executed."""

    def __init__(self, spec, align=False, copy=False):
        spec = spec.decode("latin1") if isinstance(spec, bytes) else spec
        if spec not in ("u1", "b1"):
            raise BinFormatError(f"numpy dtype {spec!r} (only uint8 image buffers are accepted)")
        self.spec = spec

    def __setstate__(self, state):
        if not isinstance(state, tuple) or not all(isinstance(v, (int, str, bytes, type(None))) for v in state):
            raise BinFormatError("unexpected numpy dtype state")


class _Array:
    """Stand-in for a 1-D (or N×1, as insightface writes them) uint8 ``numpy.ndarray`` holding an encoded
    image; becomes ``bytes``."""

    def __init__(self):
        self.data: bytes | None = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise BinFormatError("unexpected numpy array state")
        shape, dtype, _fortran, raw = state[-4:]
        if not isinstance(dtype, _Dtype) or dtype.spec != "u1":
            raise BinFormatError("numpy array of a dtype other than uint8")
        if not _is_buffer_shape(shape):
            raise BinFormatError(f"numpy array of shape {shape!r} (only 1-D or N×1 encoded image buffers)")
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != int(np.prod(shape)):
            raise BinFormatError("numpy array data does not match its shape")
        self.data = bytes(raw)


def _is_buffer_shape(shape) -> bool:
    """(n,), (n, 1) or (1, n): a flat byte buffer."""
    if not isinstance(shape, tuple) or not 1 <= len(shape) <= 2:
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape):
        return False
    return len(shape) == 1 or min(shape) <= 1


def _reconstruct(cls, shape, typecode):
    if cls is not _Array or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise BinFormatError("unexpected numpy array reconstruction")
    return _Array()


def _frombuffer(buf, dtype, shape, order):
    arr = _Array()
    arr.__setstate__((tuple(shape), dtype, False, bytes(buf)))
    return arr


def _scalar(dtype, data):
    if not isinstance(dtype, _Dtype) or dtype.spec != "b1" or not isinstance(data, (bytes, str)) or len(data) != 1:
        raise BinFormatError("numpy scalar other than a bool")
    return (data if isinstance(data, bytes) else data.encode("latin1")) != b"\x00"


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise BinFormatError("unexpected _codecs.encode call")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise BinFormatError("unexpected bytes(...) call")
    return b""


#: The only names a .bin pickle may use; each maps to a local stand-in that validates its arguments.
#: (numpy's uint8 buffer arrays as insightface writes them, and what protocol 2 needs for bytes.)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise BinFormatError(
                f"{self.source}: refused: the pickle names {module}.{name}; an insightface .bin may hold only "
                "lists/tuples of image bytes (or uint8 buffers) and bools, so this file was not loaded"
            )
        return target

    def persistent_load(self, pid):
        raise BinFormatError(f"{self.source}: refused: the pickle uses persistent ids")


def _plain(obj, source: str):
    """Turn stand-ins into bytes and check the result is (images, flags)."""
    if isinstance(obj, _Array):
        if obj.data is None:
            raise BinFormatError(f"{source}: incomplete numpy array in pickle")
        return obj.data
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, source) for v in obj)
    if isinstance(obj, (bytes, bytearray, bool)):
        return obj
    raise BinFormatError(f"{source}: the pickle holds a {type(obj).__name__}; only image bytes and bools are accepted")


def load_bin_pickle(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Read an insightface ``.bin`` without running code: ``(encoded images, is-same flags)``.

    Only lists, tuples, bytes, bools (and insightface's 1-D uint8 numpy buffers, rebuilt by local
    stand-ins, never by numpy) are accepted; any other global, class or call raises :class:`BinFormatError`.
    """
    path = existing_file(path, DatasetError, ".bin file")
    raw = path.read_bytes()
    try:
        obj = _DataOnlyUnpickler(io.BytesIO(raw), str(path)).load()
    except BinFormatError as e:
        msg = str(e)
        raise BinFormatError(msg if msg.startswith(str(path)) else f"{path}: refused: {msg}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise BinFormatError(f"{path}: not a readable insightface .bin pickle ({type(e).__name__}: {e})") from None
    obj = _plain(obj, str(path))
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))
            and isinstance(obj[1], (list, tuple))):
        raise BinFormatError(f"{path}: expected a pickle of (list of images, list of is-same flags)")
    bins, flags = list(obj[0]), list(obj[1])
    if not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise BinFormatError(f"{path}: the image list holds something other than encoded image bytes")
    if not all(isinstance(f, bool) for f in flags):
        raise BinFormatError(f"{path}: the is-same list holds something other than bools")
    if len(bins) != 2 * len(flags):
        raise BinFormatError(f"{path}: {len(bins)} images for {len(flags)} pairs (expected exactly two per pair)")
    return [bytes(b) for b in bins], flags
