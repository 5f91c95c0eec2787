"""IDX files as MNIST stores them: round trips, and malformed files named in the error."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from divekit.data.idx import read_idx, read_idx_pair, write_idx
from divekit.errors import DivekitError

rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
LABELS = rng.integers(0, 10, size=5, dtype=np.uint8)


def images_bytes() -> bytes:
    """An MNIST image file, written by hand: magic 2051, N, rows, cols, pixels."""
    header = np.array([2051, *IMAGES.shape], ">u4").tobytes()
    return header + IMAGES.tobytes()


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_images_round_trip(tmp_path, name):
    path = tmp_path / name
    data = images_bytes()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    x = read_idx(path)
    assert x.dtype == np.uint8 and x.shape == (5, 4, 3)
    np.testing.assert_array_equal(x, IMAGES)
    x[0, 0, 0] = 1  # a writable array (torch.from_numpy warns on read-only ones)


def test_gzip_is_told_by_magic_bytes_not_by_name(tmp_path):
    path = tmp_path / "no-extension"
    path.write_bytes(gzip.compress(images_bytes()))
    np.testing.assert_array_equal(read_idx(path), IMAGES)


def test_labels_and_wider_types_round_trip(tmp_path):
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", LABELS)), LABELS)
    assert (tmp_path / "l.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (gzip.decompress((tmp_path / "l.gz").read_bytes())[:4]) == (2049).to_bytes(4, "big")
    floats = rng.normal(size=(2, 3)).astype(np.float32)
    got = read_idx(write_idx(tmp_path / "f", floats))
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, floats)


def test_pair_reads_images_and_labels(tmp_path):
    x, y = read_idx_pair(write_idx(tmp_path / "x", IMAGES), write_idx(tmp_path / "y", LABELS))
    assert x.shape == (5, 4, 3) and y.shape == (5,)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"\x01\x02" + b[2:], "magic number"),
        (lambda b: b[:2] + b"\x07" + b[3:], "magic number"),  # unknown dtype code
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:10], "header"),
        (lambda b: b"", "shorter than"),
    ],
)
def test_malformed_file_is_named(tmp_path, damage, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(images_bytes()))
    with pytest.raises(DivekitError, match=message) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    good = gzip.compress(images_bytes())
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DivekitError, match="gzip") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DivekitError, match="nope"):
        read_idx(tmp_path / "nope")


def test_count_mismatch_names_both_files(tmp_path):
    x = write_idx(tmp_path / "images", IMAGES)
    y = write_idx(tmp_path / "labels", LABELS[:4])
    with pytest.raises(DivekitError, match="5 images.*4 labels") as e:
        read_idx_pair(x, y)
    assert str(x) in str(e.value) and str(y) in str(e.value)


def test_swapped_files_are_refused(tmp_path):
    x = write_idx(tmp_path / "images", IMAGES)
    y = write_idx(tmp_path / "labels", LABELS)
    with pytest.raises(DivekitError, match="expected images"):
        read_idx_pair(y, x)
