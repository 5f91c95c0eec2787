"""Vision datasets: the bundled digits, MNIST-format IDX folders, and image files for predict."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divekit import hub
from divekit.data import dataset_info, load_dataset, vision
from divekit.data.idx import write_idx
from divekit.data.vision import load_image_file, resize_images
from divekit.errors import DataNotFoundError, DivekitError

rng = np.random.default_rng(0)
TRAIN_X = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
TRAIN_Y = np.arange(30, dtype=np.uint8) % 10
TEST_X = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
TEST_Y = np.arange(10, dtype=np.uint8)[::-1].copy()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "cache"
    monkeypatch.setenv("DIVEKIT_DATA", str(home))
    return home


def write_mnist(folder: Path, gz: bool = True) -> Path:
    """The four IDX files of a tiny MNIST-format dataset (30 train, 10 test)."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for name, array in zip(vision.IDX_FILES, (TRAIN_X, TRAIN_Y, TEST_X, TEST_Y)):
        write_idx(folder / (name + suffix), array)
    return folder


# ----------------------------------------------------------------------------- digits


def test_digits_loads_offline():
    info = dataset_info("digits")
    assert info.offline and info.task == "classify"
    d = load_dataset("digits")
    assert d.train_images.shape == (1437, 1, 8, 8) and d.val_images.shape == (360, 1, 8, 8)
    assert d.train_images.dtype == torch.float32 and d.train_labels.dtype == torch.int64
    assert 0 <= d.train_images.min() and d.train_images.max() == 1
    assert d.classes == [str(i) for i in range(10)] and d.num_classes == 10
    assert d.in_channels == 1 and d.image_size == (8, 8) and d.name == "digits"
    assert d.mean[0] == pytest.approx(d.train_images.mean().item(), abs=1e-5)
    assert d.std[0] == pytest.approx(d.train_images.std().item(), abs=1e-4)


def test_digits_split_is_a_stratified_partition_fixed_by_the_seed():
    from sklearn.datasets import load_digits

    a, b, c = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.val_labels, b.val_labels)
    assert not torch.equal(a.val_images, c.val_images)
    # train + val is exactly the whole set: nothing lost, nothing in both
    every = torch.cat([a.train_images, a.val_images]).flatten(1).numpy() * 16
    whole = load_digits().images.reshape(len(every), -1)
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  rows in lexicographic order
    np.testing.assert_allclose(order(every), order(whole))
    per_class = torch.bincount(a.val_labels, minlength=10)
    total = torch.bincount(torch.cat([a.train_labels, a.val_labels]), minlength=10)
    assert ((per_class - 0.2 * total).abs() <= 1).all()


def test_digits_resize_and_limit():
    d = load_dataset("digits", resize=28, limit=100)
    assert d.train_images.shape == (100, 1, 28, 28) and d.val_images.shape == (20, 1, 28, 28)
    assert d.image_size == (28, 28) and 0 <= d.train_images.min() and d.train_images.max() <= 1


def test_bad_options_are_refused():
    with pytest.raises(DivekitError, match="limit"):
        load_dataset("digits", limit=0)
    with pytest.raises(DivekitError, match="image size"):
        load_dataset("digits", resize=(0, 3))
    with pytest.raises(DivekitError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)


# ----------------------------------------------------------------------------- MNIST format


@pytest.mark.parametrize(
    "layout, gz", [("", True), ("", False), ("raw", True), ("MNIST/raw", True), ("MNIST/raw", False)]
)
def test_mnist_from_a_folder(tmp_path, layout, gz):
    write_mnist(tmp_path / "data" / layout, gz=gz)
    d = load_dataset("mnist", data_dir=tmp_path / "data")
    assert d.train_images.shape == (30, 1, 28, 28) and d.val_images.shape == (10, 1, 28, 28)
    torch.testing.assert_close(d.train_images[:, 0], torch.from_numpy(TRAIN_X).float() / 255)
    assert d.val_labels.tolist() == TEST_Y.tolist() and d.train_labels.dtype == torch.int64
    assert d.classes == [str(i) for i in range(10)]


def test_fashion_mnist_layout_and_class_names(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw")
    d = load_dataset("fashion-mnist", data_dir=tmp_path, resize=32, limit=10)
    assert d.train_images.shape == (10, 1, 32, 32) and len(d.val_labels) == 2
    assert d.classes[0] == "t-shirt" and d.classes[9] == "ankle boot"


def test_mnist_from_the_cache(cache):
    write_mnist(cache / "mnist")
    assert len(load_dataset("mnist").train_labels) == 30


def test_missing_mnist_says_what_to_do(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(e.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert str(tmp_path) in message and "--download" in message and "\n" not in message


def test_labels_out_of_range_are_refused(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(DivekitError, match="labels must lie in 0..9"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_download_through_the_hub(tmp_path, cache, monkeypatch):
    """--download fetches the four files from the hub, checks their md5, and loads them."""
    www = write_mnist(tmp_path / "www")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}/"
        for name in vision.IDX_FILES:
            md5 = hashlib.md5((www / f"{name}.gz").read_bytes()).hexdigest()
            monkeypatch.setitem(hub.DATA_HUB, f"mnist/{name}.gz", (base + f"{name}.gz", f"md5:{md5}"))
        d = load_dataset("mnist", download=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(d.train_labels) == 30
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(f"{n}.gz" for n in vision.IDX_FILES)


@pytest.mark.shared_data
def test_real_mnist_from_shared_data(shared_data):
    folder = shared_data / "MNIST"
    if not (folder / "raw").is_dir():
        pytest.skip(f"{folder} is not present")
    d = load_dataset("mnist", data_dir=folder)
    assert len(d.train_labels) == 60000 and len(d.val_labels) == 10000
    assert d.image_size == (28, 28)
    assert d.mean[0] == pytest.approx(0.1307, abs=1e-4) and d.std[0] == pytest.approx(0.3081, abs=1e-4)


# ----------------------------------------------------------------------------- pixels


def test_resize_in_chunks_equals_resize_at_once(monkeypatch):
    x = torch.rand(7, 3, 9, 5)
    whole = resize_images(x, (16, 12))
    monkeypatch.setattr(vision, "_RESIZE_BUDGET", 16 * 12 * 3 * 2)  # two images per chunk
    torch.testing.assert_close(resize_images(x, (16, 12)), whole)
    assert resize_images(x[0], 4).shape == (3, 4, 4)
    assert resize_images((x * 255).to(torch.uint8), 9).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "RGB", "LA", "1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_files_of_any_mode_and_size(tmp_path, mode, channels):
    path = tmp_path / f"odd-{mode}.png"
    Image.fromarray(rng.integers(0, 256, size=(13, 7, 3), dtype=np.uint8)).convert(mode).save(path)
    x = load_image_file(path, channels, 28)
    assert x.shape == (channels, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert load_image_file(path, channels).shape == (channels, 13, 7)


def test_a_saved_training_image_converts_like_training(tmp_path):
    Image.fromarray(TRAIN_X[0]).save(tmp_path / "seven.png")
    train = resize_images(torch.from_numpy(TRAIN_X[:1])[:, None], 32)[0]
    torch.testing.assert_close(load_image_file(tmp_path / "seven.png", 1, 32), train)


def test_missing_or_broken_image_file_is_named(tmp_path):
    with pytest.raises(DivekitError, match="nope.png"):
        load_image_file(tmp_path / "nope.png", 1, 28)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DivekitError, match="text.png"):
        load_image_file(tmp_path / "text.png", 3, 28)
