"""IDX files, the format of MNIST and Fashion-MNIST, gzip-compressed or not.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the values in C order (big-endian for multi-byte types). MNIST images
have magic 2051 (``0x00000803``: uint8, 3 dims → ``(N, rows, cols)``), labels 2049 (uint8, 1 dim).
The whole payload is decoded with one ``np.frombuffer``; nothing loops over images.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from divekit.errors import DivekitError

GZIP_MAGIC = b"\x1f\x8b"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# dtype code → numpy dtype (big-endian for multi-byte values)
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """A file's content, gunzipped when it starts with the gzip magic bytes (whatever its name)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DivekitError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DivekitError(f"{str(path)!r} is not a valid gzip file: {e}") from None


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array of the header's shape, in native byte order."""

    def bad(what: str) -> DivekitError:
        return DivekitError(f"{source!r} is not a valid IDX file: {what}")

    if len(data) < 4:
        raise bad(f"only {len(data)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    if zero != 0 or code not in DTYPES or ndim == 0:
        raise bad(f"magic number {magic} (0x{magic:08x}) is not 0x0000 <dtype code> <ndim>; "
                  f"MNIST images have {IMAGES_MAGIC}, labels {LABELS_MAGIC}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise bad(f"the header needs {header} bytes for {ndim} dimensions, the file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing bytes"
        raise bad(f"{kind}: dims {dims} need {expected} bytes of data, found {payload}")
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)  # writable, native order


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or not, told by its magic bytes) into a numpy array.

    Images (magic 2051) come back as ``(N, rows, cols)`` uint8, labels (2049) as ``(N,)``
    uint8. A wrong magic number, a short or long payload, or a bad gzip stream raises
    :class:`DivekitError` naming the file.
    """
    return parse_idx(read_bytes(path), str(path))


def read_idx_pair(
    images: str | os.PathLike[str], labels: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, rows, cols)`` and labels ``(N,)`` from two IDX files that must agree on N."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DivekitError(f"{str(images)!r}: expected images of shape (N, rows, cols), got {x.shape}")
    if y.ndim != 1:
        raise DivekitError(f"{str(labels)!r}: expected labels of shape (N,), got {y.shape}")
    if len(x) != len(y):
        raise DivekitError(
            f"{str(images)!r} has {len(x)} images but {str(labels)!r} has {len(y)} labels"
        )
    return x, y


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write an array as IDX (gzip-compressed when ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    codes = {dt.newbyteorder("="): c for c, dt in DTYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise DivekitError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, float64")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + np.ascontiguousarray(array, DTYPES[codes[native]]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
